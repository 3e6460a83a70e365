"""Per-layer dispatch against exact references: stock transformers for FA, a dense-mask eager path for SA."""

from __future__ import annotations

import copy

import pytest
import torch

from flux.attention.backends import BackendError, eager_attention, flex_sparse_attention, sparse_attention
from flux.attention.masks import position_mask
from flux.attention.patterns import PatternError, StreamingPattern, get_pattern
from flux.backbone import load_backbone
from flux.model import FluxModel, real_positions
from flux.plan import PlanError


def _padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), t), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, t - n:] = 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_all_fa_matches_stock_sdpa(family):
    bb = load_backbone("tiny_random", family=family)
    stock = copy.deepcopy(bb.model)
    stock.set_attn_implementation("sdpa")
    fm = FluxModel(bb, pattern=StreamingPattern(sink=4, window=8))
    ids, mask = _padded_batch(bb.config.vocab_size, [37, 29])
    ours = fm(ids, mask, plan="dense").logits
    ref = stock(input_ids=ids, attention_mask=mask, position_ids=real_positions(mask)).logits
    real = mask.bool()
    assert (ours - ref)[real].abs().max().item() <= 1e-5


def _streaming_reference(q, k, v, q_pos, k_pos, k_valid, sink, window, scaling):
    """Float64 reference built independently of position_mask: the rule written out row by row."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    groups = h // k.shape[1]
    k = k.double().repeat_interleave(groups, 1)
    v = v.double().repeat_interleave(groups, 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * scaling
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for bi in range(b):
        kp = k_pos[bi]
        real = torch.ones(tk, dtype=torch.bool) if k_valid is None else k_valid[bi]
        for i in range(tq):
            p = int(q_pos[bi, i])
            keep = real & (kp <= p) & ((kp < sink) | (p - kp < window))
            if not keep.any():
                continue
            w = scores[bi, :, i, keep].softmax(-1)
            out[bi, :, i] = torch.einsum("hn,hnd->hd", w, v[bi, :, keep])
    return out


@pytest.mark.parametrize("tq,heads,kv_heads,sink,window", [(67, 6, 2, 4, 16), (130, 4, 4, 0, 33), (45, 9, 3, 16, 64)])
@pytest.mark.parametrize("backend", ["reference", "masked_sdpa", "flex"])
def test_streaming_backends_match_reference(tq, heads, kv_heads, sink, window, backend):
    torch.manual_seed(tq + heads)
    b, d = 2, 32
    q = torch.randn(b, heads, tq, d)
    k = torch.randn(b, kv_heads, tq, d)
    v = torch.randn(b, kv_heads, tq, d)
    mask = torch.ones(b, tq, dtype=torch.long)
    mask[1, :11] = 0
    pos = real_positions(mask)
    valid = mask.bool()
    pattern = StreamingPattern(sink=sink, window=window)
    scaling = d ** -0.5
    ref = _streaming_reference(q, k, v, pos, pos, valid, sink, window, scaling)
    if backend == "flex":
        out = flex_sparse_attention(q, k, v, pos, pos, valid, pattern, scaling)
    else:
        out = sparse_attention(q, k, v, pos, pos, valid, pattern, scaling, backend)
    real = valid[:, None, :, None].expand_as(out)
    assert torch.isfinite(out).all()
    assert (out.double() - ref)[real].abs().max().item() < 2e-5


def test_flex_unpadded_matches_reference_and_caches_mask():
    from flux.attention import backends

    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 150, 16), torch.randn(1, 2, 150, 16), torch.randn(1, 2, 150, 16)
    pos = torch.arange(150)[None]
    pattern = StreamingPattern(sink=3, window=20)
    out = flex_sparse_attention(q, k, v, pos, pos, None, pattern, 0.25)
    ref = _streaming_reference(q, k, v, pos, pos, None, 3, 20, 0.25)
    assert (out.double() - ref).abs().max().item() < 2e-5
    n = len(backends._FLEX_MASKS)
    flex_sparse_attention(q, k, v, pos, pos, None, pattern, 0.25)
    assert len(backends._FLEX_MASKS) == n


def test_mixed_batch_routes_each_sample():
    """Sample 0 on SA and sample 1 on FA in one call equals running each alone."""
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    pos = torch.arange(40).expand(2, 40)
    pattern = StreamingPattern(sink=2, window=5)
    mixed = sparse_attention(q, k, v, pos, pos, None, pattern, 0.25, "reference", torch.tensor([True, False]))
    sa = eager_attention(q, k, v, pattern.mask(q, k, pos, pos, None, 0.25), 0.25)
    fa = eager_attention(q, k, v, position_mask(pos, pos, None, None), 0.25)
    assert torch.allclose(mixed[0], sa[0], atol=1e-6) and torch.allclose(mixed[1], fa[1], atol=1e-6)
    assert not torch.allclose(sa[0], fa[0], atol=1e-3)


def test_gates_mix_branches_linearly():
    bb = load_backbone("tiny_random", tiny={"num_layers": 2})
    fm = FluxModel(bb, pattern=StreamingPattern(sink=1, window=4))
    ids, mask = _padded_batch(bb.config.vocab_size, [30, 30])
    dense = fm(ids, mask, plan="dense").logits
    sparse = fm(ids, mask, plan="sparse").logits
    gated_fa = fm(ids, mask, plan=torch.ones(2, 2)).logits
    gated_sa = fm(ids, mask, plan=torch.zeros(2, 2)).logits
    assert torch.allclose(gated_fa, dense, atol=1e-5) and torch.allclose(gated_sa, sparse, atol=1e-5)
    half = fm(ids, mask, plan=torch.full((2, 2), 0.5))
    assert half.gates is not None and half.gates.shape == (2, 2)
    assert not torch.allclose(dense, sparse, atol=1e-3)


def test_bad_values_raise_clear_errors():
    with pytest.raises(PatternError, match="window must be an integer >= 1, got 0"):
        StreamingPattern(sink=4, window=0)
    with pytest.raises(PatternError, match="sink must be an integer >= 0, got -1"):
        StreamingPattern(sink=-1, window=8)
    with pytest.raises(PatternError, match="unknown sparse pattern 'nope'"):
        get_pattern("nope")
    bb = load_backbone("tiny_random", tiny={"num_layers": 3, "max_positions": 64})
    with pytest.raises(BackendError, match="unknown FA backend"):
        FluxModel(bb, fa_backend="cuda-magic")
    fm = FluxModel(bb)
    ids = torch.randint(3, 200, (1, 10))
    with pytest.raises(PlanError, match="plan has 2 entries but the backbone has 3 layers"):
        fm(ids, plan=[True, False])
    from flux.model import InputError

    with pytest.raises(InputError, match="exceed the backbone's 64 positions"):
        fm(torch.randint(3, 200, (1, 65)))
    with pytest.raises(InputError, match="exceed the backbone's 64 positions"):
        fm.generate(torch.randint(3, 200, (1, 40)), max_new_tokens=30)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["masked_sdpa", "flex"])
def test_streaming_backends_on_cuda_real_shapes(backend):
    """bf16 at a real head layout (28 q / 4 kv heads, head dim 128) against an fp32 masked reference."""
    torch.manual_seed(0)
    b, h, hk, t, d = 2, 28, 4, 3000, 128
    dev = torch.device("cuda")
    q = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hk, t, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hk, t, d, device=dev, dtype=torch.bfloat16)
    mask = torch.ones(b, t, dtype=torch.long, device=dev)
    mask[1, :517] = 0
    pos, valid = real_positions(mask), mask.bool()
    pattern = StreamingPattern(sink=128, window=1024)
    out = sparse_attention(q, k, v, pos, pos, valid, pattern, d ** -0.5, backend).float()
    ref = eager_attention(q.float(), k.float(), v.float(), pattern.mask(q, k, pos, pos, valid, d ** -0.5),
                          d ** -0.5)
    real = valid[:, None, :, None].expand_as(out)
    rel = (out - ref)[real].norm() / ref[real].norm()
    assert rel.item() < 1e-2
