import json
import logging

import pytest
import torch

from ovtasks.pseudolabel.candidates import (
    OPEN_VOCAB_ID_BASE,
    LexiconExtractor,
    LLMExtractor,
    Vocabulary,
    open_vocab_id,
    parse_object_list,
)


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.load(None)


def test_lexicon_matches_names_synonyms_plurals_and_multiword(vocab):
    ex = LexiconExtractor(vocab)
    [a, b, c, d] = ex.extract([
        "Two red balls and a crate on a striped background",
        "a love heart next to some toadstools",
        "IMG_1234.jpg",
        "",
    ])
    assert [x.name for x in a] == ["ball", "box"]
    assert {x.phrase for x in a} == {"balls", "crate"}
    assert [x.name for x in b] == ["heart", "mushroom"]  # "love heart" (two words) and a synonym plural
    assert c == [] and d == []  # no object words / empty caption: no candidates, no error
    assert all(x.known and x.source == "lexicon" for x in a + b)


def test_lexicon_merges_synonyms_of_one_category(vocab):
    [cands] = LexiconExtractor(vocab).extract(["a sphere, an orb and three balls"])
    assert [c.name for c in cands] == ["ball"]


def test_word_boundaries(vocab):
    # "boxer" is not a box, "starling" not a star
    [cands] = LexiconExtractor(vocab).extract(["a boxer watching a starling"])
    assert cands == []


def test_normalise_unknown_names_are_open_vocabulary(vocab):
    c = vocab.normalise("Two shiny Wheels", "llm")
    assert c.name == "wheel" and not c.known and c.category_id == open_vocab_id("wheel") >= OPEN_VOCAB_ID_BASE
    assert vocab.normalise("the leaves", "llm").name == "leaf"  # plural of a known name
    assert vocab.normalise("blue doughnuts", "llm").name == "ring"  # synonym plural
    assert vocab.normalise("wheels", "llm", keep_unknown=False) is None
    assert vocab.normalise("the a of", "llm") is None  # no content word


def test_vocabulary_file_roundtrip_and_errors(tmp_path, vocab):
    p = tmp_path / "v.json"
    p.write_text(json.dumps({"categories": vocab.to_records()}))
    assert Vocabulary.load(p).names() == vocab.names()
    y = tmp_path / "v.yaml"
    y.write_text("- {id: 1, name: cat, synonyms: [kitty]}\n- {id: 2, name: dog, plural: dogs}\n")
    v = Vocabulary.load(y)
    assert [c.name for c in LexiconExtractor(v).extract(["kitty and dogs"])[0]] == ["cat", "dog"]
    y.write_text("- {id: 1, name: cat, synonyms: [pet]}\n- {id: 2, name: dog, synonyms: [pet]}\n")
    with pytest.raises(ValueError, match="pet"):
        Vocabulary.load(y)
    y.write_text("- {name: cat}\n")
    with pytest.raises(ValueError, match="id"):
        Vocabulary.load(y)


@pytest.mark.parametrize("text,items", [
    (" ball, red box, leaves\n\nCaption: ignored", ["ball", "red box", "leaves"]),
    ("1. wheel 2. window 3) door", ["wheel", "window", "door"]),
    ("- tree\n- leaf\n* branch", ["tree", "leaf", "branch"]),
    ("a cat and a dog", ["a cat", "a dog"]),
])
def test_parse_object_list(text, items):
    got, reason = parse_object_list(text)
    assert got == items and reason is None


@pytest.mark.parametrize("text", ["", "   ", None, "!!! ??? ...",
                                  "This is a very long sentence that does not list any object names at all"])
def test_parse_malformed_output_is_empty_with_reason(text):
    got, reason = parse_object_list(text)
    assert got == [] and reason


def _tiny_lm(tmp_path):
    """A random 2-layer GPT-2 with a word-level tokenizer built here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", ",", "ball", "box", "wheel", "tree", "caption", "objects", "list", "the", "a", ":", '"', "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=512, n_embd=16, n_layer=2, n_head=2,
                                       eos_token_id=0, bos_token_id=0))
    model.save_pretrained(tmp_path / "lm")
    fast.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


def test_llm_extractor_loads_from_directory_and_never_crashes(tmp_path, vocab, caplog):
    path = _tiny_lm(tmp_path)
    ex = LLMExtractor(vocab, str(path), batch_size=2, max_new_tokens=6)
    captions = ["a ball on the tree", "", "box", "wheel wheel"]
    with caplog.at_level(logging.INFO):
        out = ex.extract(captions)
    assert len(out) == len(captions)
    for cands in out:
        assert all(c.source == "llm" and c.name for c in cands)
        assert len({c.name for c in cands}) == len(cands)  # deduplicated
    failed = {i for i, _ in ex.failures}
    assert all(out[i] == [] for i in failed)  # a failure is an empty list with a recorded reason


def test_llm_extractor_parses_and_normalises_model_answers(vocab):
    class Scripted(LLMExtractor):
        def __init__(self, answers):  # no model: only the parsing/normalising path
            self.vocab, self.keep_unknown, self.templates, self.failures = vocab, True, ("{caption}", "{caption} 2"), []
            self._answers = answers

        def generate(self, prompts):
            return self._answers[: len(prompts)]

    ex = Scripted(["Balls, a crate, wheels", "leaves and a stem", "", "<<>> ### 42"])
    a, b = ex.extract(["x", "y"])
    assert [c.name for c in a] == ["ball", "box", "wheel", "leaf", "stem"]
    assert [c.known for c in a] == [True, True, False, True, False]
    assert b == [] and ex.failures and ex.failures[0][0] == 1


def test_llm_generation_failure_is_recorded_not_raised(vocab):
    class Broken(LLMExtractor):
        def __init__(self):
            self.vocab, self.keep_unknown, self.templates, self.failures = vocab, True, ("{caption}",), []

        def generate(self, prompts):
            raise RuntimeError("CUDA out of memory")

    ex = Broken()
    assert ex.extract(["a ball", "a box"]) == [[], []]
    assert len(ex.failures) == 2 and "out of memory" in ex.failures[0][1]


@pytest.mark.parametrize("caption, counts", [
    ("Two red balls and a crate on a striped background", {"ball": 2, "box": 1}),
    ("three small light blue stars, four hearts", {"star": 3, "heart": 4}),
    ("a pair of spheres", {"ball": 2}),
    ("balls", {"ball": 2}),  # a bare plural: at least two
    ("a photo of 12 rings", {"ring": 10}),  # digits, believed up to MAX_COUNT
    ("two photos of a ball", {"ball": 1}),  # the number belongs to another word
    ("a ball ... and two more balls", {"ball": 2}),  # the largest count of any mention
    ("IMG_2.jpg star", {"star": 1}),
])
def test_counts_from_the_caption(vocab, caption, counts):
    [cands] = LexiconExtractor(vocab).extract([caption])
    assert {c.name: c.count for c in cands} == counts
    phrase = caption.split(",")[0]
    assert vocab.normalise(phrase, "llm").count == counts[vocab.normalise(phrase, "llm").name]  # the LLM's phrases too
