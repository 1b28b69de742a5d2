"""Heuristic settings: a HeuristicConfig from a mapping of settings (unknown names and wrong types are
clear errors), the profiles for kinds of text other than web pages, and their descriptions for
`jaxllm data filter --list-rules / --list-profiles`."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jaxllm import settings
from jaxllm.lecture.quality.rules import RULES, HeuristicConfig

_TUPLE_SETTINGS = ("allowed_scripts", "disabled_rules", "max_top_ngram_char_fraction",
                   "max_duplicate_ngram_char_fraction")
_BOOL_SETTINGS = ("reject_lorem_ipsum",)
_REQUIRED_NUMBERS = ("min_script_fraction",)  # the others take null to turn their check off


def heuristic_config_from(overrides: dict[str, Any], base: HeuristicConfig | None = None) -> HeuristicConfig:
    """A HeuristicConfig with `overrides` applied; unknown keys and wrong types are errors that say so.

    Values may come from YAML/JSON: lists become tuples, "latin,greek" a tuple of names, null turns
    an optional threshold off.
    """
    settings.check_keys(overrides, [f.name for f in dataclasses.fields(HeuristicConfig)], "quality rules", ValueError,
                        noun="heuristic setting")
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in _TUPLE_SETTINGS:
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            elif isinstance(value, (list, tuple)):
                value = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value)
            elif value is None and key == "allowed_scripts":
                pass
            else:
                raise ValueError(f"heuristic setting '{key}' takes a list, got {value!r}")
            if key.startswith("max_") and not all(
                    isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], int) and v[0] >= 1
                    and isinstance(v[1], (int, float)) for v in value):
                raise ValueError(f"heuristic setting '{key}' takes [[n, max_fraction], ...], got {value!r}")
        elif key in _BOOL_SETTINGS:
            if not isinstance(value, bool):
                raise ValueError(f"heuristic setting '{key}' takes true/false, got {value!r}")
        elif value is not None or key in _REQUIRED_NUMBERS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                off = "" if key in _REQUIRED_NUMBERS else " (or null to turn the check off)"
                raise ValueError(f"heuristic setting '{key}' takes a number{off}, got {value!r}")
        changes[key] = value
    return dataclasses.replace(base or HeuristicConfig(), **changes)


# ----------------------------------------------------------------------------------------------
# Profiles: the defaults above suit web pages; other kinds of text need other thresholds.

@dataclasses.dataclass(frozen=True)
class Profile:
    """A named set of heuristic settings (on top of the web defaults) and why it changes them."""

    description: str
    settings: dict[str, Any]


PROFILES: dict[str, Profile] = {
    "web": Profile("web pages (the defaults: Gopher, C4 and FineWeb thresholds)", {}),
    "prose": Profile(
        "books, articles, fiction: hard-wrapped lines need not end in punctuation, dialogue repeats short "
        "lines, and a short story or poem may have fewer than 50 words",
        {"min_punctuated_line_fraction": None, "max_duplicate_line_fraction": None, "min_words": 20}),
    "glossary": Profile(
        "dictionary, glossary or FAQ entries: short (3 words up), without stop words, ending in a signature "
        "or a citation rather than a full stop, with more punctuation (headwords, ':', brackets)",
        {"min_words": 3, "min_stop_words": None, "min_punctuated_line_fraction": None,
         "max_symbol_char_fraction": 0.35, "max_symbol_word_ratio": None}),
    "code": Profile(
        "source code: operators and brackets, long identifiers, '*' comment lines and repeated lines such as "
        "'}' are normal, and names repeat (`self.x`, `int = 0`); only length, character runs, script, lorem ipsum "
        "and a looser most-frequent n-gram limit apply",
        {"min_words": 10, "min_mean_word_length": None, "max_mean_word_length": None, "max_char_run": 80,
         "max_symbol_word_ratio": None, "min_alpha_word_fraction": None, "max_symbol_char_fraction": None,
         "min_stop_words": None, "max_bullet_line_fraction": None, "max_ellipsis_line_fraction": None,
         "min_punctuated_line_fraction": None, "max_duplicate_line_fraction": None,
         "max_duplicate_line_char_fraction": None, "max_duplicate_paragraph_fraction": None,
         "max_duplicate_paragraph_char_fraction": None, "max_duplicate_ngram_char_fraction": (),
         "max_top_ngram_char_fraction": ((2, 0.3), (3, 0.3), (4, 0.3))}),
}


def profile_config(name: str) -> HeuristicConfig:
    """The HeuristicConfig of a named profile (web = the defaults)."""
    if name not in PROFILES:
        raise ValueError(f"unknown filter profile '{name}'; profiles are: {', '.join(PROFILES)}")
    return heuristic_config_from(PROFILES[name].settings)


def rule_settings() -> dict[str, list[str]]:
    """Rule name -> the HeuristicConfig fields it reads (from its source, so it cannot go stale)."""
    import inspect

    fields = {f.name for f in dataclasses.fields(HeuristicConfig)}
    return {name: [f for f in dict.fromkeys(re.findall(r"config\.(\w+)", inspect.getsource(function)))
                   if f in fields] for name, function in RULES.items()}


def _setting_text(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return ",".join(f"{n}:{limit:g}" for n, limit in value)
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_rules(config: HeuristicConfig | None = None) -> list[str]:
    """One line per rule, in the order they run: its name and its settings' values (`off` = not checked)."""
    config = config or HeuristicConfig()
    lines = []
    for name, settings in rule_settings().items():
        state = " (disabled)" if name in config.disabled_rules else ""
        values = ", ".join(f"{s}={_setting_text(getattr(config, s))}" for s in settings)
        lines.append(f"{name}{state}: {values}")
    return lines


def describe_profiles() -> list[str]:
    """One line per profile: its name, what it is for, and the settings it changes from the web defaults."""
    lines = []
    for name, profile in PROFILES.items():
        changes = ", ".join(f"{k}={_setting_text(v)}" for k, v in profile.settings.items()) or "no changes"
        lines.append(f"{name}: {profile.description} [{changes}]")
    return lines
