import numpy as np
import pytest


def test_minilm_offline_embeddings_and_cache(tmp_path):
    from ovtasks.models.text_encoder import TextEncoder

    enc = TextEncoder("minilm")
    names = ["ball", "sphere", "mushroom", "toadstool"]
    e = enc.encode(names, cache_dir=tmp_path)
    assert e.shape == (4, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[3]  # real weights: synonyms are closer than unrelated names
    assert e[2] @ e[3] > e[2] @ e[1]
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(TextEncoder("minilm").encode(names, cache_dir=tmp_path), e)
    assert enc.encode([]).shape == (0, 384)


def test_clip_text_tower_from_local_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    from ovtasks.models.text_encoder import TextEncoder

    words = ["<pad>", "<unk>", "a", "photo", "of", "ball", "box"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    cfg = CLIPTextConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, projection_dim=8, max_position_embeddings=16, pad_token_id=0,
                         eos_token_id=1, bos_token_id=1)
    CLIPTextModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    fast.save_pretrained(tmp_path / "clip")
    enc = TextEncoder(str(tmp_path / "clip"))
    e = enc.encode(["ball", "box"], cache_dir=tmp_path / "cache")
    assert enc.kind == "clip" and e.shape == (2, 8) and enc.dim == 8


def test_unknown_model_id_fails_offline():
    from ovtasks.models.text_encoder import TextEncoder

    with pytest.raises(Exception):
        TextEncoder("no-such-org/no-such-clip-model")
