"""Heuristic document rules (Gopher, C4, FineWeb style): each a pure function of one document.

A rule is `rule(view: TextView, config: HeuristicConfig) -> (keep: bool, reason: str)`; the reason
says what was measured and the threshold it broke ("" when kept). `first_failing_rule` runs the
enabled rules in registration order (cheap ones and the repetition rules first, so repetitive junk is
reported as such) and stops at the first rejection: a document is counted under one rule.
A threshold set to None turns its check off.

Defaults follow Rae et al. 2021 (Gopher "quality" and "repetition" rules), with C4's lorem-ipsum rule,
FineWeb's fraction of lines ending in punctuation, a longest-run-of-one-character rule (OLMo's
"MMMMmmmm" posts) and a script check (fraction of letters in allowed Unicode scripts).
They are tuned for English prose; for other languages change `allowed_scripts`, `min_stop_words`
and the word-based lengths (languages written without spaces have few "words").
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class HeuristicConfig:
    """Thresholds of the heuristic rules; None turns a check off."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_char_run: int | None = 30  # longest run of one letter/digit, case-folded ("MMMMmmmm...")
    max_symbol_word_ratio: float | None = 0.1  # ('#' + '...' + '…') per word
    min_alpha_word_fraction: float | None = 0.8  # words with at least one letter
    max_symbol_char_fraction: float | None = 0.25  # non-space characters that are neither letter nor digit
    allowed_scripts: tuple[str, ...] | None = ("latin",)  # see SCRIPTS
    min_script_fraction: float = 0.8  # of letters, in allowed_scripts
    min_ascii_letter_fraction: float | None = None  # cheap English check, e.g. 0.9; off by default
    min_stop_words: int | None = 2  # Gopher: at least 2 of the, be, to, of, and, that, have, with
    reject_lorem_ipsum: bool = True  # C4
    max_bullet_line_fraction: float | None = 0.9
    max_ellipsis_line_fraction: float | None = 0.3
    min_punctuated_line_fraction: float | None = 0.12  # FineWeb: lines ending in terminal punctuation
    max_duplicate_line_fraction: float | None = 0.3
    max_duplicate_line_char_fraction: float | None = 0.2
    max_duplicate_paragraph_fraction: float | None = 0.3
    max_duplicate_paragraph_char_fraction: float | None = 0.2
    # (n, max fraction of word characters in the most frequent n-gram)
    max_top_ngram_char_fraction: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    # (n, max fraction of word characters covered by n-grams seen earlier in the document)
    max_duplicate_ngram_char_fraction: tuple[tuple[int, float], ...] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    disabled_rules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self.disabled_rules:
            if name not in RULES:
                raise ValueError(f"unknown rule '{name}' in disabled_rules; rules are: {', '.join(RULES)}")
        for script in self.allowed_scripts or ():
            if script not in SCRIPTS:
                raise ValueError(f"unknown script '{script}'; choose from {', '.join(SCRIPTS)}")


# Unicode ranges of letters by script (inclusive bounds); enough for a language check, not a full table.
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xAA, 0xAA), (0xBA, 0xBA), (0xC0, 0x24F), (0x1D00, 0x1DBF),
              (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF), (0xFB00, 0xFB06), (0xFF21, 0xFF3A),
              (0xFF41, 0xFF5A)),
    "greek": ((0x370, 0x3FF), (0x1F00, 0x1FFF)),
    "cyrillic": ((0x400, 0x52F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "armenian": ((0x530, 0x58F),),
    "hebrew": ((0x590, 0x5FF), (0xFB1D, 0xFB4F)),
    "arabic": ((0x600, 0x6FF), (0x750, 0x77F), (0x8A0, 0x8FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "devanagari": ((0x900, 0x97F), (0xA8E0, 0xA8FF)),
    "bengali": ((0x980, 0x9FF),),
    "thai": ((0xE00, 0xE7F),),
    "georgian": ((0x10A0, 0x10FF),),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)),
    "kana": ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)),
    "han": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F)),
}

GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "◦", "‣", "▪", "■", "□", "○", "-", "*", "–", "—", "·", "⁃", "→", "►")
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’", ")", "。", "！", "？", "…", ":", ";")

