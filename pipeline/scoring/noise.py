"""Seeded query perturbations for the robustness report: typos, stripped diacritics, lower case.

A perturbed query is a pure function of (noise, seed, text): the same question gets the
same typos in every run and experiment, whatever else is evaluated, so `dvc metrics diff`
and `dvc plots diff` compare models on identical noisy queries.

Written here rather than taken from nlpaug or TextAttack: both model typos with English
keyboard layouts and word lists, are no longer kept up (nlpaug's last release is from
2022), and what a multilingual report needs is three small script-aware functions.
"""

from __future__ import annotations

import random
import unicodedata

from pipeline.contracts import Noise

# Combining marks are stripped only from letters of these scripts (accents, tonos, breve,
# cedilla...). Elsewhere a combining mark is part of the letter: Devanagari and Thai vowel
# signs, for instance, so Hindi and Thai queries are left unchanged (and counted).
DIACRITIC_SCRIPTS = ("LATIN", "GREEK", "CYRILLIC")
# Optional vowel points that real Arabic (harakat, not hamza or madda) and Hebrew text
# mostly leaves out.
OPTIONAL_POINTS = [(0x064B, 0x0652), (0x0670, 0x0670), (0x0591, 0x05C7)]
# The breve of Cyrillic й and ў makes another letter, which no writer drops (ё -> е, they do).
KEPT_MARKS = {("CYRILLIC", "\u0306")}
TYPO_EDITS = ("insert", "delete", "swap", "substitute")


def typo(text: str, rate: float, rng: random.Random) -> str:
    """Each letter, with probability `rate`, gets one edit: insert, delete, swap with the next
    letter, or substitute. New letters come from the query's own letters, so the script stays."""
    alphabet = sorted({ch for ch in text if ch.isalpha()})
    if not alphabet:
        return text
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        ch = chars[i]
        if not ch.isalpha() or rng.random() >= rate:
            out.append(ch)
            i += 1
            continue
        edit = rng.choice(TYPO_EDITS)
        if edit == "swap" and i + 1 < len(chars) and chars[i + 1].isalpha() and chars[i + 1] != ch:
            out += [chars[i + 1], ch]
            i += 2
            continue
        if edit == "insert":
            out += [ch, rng.choice(alphabet)]
        elif edit in ("substitute", "swap") and len(alphabet) > 1:  # a swap with no letter after substitutes
            out.append(rng.choice([a for a in alphabet if a != ch]))
        # delete (or substitute with a one-letter alphabet): drop the letter
        i += 1
    return "".join(out)


def _is_optional_point(ch: str) -> bool:
    return any(lo <= ord(ch) <= hi for lo, hi in OPTIONAL_POINTS)


def strip_diacritics(text: str) -> str:
    """Drop accents from Latin, Greek and Cyrillic letters (é -> e, ά -> α, ё -> е) and
    optional Arabic and Hebrew vowel points; marks that make a letter (й, Hindi and Thai
    vowel signs) stay."""
    out: list[str] = []
    base_script = ""
    for ch in unicodedata.normalize("NFD", text):
        if unicodedata.combining(ch):
            if (base_script in DIACRITIC_SCRIPTS and (base_script, ch) not in KEPT_MARKS) or _is_optional_point(ch):
                continue
        else:
            base_script = unicodedata.name(ch, "").split(" ")[0]
        out.append(ch)
    stripped = unicodedata.normalize("NFC", "".join(out))
    # nothing stripped: the text as it came (not NFC-normalized), so it counts as unchanged
    return stripped if stripped != unicodedata.normalize("NFC", text) else text


def perturb(text: str, noise: Noise, seed: int) -> str:
    """`text` under `noise`; the random stream is seeded by (seed, noise, text) alone."""
    if noise.kind == "lowercase":
        return text.lower()
    if noise.kind == "no_diacritics":
        return strip_diacritics(text)
    return typo(text, noise.rate, random.Random(f"{seed}\x00{noise.name}\x00{text}"))
