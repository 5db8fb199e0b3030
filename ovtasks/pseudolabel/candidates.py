"""Object candidates: which objects an image-caption pair is about (thesis §2.1).

Two extractors share one vocabulary normalisation:

* :class:`LexiconExtractor` (offline default) matches a vocabulary file's canonical names, synonyms
  and plural forms against the caption.
* :class:`LLMExtractor` wraps the caption in several prompt templates and asks a causal LM (any
  transformers id or local directory) for the objects, so that objects present but not named
  ("leaf" for a tree, "wheel" for a car) are proposed too. Output is parsed defensively: malformed
  text yields an empty list and a logged reason, never an exception.

Both return :class:`Candidate` records whose ``name`` is canonical: synonyms and plurals merge into
their category; words outside the vocabulary are kept as open-vocabulary names (``known=False``)
with a stable id of their own, so they get text embeddings like any category.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import yaml

log = logging.getLogger(__name__)

OPEN_VOCAB_ID_BASE = 1_000_000  # ids of names outside the vocabulary start here

_WORD_RE = re.compile(r"[a-z][a-z'\-]*")
_STOPWORDS = frozenset(
    "a an the of and or with on in at to for from by this that these those is are it its my our your "
    "some many several two three four five one photo picture image stock illustration vector art "
    "background wallpaper hd free download close-up closeup isolated jpg img sale shop today cute "
    "still life kid drew object objects thing things none nothing unknown".split()
)


_NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "pair": 2, "couple": 2, "three": 3, "four": 4,
                 "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
MAX_COUNT = 10  # a caption's number is believed up to this; "100 balls" counts as 10
_COUNT_LOOKBACK = 4  # a number may stand this many words before the name ("two small light blue balls")


def phrase_count(before: str, term: str, entry: "VocabEntry") -> int:
    """How many objects a name in a text stands for: the number word or digits among the few words just before
    it (``before``: the text up to the name), else 2 for a plural term, else 1."""
    words = _WORD_OR_DIGITS_RE.findall(before.lower())[-_COUNT_LOOKBACK:]
    for w in reversed(words):
        if w.isdigit():
            return max(1, min(int(w), MAX_COUNT))
        if w in _NUMBER_WORDS:
            return min(_NUMBER_WORDS[w], MAX_COUNT)
        if w not in _COLOURS and w not in _SIZE_WORDS:
            break  # another content word: the number, if any, belongs to something else
    return 2 if term != entry.name and term in entry.plural_terms() else 1


def _singular(word: str) -> str:
    """A cheap English singulariser for names outside the vocabulary (boxes→box, leaves→leaf)."""
    if len(word) <= 3:
        return word
    for suffix, repl in (("ies", "y"), ("ves", "f"), ("xes", "x"), ("ches", "ch"), ("shes", "sh"), ("sses", "ss")):
        if word.endswith(suffix):
            return word[: -len(suffix)] + repl
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


@dataclass(frozen=True)
class VocabEntry:
    id: int
    name: str
    plural: str
    synonyms: tuple[str, ...] = ()
    split: str = "base"  # "base" | "novel" (only used for evaluation and for base-only training)

    def terms(self) -> set[str]:
        out = {self.name, self.plural}
        for s in self.synonyms:
            out |= {s, s + "s", s + "es"}
        return {t.lower() for t in out if t}

    def plural_terms(self) -> set[str]:
        """The terms that name more than one (the plural and the synonyms' plural forms)."""
        return {t.lower() for t in (self.plural, *(s + e for s in self.synonyms for e in ("s", "es"))) if t} - {
            self.name, *self.synonyms}


@dataclass(frozen=True)
class Candidate:
    """One object proposed for an image: canonical ``name``, vocabulary id or an open-vocab id."""

    name: str
    category_id: int
    known: bool
    phrase: str  # the text it was read from
    source: str  # "lexicon" | "llm"
    count: int = 1  # how many the text says there are ("two balls": 2; a bare plural: 2; see phrase_count)


class Vocabulary:
    """Canonical categories with synonyms and plurals; maps any phrase to a canonical name."""

    def __init__(self, entries: Iterable[VocabEntry]):
        self.entries = tuple(sorted(entries, key=lambda e: e.id))
        if not self.entries:
            raise ValueError("vocabulary is empty")
        self.by_id = {e.id: e for e in self.entries}
        self.by_name = {e.name: e for e in self.entries}
        if len(self.by_id) != len(self.entries) or len(self.by_name) != len(self.entries):
            raise ValueError("vocabulary has duplicate ids or names")
        self._term_to_entry: dict[str, VocabEntry] = {}
        for e in self.entries:
            for t in e.terms():
                other = self._term_to_entry.get(t)
                if other is not None and other.id != e.id:
                    raise ValueError(f"vocabulary term {t!r} belongs to both {other.name!r} and {e.name!r}")
                self._term_to_entry[t] = e
        # Longest terms first so "plus sign" wins over "sign"; matched on word boundaries.
        terms = sorted(self._term_to_entry, key=lambda t: (-len(t), t))
        self._pattern = re.compile(r"(?<![a-z])(" + "|".join(re.escape(t) for t in terms) + r")(?![a-z])")

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "Vocabulary":
        entries = []
        for i, r in enumerate(records):
            if not isinstance(r, dict) or "name" not in r or "id" not in r:
                raise ValueError(f"vocabulary entry {i} needs at least 'id' and 'name': {r!r}")
            name = str(r["name"]).strip().lower()
            entries.append(VocabEntry(int(r["id"]), name, str(r.get("plural") or name + "s").lower(),
                                      tuple(str(s).lower() for s in r.get("synonyms", ())), str(r.get("split", "base"))))
        return cls(entries)

    @classmethod
    def load(cls, path: str | Path | None) -> "Vocabulary":
        """A JSON or YAML file holding a list of entries (or ``{"categories": [...]}``); None = the built-in
        vocabulary (``ovtasks/data/categories.json``: the synthetic data set's categories)."""
        if path is None:
            from importlib.resources import files

            text, path = (files("ovtasks.data") / "categories.json").read_text(), "categories.json"
        else:
            text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        if isinstance(data, dict):
            data = data.get("categories")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of categories")
        return cls.from_records(data)

    def to_records(self) -> list[dict]:
        return [{"id": e.id, "name": e.name, "plural": e.plural, "synonyms": list(e.synonyms), "split": e.split}
                for e in self.entries]

    def names(self, split: str | None = None) -> list[str]:
        return [e.name for e in self.entries if split is None or e.split == split]

    def match(self, text: str) -> list[tuple[VocabEntry, str]]:
        """Every vocabulary term in ``text`` (case-insensitive), in order of appearance."""
        return [(self._term_to_entry[m.group(1)], m.group(1)) for m in self._pattern.finditer(text.lower())]

    def match_counted(self, text: str) -> list[tuple[VocabEntry, str, int]]:
        """:meth:`match` with how many objects each term stands for (:func:`phrase_count`)."""
        low = text.lower()
        out = []
        for m in self._pattern.finditer(low):
            entry = self._term_to_entry[m.group(1)]
            out.append((entry, m.group(1), phrase_count(low[:m.start()], m.group(1), entry)))
        return out

    def normalise(self, phrase: str, source: str, keep_unknown: bool = True) -> Candidate | None:
        """Map a free-text object phrase ("two red balls", "Wheels") to a canonical candidate.

        A phrase containing a vocabulary term maps to that category; otherwise its last content word,
        singularised, becomes an open-vocabulary name (or None when ``keep_unknown`` is False or the
        phrase holds no content word).
        """
        hits = self.match_counted(phrase)
        if hits:
            entry, term, count = hits[-1]  # the head noun comes last in English noun phrases
            return Candidate(entry.name, entry.id, True, phrase.strip(), source, count)
        if not keep_unknown:
            return None
        words = [w.strip("'-") for w in _WORD_RE.findall(phrase.lower())]
        words = [w for w in words if w and w not in _STOPWORDS and w not in _COLOURS and len(w) > 1]
        if not words:
            return None
        name = _singular(words[-1])
        known = self._term_to_entry.get(name)
        if known is not None:
            return Candidate(known.name, known.id, True, phrase.strip(), source)
        return Candidate(name, open_vocab_id(name), False, phrase.strip(), source)


_COLOURS = frozenset("red orange yellow green cyan blue purple magenta pink white black gray grey brown".split())
# words that may stand between a number and its name ("two small light blue balls", "a pair of balls")
_SIZE_WORDS = frozenset("big small large little tiny huge giant cute new old light dark pale bright more other of".split())
_WORD_OR_DIGITS_RE = re.compile(r"[a-z][a-z'\-]*|\d+")


def open_vocab_id(name: str) -> int:
    """Stable id for a name outside the vocabulary (same name → same id in every shard and run)."""
    return OPEN_VOCAB_ID_BASE + zlib.crc32(name.encode()) % 1_000_000_000


def dedupe(cands: Iterable[Candidate]) -> list[Candidate]:
    """First occurrence of each canonical name wins (synonyms merged by normalisation), with the largest count
    any occurrence gives ("a ball ... two balls": 2)."""
    first: dict[str, Candidate] = {}
    for c in cands:
        kept = first.setdefault(c.name, c)
        if c.count > kept.count:
            first[c.name] = replace(kept, count=c.count)
    return list(first.values())


class LexiconExtractor:
    """Vocabulary terms found in the caption, canonicalised and de-duplicated."""

    source = "lexicon"

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab

    def extract(self, captions: Sequence[str]) -> list[list[Candidate]]:
        out = []
        for caption in captions:
            cands = [Candidate(e.name, e.id, True, term, self.source, n) for e, term, n in self.vocab.match_counted(caption or "")]
            out.append(dedupe(cands))
        return out


# Thesis §2.1: the caption wrapped in several templates; the last ones ask for objects that are
# present but go unnamed because they are obvious to a human.
PROMPT_TEMPLATES: tuple[str, ...] = (
    'Caption: "{caption}"\nList the objects named in the caption, separated by commas.\nObjects:',
    'Caption: "{caption}"\nList other objects that are probably visible in this image even though the caption does '
    "not name them (for example wheels for a car, leaves for a tree), separated by commas.\nObjects:",
    'An image is described as "{caption}". The physical things one can see in it are:',
)

_ITEM_SPLIT = re.compile(r"[,;\n\u2022]|\band\b|\d+[.)]\s|^\s*[-*]\s", re.MULTILINE)
MAX_ITEM_WORDS = 4
MAX_ITEMS = 20


def parse_object_list(text: str) -> tuple[list[str], str | None]:
    """Parse an LLM answer into object phrases; returns ``(items, reason)``.

    ``reason`` names why nothing usable was found (empty answer, no list, only long sentences) and
    is None when at least one item was parsed. Never raises.
    """
    if not isinstance(text, str) or not text.strip():
        return [], "empty output"
    first_block = re.split(r"\n\s*\n|Caption:|Objects:|\bQ:", text.strip(), maxsplit=1)[0]
    items = []
    for raw in _ITEM_SPLIT.split(first_block):
        item = re.sub(r"[^a-zA-Z' \-]", " ", raw or "").strip(" -'").lower()
        item = re.sub(r"\s+", " ", item)
        if not item:
            continue
        if len(item.split()) > MAX_ITEM_WORDS:
            continue  # a sentence, not an object name
        items.append(item)
        if len(items) >= MAX_ITEMS:
            break
    if not items:
        return [], "no comma-separated object names in output"
    return items, None


class LLMExtractor:
    """Object candidates from a causal LM (transformers id or local directory), batched.

    ``model``/``tokenizer`` may be passed directly (tests build tiny random ones).
    """

    source = "llm"

    def __init__(self, vocab: Vocabulary, model_name_or_path: str | None = None, *, model=None, tokenizer=None,
                 device: str = "cpu", batch_size: int = 8, max_new_tokens: int = 32, keep_unknown: bool = True,
                 templates: Sequence[str] = PROMPT_TEMPLATES):
        if model is None or tokenizer is None:
            if not model_name_or_path:
                raise ValueError("LLMExtractor needs candidates.llm_model (a Hugging Face id or a local directory)")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
            model = AutoModelForCausalLM.from_pretrained(model_name_or_path, use_safetensors=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
        self.vocab, self.model, self.tokenizer = vocab, model.to(device).eval(), tokenizer
        self.device, self.batch_size, self.max_new_tokens = device, batch_size, max_new_tokens
        self.keep_unknown, self.templates = keep_unknown, tuple(templates)
        self.failures: list[tuple[int, str]] = []  # (caption index, reason), for reports

    def generate(self, prompts: Sequence[str]) -> list[str]:
        import torch

        outs: list[str] = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[i:i + self.batch_size])
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=256).to(self.device)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return outs

    def extract(self, captions: Sequence[str]) -> list[list[Candidate]]:
        self.failures = []
        prompts = [t.format(caption=(c or "").replace('"', "'")) for c in captions for t in self.templates]
        try:
            answers = self.generate(prompts) if prompts else []
        except Exception as exc:  # a broken model must not kill the shard: record and return nothing
            log.warning("LLM generation failed", extra={"error": repr(exc)})
            self.failures = [(i, f"generation failed: {exc!r}") for i in range(len(captions))]
            return [[] for _ in captions]
        out = []
        nt = len(self.templates)
        for i in range(len(captions)):
            cands, reasons = [], []
            for answer in answers[i * nt:(i + 1) * nt]:
                items, reason = parse_object_list(answer)
                if reason:
                    reasons.append(reason)
                for item in items:
                    c = self.vocab.normalise(item, self.source, self.keep_unknown)
                    if c is not None:
                        cands.append(c)
            if not cands:
                why = "; ".join(sorted(set(reasons))) or "no object names in output"
                self.failures.append((i, why))
                log.info("no LLM candidates", extra={"caption_index": i, "reason": why})
            out.append(dedupe(cands))
        return out


def build_extractor(settings, vocab: Vocabulary):
    """The extractor chosen by ``settings.candidates`` (lexicon unless an LLM is configured)."""
    cfg = settings.candidates
    if cfg.extractor == "llm":
        return LLMExtractor(vocab, cfg.llm_model, device=settings.device, batch_size=cfg.llm_batch_size,
                            max_new_tokens=cfg.llm_max_new_tokens, keep_unknown=cfg.keep_unknown)
    return LexiconExtractor(vocab)