_NON_LETTER = re.compile(r"[\W\d_]+")  # everything that is not a letter
_LETTER = re.compile(r"[^\W\d_]")
_SYMBOL_CHAR = re.compile(r"[^\w\s]|_")
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_ASCII_PUNCTUATION = {ord(c): None for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"}
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def normalise(text: str) -> str:
    """NFKC, lowercase, punctuation removed, whitespace collapsed: the text that dedup compares."""
    text = unicodedata.normalize("NFKC", text).lower()
    if text.isascii():  # same result, 4x faster
        return " ".join(text.translate(_ASCII_PUNCTUATION).split())
    return _SPACES.sub(" ", _PUNCTUATION.sub("", text)).strip()


class TextView:
    """One document's text and the pieces rules share, each computed on first use."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @functools.cached_property
    def word_chars(self) -> int:
        return sum(map(len, self.words))

    @functools.cached_property
    def lines(self) -> list[str]:
        """Non-empty lines, stripped."""
        return [line for line in (raw.strip() for raw in self.text.splitlines()) if line]

    @functools.cached_property
    def paragraphs(self) -> list[str]:
        return [p for p in (raw.strip() for raw in _PARAGRAPH_BREAK.split(self.text)) if p]

    @functools.cached_property
    def normalised(self) -> str:
        return normalise(self.text)

    @functools.cached_property
    def normalised_words(self) -> list[str]:
        return self.normalised.split()

    @functools.cached_property
    def letters(self) -> str:
        return _NON_LETTER.sub("", self.text)


Rule = Callable[[TextView, HeuristicConfig], tuple[bool, str]]
RULES: dict[str, Rule] = {}


def rule(function: Rule) -> Rule:
    """Registers a rule under its function name; registration order is evaluation order."""
    RULES[function.__name__] = function
    return function


KEEP = (True, "")


@functools.lru_cache(maxsize=16)
def _char_run_pattern(max_run: int) -> re.Pattern:
    """Matches a run of more than max_run copies of one letter or digit, case-insensitively."""
    return re.compile(r"([^\W_])\1{%d,}" % max_run, re.IGNORECASE)


@rule
def char_run(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    """Longest run of one letter or digit (case-insensitive): "MMMMMmmmmm" is one run of 10."""
    limit = config.max_char_run
    if limit is None:
        return KEEP
    # A run of limit+1 characters covers at least `least` consecutive characters of text[::step]:
    # a regex over the short sample rules most documents out before the full search.
    step = max(1, (limit + 1) // 4)
    least = (limit + 1) // step
    if step > 1 and not _char_run_pattern(least - 1).search(view.text[::step]):
        return KEEP
    match = _char_run_pattern(limit).search(view.text)
    if match:
        return False, f"a run of {len(match.group(0))} × '{match.group(1)}' > max_char_run {config.max_char_run}"
    return KEEP


@rule
def word_count(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    n = len(view.words)
    if config.min_words is not None and n < config.min_words:
        return False, f"{n} words < min_words {config.min_words}"
    if config.max_words is not None and n > config.max_words:
        return False, f"{n} words > max_words {config.max_words}"
    return KEEP


@rule
def mean_word_length(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    if not view.words:
        return (False, "no words") if config.min_mean_word_length is not None else KEEP
    mean = view.word_chars / len(view.words)
    if config.min_mean_word_length is not None and mean < config.min_mean_word_length:
        return False, f"mean word length {mean:.1f} < {config.min_mean_word_length}"
    if config.max_mean_word_length is not None and mean > config.max_mean_word_length:
        return False, f"mean word length {mean:.1f} > {config.max_mean_word_length}"
    return KEEP


def duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those repeats)."""
    seen: set[str] = set()
    duplicates = duplicate_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            duplicates += 1
            duplicate_chars += len(item)
        else:
            seen.add(item)
    if not items:
        return 0.0, 0.0
    return duplicates / len(items), duplicate_chars / max(total_chars, 1)


def _duplicate_rule(items: list[str], what: str, max_fraction: float | None,
                    max_char_fraction: float | None) -> tuple[bool, str]:
    if (max_fraction is None and max_char_fraction is None) or len(items) < 2:
        return KEEP
    fraction, char_fraction = duplicate_fractions(items)
    if max_fraction is not None and fraction > max_fraction:
        return False, f"{fraction:.2f} of {what} are repeats > {max_fraction}"
    if max_char_fraction is not None and char_fraction > max_char_fraction:
        return False, f"{char_fraction:.2f} of characters are in repeated {what} > {max_char_fraction}"
    return KEEP


@rule
def duplicate_lines(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    return _duplicate_rule(view.lines, "lines", config.max_duplicate_line_fraction,
                           config.max_duplicate_line_char_fraction)


@rule
def duplicate_paragraphs(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    return _duplicate_rule(view.paragraphs, "paragraphs", config.max_duplicate_paragraph_fraction,
                           config.max_duplicate_paragraph_char_fraction)


@rule
def lorem_ipsum(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    if config.reject_lorem_ipsum and "lorem ipsum" in view.text.lower():
        return False, "contains 'lorem ipsum' (placeholder text)"
    return KEEP


@rule
def symbol_word_ratio(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    if config.max_symbol_word_ratio is None or not view.words:
        return KEEP
    symbols = view.text.count("#") + view.text.count("...") + view.text.count("…")
    ratio = symbols / len(view.words)
    if ratio > config.max_symbol_word_ratio:
        return False, f"{ratio:.2f} '#'/ellipsis per word > {config.max_symbol_word_ratio}"
    return KEEP


@rule
def alpha_words(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    if config.min_alpha_word_fraction is None or not view.words:
        return KEEP
    without_letters = sum(1 for word in view.words if not (word.isalpha() or _LETTER.search(word)))
    fraction = 1.0 - without_letters / len(view.words)
    if fraction < config.min_alpha_word_fraction:
        return False, f"{fraction:.2f} of words contain a letter < {config.min_alpha_word_fraction}"
    return KEEP


@rule
def symbol_chars(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    if config.max_symbol_char_fraction is None or not view.word_chars:
        return KEEP
    text = view.text
    if text.isascii():
        symbols = len(text) - len(text.translate(_ASCII_PUNCTUATION))
    else:
        symbols = len(_SYMBOL_CHAR.findall(text))
    fraction = symbols / view.word_chars
    if fraction > config.max_symbol_char_fraction:
        return False, f"{fraction:.2f} of characters are symbols > {config.max_symbol_char_fraction}"
    return KEEP


@functools.lru_cache(maxsize=16)
def _script_bounds(scripts: tuple[str, ...]) -> np.ndarray:
    ranges = sorted(r for s in scripts for r in SCRIPTS[s])
    return np.array([b for lo, hi in ranges for b in (lo, hi + 1)], dtype=np.int64)


def script_fraction(letters: str, scripts: tuple[str, ...]) -> float:
    """Fraction of the letters whose code point lies in one of the scripts' ranges."""
    if not letters:
        return 0.0
    if letters.isascii() and "latin" in scripts:
        return 1.0
    codepoints = np.frombuffer(letters.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    inside = np.searchsorted(_script_bounds(scripts), codepoints, side="right") % 2 == 1
    return float(inside.mean())


@rule
def script(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    """Language/charset check: most letters belong to the allowed scripts."""
    if not config.allowed_scripts:
        return KEEP
    if view.text.isascii() and "latin" in config.allowed_scripts:
        return KEEP if _ASCII_LETTER.search(view.text) else (False, "no letters")
    if not view.letters:
        return False, "no letters"
    fraction = script_fraction(view.letters, tuple(config.allowed_scripts))
    if fraction < config.min_script_fraction:
        return False, (f"{fraction:.2f} of letters in {'/'.join(config.allowed_scripts)} "
                       f"< {config.min_script_fraction}")
    return KEEP


@rule
def ascii_letters(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    """Cheap English check: the fraction of letters that are ASCII a-z/A-Z."""
    if config.min_ascii_letter_fraction is None:
        return KEEP
    letters = view.letters
    if not letters:
        return False, "no letters"
    non_ascii = 0 if letters.isascii() else len(letters) - len(letters.encode("ascii", "ignore"))
    fraction = 1.0 - non_ascii / len(letters)
    if fraction < config.min_ascii_letter_fraction:
        return False, f"{fraction:.2f} of letters are ASCII < {config.min_ascii_letter_fraction}"
    return KEEP


@rule
def stop_words(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    if config.min_stop_words is None:
        return KEEP
    found = 0
    for word in view.normalised_words:
        if word in GOPHER_STOP_WORDS:
            found += 1
            if found >= config.min_stop_words:
                return KEEP
    return False, f"{found} English stop words < min_stop_words {config.min_stop_words}"


@rule
def bullet_lines(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    if config.max_bullet_line_fraction is None or not view.lines:
        return KEEP
    fraction = sum(line.startswith(BULLETS) for line in view.lines) / len(view.lines)
    if fraction > config.max_bullet_line_fraction:
        return False, f"{fraction:.2f} of lines start with a bullet > {config.max_bullet_line_fraction}"
    return KEEP


@rule
def ellipsis_lines(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    if config.max_ellipsis_line_fraction is None or not view.lines:
        return KEEP
    fraction = sum(line.endswith(("...", "…")) for line in view.lines) / len(view.lines)
    if fraction > config.max_ellipsis_line_fraction:
        return False, f"{fraction:.2f} of lines end with an ellipsis > {config.max_ellipsis_line_fraction}"
    return KEEP


@rule
def punctuated_lines(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    if config.min_punctuated_line_fraction is None or not view.lines:
        return KEEP
    fraction = sum(line.endswith(TERMINAL_PUNCTUATION) for line in view.lines) / len(view.lines)
    if fraction < config.min_punctuated_line_fraction:
        return False, (f"{fraction:.2f} of lines end in punctuation "
                       f"< {config.min_punctuated_line_fraction}")
    return KEEP


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n))))


@rule
def top_ngram(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    """The most frequent word n-gram must not cover too much of the text (Gopher)."""
    words = view.normalised_words
    total = sum(map(len, words))
    if not total:
        return KEEP
    for n, max_fraction in config.max_top_ngram_char_fraction:
        if len(words) < n:
            continue
        gram, count = Counter(zip(*(words[i:] for i in range(n)))).most_common(1)[0]
        if count < 2:
            continue
        fraction = count * sum(map(len, gram)) / total
        if fraction > max_fraction:
            return False, (f"the {n}-gram '{' '.join(gram)}' repeats {count} times, "
                           f"{fraction:.2f} of characters > {max_fraction}")
    return KEEP


def duplicate_ngram_char_fraction(words: list[str], n: int) -> float:
    """Fraction of word characters inside n-grams that occurred earlier (non-overlapping, Gopher)."""
    grams = _ngrams(words, n)
    total = sum(map(len, words))
    if not grams or not total:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    duplicate_chars = index = 0
    while index < len(grams):
        gram = grams[index]
        if gram in seen:
            duplicate_chars += sum(map(len, gram))
            index += n
        else:
            seen.add(gram)
            index += 1
    return duplicate_chars / total


@rule
def duplicate_ngrams(view: TextView, config: HeuristicConfig) -> tuple[bool, str]:
    limits = sorted(config.max_duplicate_ngram_char_fraction)
    if not limits:
        return KEEP
    words = view.normalised_words
    smallest = _ngrams(words, limits[0][0])
    if len(set(smallest)) == len(smallest):  # no repeated n-gram, so no longer one repeats either
        return KEEP
    for n, max_fraction in limits:
        fraction = duplicate_ngram_char_fraction(words, n)
        if fraction > max_fraction:
            return False, f"{fraction:.2f} of characters in repeated {n}-grams > {max_fraction}"
    return KEEP


def first_failing_rule(view: TextView | str, config: HeuristicConfig) -> tuple[str, str] | None:
    """(rule name, reason) of the first enabled rule that rejects the document, or None to keep it."""
    if isinstance(view, str):
        view = TextView(view)
    for name, function in RULES.items():
        if name in config.disabled_rules:
            continue
        keep, reason = function(view, config)
        if not keep:
            return name, reason
    return None


def check_all_rules(text: str, config: HeuristicConfig) -> dict[str, tuple[bool, str]]:
    """Every enabled rule's verdict, for inspecting one document."""
    view = TextView(text)
    return {name: function(view, config) for name, function in RULES.items() if name not in config.disabled_rules}
