"""open_clip text encoder: embeddings, masks, truncation, local checkpoints only."""
from __future__ import annotations

import socket

import open_clip
import pytest
import torch

from model import TextEmbedding
from model.config import TextConfig
from model.text import TextEncoder

# The cheapest standard open_clip architecture that needs no extra packages (~43M parameters).
STANDARD_NAME = "ViT-S-32-alt"


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TextConfig(model_name="longshot-text-tiny")).eval()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a host fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_per_token_and_pooled_embeddings(encoder):
    prompts = ["a red car", "waves breaking on a rocky shore at dusk"]
    with torch.no_grad():
        emb = encoder.encode(prompts)
    assert isinstance(emb, TextEmbedding) and len(emb) == 2
    length = encoder.context_length
    assert emb.tokens.shape == (2, length, encoder.width) == (2, 16, 32)
    assert emb.pooled.shape == (2, encoder.embed_dim) == (2, 32)
    assert emb.mask.shape == (2, length) and emb.mask.dtype == torch.bool
    assert torch.isfinite(emb.tokens).all() and torch.isfinite(emb.pooled).all()
    # Different prompts, different embeddings.
    assert (emb.pooled[0] - emb.pooled[1]).abs().amax() > 1e-4


def test_mask_marks_the_real_tokens(encoder):
    prompts = ["a cat", "a lighthouse on a cliff above the sea"]
    with torch.no_grad():
        emb = encoder.encode(prompts)
    for row, prompt in zip(emb.mask, prompts):
        real = len(encoder.tokenizer.encode(prompt)) + 2  # start and end-of-text tokens
        assert row[:real].all() and not row[real:].any()


def test_over_long_prompt_is_truncated_with_a_warning(encoder):
    prompt = "a very long and winding road " * 20
    with pytest.warns(UserWarning, match=r"prompt: \d+ tokens exceed .* limit of 14; truncated"):
        with torch.no_grad():
            emb = encoder.encode([prompt])
    assert emb.tokens.shape == (1, 16, 32)
    assert emb.mask.all()


def test_generator_encodes_text_with_the_same_shapes(tiny_gen):
    emb = tiny_gen.encode_text(["a cat", "a dog"])
    assert emb.tokens.shape == (2, 16, tiny_gen.model.text.width)
    assert emb.pooled.shape == (2, tiny_gen.model.text.embed_dim)
    again = tiny_gen.encode_text(["a dog"])
    torch.testing.assert_close(again.pooled[0], emb.pooled[1], rtol=0, atol=0)


def test_unknown_model_name_is_rejected():
    with pytest.raises(ValueError, match=r"text.model_name: unknown open_clip model 'no-such-clip'"):
        TextEncoder(TextConfig(model_name="no-such-clip"))


@pytest.mark.parametrize("pretrained", ["missing/clip.pt", "openai"])
def test_standard_name_without_local_file_says_which_file(tmp_path, no_network, pretrained):
    path = tmp_path / pretrained
    with pytest.raises(FileNotFoundError) as info:
        TextEncoder(TextConfig(model_name=STANDARD_NAME, pretrained=str(path)))
    message = str(info.value)
    assert str(path) in message
    assert "never downloaded" in message and "copy the checkpoint file there" in message


def test_standard_name_loads_a_local_checkpoint_without_network(tmp_path, monkeypatch):
    torch.manual_seed(123)
    reference = open_clip.create_model(STANDARD_NAME)
    # Half precision keeps the file small; loading copies it into the fp32 model.
    state = {k: v.half() for k, v in reference.state_dict().items()}
    path = tmp_path / "vit-s-32-alt.pt"
    torch.save(state, path)
    del reference

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    torch.manual_seed(999)  # a different random init, so equality below proves the file was loaded
    encoder = TextEncoder(TextConfig(model_name=STANDARD_NAME, pretrained=str(path))).eval()
    loaded = encoder.clip.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key].half(), value), key
    with torch.no_grad():
        emb = encoder.encode(["a cat on a mat"])
    assert emb.tokens.shape == (1, 77, encoder.width) == (1, 77, 256)
    assert emb.pooled.shape == (1, encoder.embed_dim) == (1, 256)
    assert emb.mask[0].sum() == len(encoder.tokenizer.encode("a cat on a mat")) + 2
