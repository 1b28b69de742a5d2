"""Quality-filter profiles and the documented rule defaults; the CLI's compilation-cache settings."""

import json
import os
from pathlib import Path

import pytest

from jaxllm.cli import main
from jaxllm.compile_cache import (DISABLE_FLAG, compile_cache_env, default_cache_dir, enable_compile_cache,
                                  host_tag, repair_cache_dir, repair_enabled_cache)
from jaxllm.lecture.quality.profiles import PROFILES, describe_rules, profile_config
from jaxllm.lecture.quality.rules import RULES, first_failing_rule

README = Path(__file__).resolve().parent.parent / "README.md"
GLOSSARY_ENTRY = ("kludge: n. A clever programming trick intended to solve a particular nasty case in an "
                  "expedient, if not clear, manner. [Often used in jest —ESR]")


def test_every_rule_is_listed_with_its_defaults_in_help_and_readme(capsys):
    assert main(["data", "filter", "--help"]) == 0
    help_text = capsys.readouterr().out
    readme = README.read_text()
    lines = describe_rules()
    assert [line.split(":")[0] for line in lines] == list(RULES)
    for line in lines:
        name, settings = line.split(": ", 1)
        assert line in help_text
        assert f"- `{name}`: {settings}" in readme, f"README lacks the rule line for {name}"
    for profile in PROFILES:
        assert f"--profile {profile}`" in readme and f"  {profile}: " in help_text


def test_glossary_profile_keeps_a_short_entry_that_web_defaults_reject():
    assert first_failing_rule(GLOSSARY_ENTRY, profile_config("web"))[0] == "word_count"
    assert first_failing_rule(GLOSSARY_ENTRY, profile_config("glossary")) is None
    # The junk the rules exist for is still rejected under every profile.
    for profile in PROFILES:
        assert first_failing_rule("M" * 200 + " " + GLOSSARY_ENTRY, profile_config(profile))[0] == "char_run"


def test_code_profile_keeps_source_code_and_prose_keeps_hard_wrapped_text():
    code = ("import math\n\n\nclass Point:\n    x: float = 0.0\n    y: float = 0.0\n\n"
            "    def norm(self) -> float:\n        return math.hypot(self.x, self.y)\n\n"
            "    def scaled(self, factor: float) -> 'Point':\n        return Point(self.x * factor, self.y * factor)\n")
    assert first_failing_rule(code, profile_config("web")) is not None
    assert first_failing_rule(code, profile_config("code")) is None
    wrapped = ("It was a bright cold day in April and the clocks were striking thirteen, and\n"
               "the wind that blew along the street had the smell of boiled cabbage and old\n"
               "rag mats in it, so that he went up the stairs to the flat with his chin\n"
               "nuzzled into his breast in an effort to escape the vile wind, slipping quickly\n"
               "through the glass doors of Victory Mansions, though not quickly enough to keep\n") * 1
    assert first_failing_rule(wrapped, profile_config("web"))[0] == "punctuated_lines"
    assert first_failing_rule(wrapped, profile_config("prose")) is None


def test_profile_flag_applies_before_set_overrides(tmp_path):
    source = tmp_path / "entries.jsonl"
    source.write_text(json.dumps({"text": GLOSSARY_ENTRY}) + "\n" + json.dumps({"text": "tiny entry"}) + "\n")
    out = tmp_path / "kept.jsonl"
    assert main(["data", "filter", str(source), "--out", str(out), "--workers", "1", "--profile", "glossary"]) == 0
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [GLOSSARY_ENTRY]
    assert main(["data", "filter", str(source), "--out", str(out), "--workers", "1", "--profile", "glossary",
                 "--set", "min_words=30"]) == 0
    assert out.read_text() == ""


def test_compile_cache_defaults_to_a_per_version_user_directory_and_can_be_turned_off(tmp_path, monkeypatch):
    env = compile_cache_env({"XDG_CACHE_HOME": str(tmp_path)}, ["eval"])
    directory = Path(env["JAX_COMPILATION_CACHE_DIR"])
    versions = directory.parent
    assert versions.parent == tmp_path / "jaxllm" / "jax" and versions.name.startswith("jax-")
    assert "jaxlib-" in versions.name and float(env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]) > 0
    # one directory per host CPU: XLA's CPU programs depend on the ISA and the schedulable cores, JAX's keys do not
    assert directory.name == host_tag() and host_tag("AVX-512", 2) == "avx512-2cpu"
    elsewhere = {default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}, host_tag(isa, cpus))
                 for isa, cpus in (("AVX-512", 2), ("AVX-512", 1), ("AVX2", 2))}
    assert len(elsewhere) == 3 and all(d.parent == versions for d in elsewhere)
    mine = compile_cache_env({"JAX_COMPILATION_CACHE_DIR": "/elsewhere"}, ["eval"])
    assert "JAX_COMPILATION_CACHE_DIR" not in mine  # JAX reads the user's own value
    for off in ({"JAXLLM_COMPILATION_CACHE": "off"}, {"JAX_ENABLE_COMPILATION_CACHE": "false"}):
        assert compile_cache_env(off, ["eval"]) == {"JAX_ENABLE_COMPILATION_CACHE": "false"}
    monkeypatch.delenv("JAX_ENABLE_COMPILATION_CACHE", raising=False)  # restored after the test
    assert enable_compile_cache(["eval", DISABLE_FLAG, "--task", "x"]) == ["eval", "--task", "x"]
    assert os.environ["JAX_ENABLE_COMPILATION_CACHE"] == "false"


def test_a_cache_entry_without_its_atime_no_longer_blocks_every_later_write(tmp_path):
    """JAX's size-bounded cache reads every entry's atime before a write: one entry written without it (a
    process killed between the two files, or an unbounded writer on the same directory) failed all later
    writes. The CLI's repair gives it one, drops empty entries and stray atimes, and writes work again."""
    from jax._src.lru_cache import LRUCache

    cache = LRUCache(str(tmp_path), max_size=1 << 20)
    cache.put("kept", b"a program")
    (tmp_path / "orphan-cache").write_bytes(b"another program")  # no orphan-atime
    (tmp_path / "empty-cache").write_bytes(b"")
    (tmp_path / "stray-atime").write_bytes((1).to_bytes(8, "little"))
    with pytest.raises(FileNotFoundError):
        cache.put("new", b"a new program")
    assert not (tmp_path / "new-cache").exists()
    assert repair_cache_dir(tmp_path) == {"atime_added": 1, "empty_removed": 1, "stray_atime_removed": 1}
    cache.put("new", b"a new program")
    assert cache.get("new") == b"a new program" and cache.get("orphan") == b"another program"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lockfile") == [
        "kept-atime", "kept-cache", "new-atime", "new-cache", "orphan-atime", "orphan-cache"]
    assert repair_cache_dir(tmp_path) == {"atime_added": 0, "empty_removed": 0, "stray_atime_removed": 0}
    # the CLI's call: only a cache that is on and size-bounded (JAX keeps atimes only then)
    (tmp_path / "late-cache").write_bytes(b"a late program")
    bounded = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path), "JAX_COMPILATION_CACHE_MAX_SIZE": str(1 << 20)}
    assert repair_enabled_cache({**bounded, "JAXLLM_COMPILATION_CACHE": "off"}) is None
    assert repair_enabled_cache({"JAX_COMPILATION_CACHE_DIR": str(tmp_path)}) is None
    assert repair_enabled_cache(bounded) == {"atime_added": 1, "empty_removed": 0, "stray_atime_removed": 0}
