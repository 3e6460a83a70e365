"""The sparse-pattern plugin contract, for every registered pattern: prefill (torch and Triton) and the training
path against the pattern's float64 reference (GQA, batch > 1 with left padding, odd lengths), gradients, decode
steps, mixed batches, the registry, parameter errors, and the pattern a router is evaluated with."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from flux_kernels.interpret import use_interpreter_without_cuda

use_interpreter_without_cuda()

from flux_kernels.reference import decode_attention_reference, masked_attention_reference, streaming_mask

from flux.attention.backends import BackendError, sparse_attention
from flux.attention.patterns import (
    PATTERNS,
    PatternError,
    PositionalPattern,
    SparsePattern,
    StreamingPattern,
    TrianglePattern,
    XAttentionPattern,
    get_pattern,
    pattern_for_router,
    pattern_from_description,
    sparse_overridden,
)
from flux.attention.patterns.base import padding_layout
from flux.backbone import load_backbone
from flux.model import FluxModel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# small parameters so every rule matters at test lengths; xattn also with a fixed density
PATTERN_CASES = {
    "streaming": StreamingPattern(sink=3, window=9),
    "triangle": TrianglePattern(sink=2, window=7, last_q=11),
    "xattn": XAttentionPattern(block_size=16, stride=4, threshold=0.6),
    "xattn_density": XAttentionPattern(block_size=16, stride=2, density=0.3),
}
# batch, H, Hkv, T, D, pads
SHAPES = [(2, 4, 2, 77, 16, [0, 13]), (3, 6, 2, 50, 32, [4, 0, 31]), (1, 3, 3, 40, 16, None)]


def qkv(batch, heads, kv_heads, length, dim, seed=0, strided=True):
    """q as a transposed view of [B, T, H, D] (HF's layout), keys with one shared direction so xattn's threshold
    keeps fewer than all blocks."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, dim, generator=g).transpose(1, 2)
    if not strided:
        q = q.contiguous()
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    u = torch.randn(dim, generator=g) * 1.5
    k[:, :, 16:32] += u
    return (q + u).to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def pads_of(pads):
    return None if pads is None else torch.tensor(pads, device=DEVICE)


@pytest.mark.parametrize("case", sorted(PATTERN_CASES))
@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,pads", SHAPES)
def test_prefill_matches_reference(case, batch, heads, kv_heads, length, dim, pads):
    pattern = PATTERN_CASES[case]
    q, k, v = qkv(batch, heads, kv_heads, length, dim, seed=length)
    pad = pads_of(pads)
    ref = pattern.reference(q, k, v, pad, 0.3)
    for backend in ("torch", "triton"):
        out = pattern.prefill(q, k, v, pad, 0.3, backend=backend)
        assert out.shape == (batch, heads, length, dim) and out.dtype == q.dtype
        assert out.transpose(1, 2).is_contiguous()  # [B, T, H, D] memory: the o_proj reshape is free
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        for b, p in enumerate(pads or []):
            assert not bool(out[b, :, :p].any())  # padding rows are zeros


@pytest.mark.parametrize("case", sorted(PATTERN_CASES))
@pytest.mark.parametrize("backend", ["reference", "masked_sdpa", "flex"])
def test_training_path_matches_reference(case, backend):
    pattern = PATTERN_CASES[case]
    batch, heads, kv_heads, length, dim, pads = SHAPES[1]
    q, k, v = qkv(batch, heads, kv_heads, length, dim, seed=7)
    valid, pos = padding_layout(pads_of(pads), batch, length, q.device)
    out = pattern.attention(q, k, v, pos, pos, valid, 0.3, backend)
    ref = pattern.reference(q, k, v, pads_of(pads), 0.3)
    real = valid[:, None, :, None].expand_as(out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", sorted(PATTERN_CASES))
def test_training_gradients_match_autograd_through_reference(case):
    """Gradients of q/k/v through the masked training path equal autograd through the float64 reference (real
    rows only: padding rows differ by design and are never read)."""
    pattern = PATTERN_CASES[case]
    batch, heads, kv_heads, length, dim = 2, 4, 2, 37, 16
    pads = torch.tensor([0, 6])
    base = qkv(batch, heads, kv_heads, length, dim, seed=11, strided=False)
    valid, pos = padding_layout(pads.to(DEVICE), batch, length, DEVICE)
    weight = torch.randn(batch, heads, length, dim, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    weight = weight * valid[:, None, :, None]
    grads = {}
    for name in ("path", "reference"):
        leaves = [t.clone().double().requires_grad_(True) for t in base]
        if name == "path":
            out = pattern.attention(*leaves, pos, pos, valid, 0.3, "masked_sdpa")
        else:
            out = pattern.reference(*leaves, pads.to(DEVICE), 0.3)
        (out * weight).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for got, want in zip(grads["path"], grads["reference"]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)


def test_triton_training_backend_refuses_gradients():
    q, k, v = qkv(1, 2, 1, 20, 16)
    pos = torch.arange(20, device=DEVICE)[None]
    with pytest.raises(BackendError, match="'triton' has no backward pass.*use sa_backend='auto', 'masked_sdpa'"):
        StreamingPattern(sink=2, window=4).attention(q.requires_grad_(True), k, v, pos, pos, None, 0.25, "triton")


@pytest.mark.parametrize("case", ["streaming", "triangle", "xattn"])
def test_decode_steps_follow_the_kv_policy(case):
    """A query that is not a whole prompt (Tq < Tk) sees what the engine's decode keeps: sink + window for
    streaming and triangle (no dense band), every causal key for xattn."""
    pattern = PATTERN_CASES[case]
    batch, heads, kv_heads, length, dim = 2, 4, 2, 41, 16
    q, k, v = qkv(batch, heads, kv_heads, length, dim, seed=3)
    pad = torch.tensor([0, 9], device=DEVICE)
    valid, pos = padding_layout(pad, batch, length, DEVICE)
    q1, q_pos = q[:, :, -1:], pos[:, -1:]
    sink, window = pattern.kv_policy() or (0, None)
    kv_pos = pos.masked_fill(~valid, -1)
    want = decode_attention_reference(q1, k, v, sink=sink, window=window, scale=0.3, kv_pos=kv_pos,
                                      q_pos=q_pos[:, 0])
    for backend in ("reference", "masked_sdpa", "flex", "triton"):
        with torch.no_grad():
            got = pattern.attention(q1, k, v, q_pos, pos, valid, 0.3, backend)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", ["triangle", "xattn"])
def test_mixed_batch_routes_each_sample(case):
    pattern = PATTERN_CASES[case]
    length = 96
    q, k, v = qkv(2, 4, 2, length, 16, seed=4)
    pad = torch.tensor([0, 5])
    valid, pos = padding_layout(pad.to(DEVICE), 2, length, DEVICE)
    mixed = sparse_attention(q, k, v, pos, pos, valid, pattern, 0.3, "reference", torch.tensor([True, False]))
    sa = pattern.attention(q, k, v, pos, pos, valid, 0.3, "reference")
    causal = streaming_mask(length, length, pad, 0, None, 2, DEVICE).unsqueeze(1)
    fa = masked_attention_reference(q, k, v, causal, 0.3)
    real = valid[:, None, :, None].expand_as(sa)
    torch.testing.assert_close(mixed[0][real[0]], sa[0][real[0]], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(mixed[1][real[1]], fa[1][real[1]], atol=2e-5, rtol=2e-5)
    assert not torch.allclose(sa[0][real[0]], fa[0][real[0]], atol=1e-3)


def test_triangle_dense_band_is_the_last_real_positions():
    """With left padding the band is the last last_q real tokens of each sample, also for short samples."""
    pattern = TrianglePattern(sink=1, window=2, last_q=5)
    q, k, _ = qkv(2, 2, 1, 12, 16)
    valid, pos = padding_layout(torch.tensor([0, 8], device=DEVICE), 2, 12, DEVICE)
    mask = pattern.mask(q, k, pos, pos, valid, 0.3)
    # sample 0: rows 7..11 dense; sample 1 has 4 real tokens, all in the band: every causal real key
    assert bool(mask[0, 0, 7:].eq(torch.ones(5, 12, dtype=torch.bool, device=DEVICE).tril(7)).all())
    assert int(mask[0, 0, 6].sum()) == 3  # sink 0 + window {5, 6}
    assert bool(mask[1, 0, 8:, 8:].eq(torch.ones(4, 4, dtype=torch.bool, device=DEVICE).tril()).all())


@pytest.mark.parametrize("last_q", [0, 1, 5, 17, 200])
def test_triangle_triton_prefill_for_any_band(last_q):
    """The two-pass Triton prefill (streaming, then the split-K band) for bands of one row, within one query tile,
    across tiles, and longer than the prompt; sample 1 has 8 real tokens, fewer than a 17-row band."""
    pattern = TrianglePattern(sink=2, window=6, last_q=last_q)
    q, k, v = qkv(2, 4, 2, 45, 16, seed=last_q)
    pad = pads_of([3, 37])
    out = pattern.prefill(q, k, v, pad, 0.3, backend="triton")
    torch.testing.assert_close(out, pattern.reference(q, k, v, pad, 0.3), atol=2e-5, rtol=2e-5)
    assert not bool(out[0, :, :3].any()) and not bool(out[1, :, :37].any())  # padding rows are zeros


def test_xattn_density_reports_the_selection():
    pattern = PATTERN_CASES["xattn"]
    q, k, _ = qkv(2, 4, 2, 96, 16, seed=5)
    pad = torch.tensor([0, 20], device=DEVICE)
    density = pattern.selected_density(q, k, pad, 0.3)
    assert 0.0 < density < 1.0
    assert pattern.selected_density(q, k, pad, 0.3, backend="triton") == pytest.approx(density)
    assert dataclasses.replace(pattern, threshold=1.0).selected_density(q, k, pad, 0.3) == pytest.approx(1.0)


def test_kv_policy_and_description():
    assert StreamingPattern().kv_policy() == (128, 2048)
    assert TrianglePattern().kv_policy() == (128, 2048)
    assert XAttentionPattern().kv_policy() is None
    assert StreamingPattern(sink=4, window=8).kv_policy() == (4, 8)
    for pattern in (StreamingPattern(), TrianglePattern(), XAttentionPattern()):
        assert pattern_from_description(pattern.describe()) == pattern
    assert XAttentionPattern().describe() == {"pattern": "xattn", "block_size": 128, "stride": 8, "threshold": 0.9,
                                              "density": None}
    assert TrianglePattern().describe() == {"pattern": "triangle", "sink": 128, "window": 2048, "last_q": 64}


@pytest.mark.parametrize("name,params,message", [
    ("nope", {}, r"unknown sparse pattern 'nope'; registered patterns: streaming, triangle, xattn"),
    ("streaming", {"block_size": 4}, r"'streaming' got unknown parameter\(s\) \['block_size'\]"),
    ("streaming", {"window": 0}, r"streaming window must be an integer >= 1, got 0"),
    ("triangle", {"sink": -1}, r"triangle sink must be an integer >= 0, got -1"),
    ("triangle", {"last_q": -3}, r"triangle last_q must be an integer >= 0, got -3"),
    ("triangle", {"window": 2.5}, r"triangle window must be an integer >= 1, got 2.5"),
    ("xattn", {"block_size": 100}, r"xattn block_size must be a power of two >= 16, got 100"),
    ("xattn", {"block_size": 8}, r"xattn block_size must be an integer >= 16, got 8"),
    ("xattn", {"stride": 0}, r"xattn stride must be an integer >= 1, got 0"),
    ("xattn", {"stride": 3}, r"xattn stride must divide block_size=128, got 3"),
    ("xattn", {"threshold": 0.0}, r"xattn threshold must lie in \(0, 1\], got 0.0"),
    ("xattn", {"threshold": 1.2}, r"xattn threshold must lie in \(0, 1\], got 1.2"),
    ("xattn", {"density": 2}, r"xattn density must be null or lie in \(0, 1\], got 2"),
])
def test_bad_parameters_fail_with_one_clear_error(name, params, message):
    with pytest.raises(PatternError, match=message):
        get_pattern(name, **params)


def test_prefill_backend_errors(monkeypatch):
    pattern = StreamingPattern(sink=2, window=4)
    q, k, v = qkv(1, 2, 1, 20, 16)
    with pytest.raises(PatternError, match="unknown prefill backend 'cuda'; choose one of auto, triton, torch"):
        pattern.prefill(q, k, v, None, 0.25, backend="cuda")
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(PatternError, match="needs CUDA tensors, or TRITON_INTERPRET=1 on CPU"):
            pattern.prefill(q, k, v, None, 0.25, backend="triton")
    with pytest.raises(ValueError, match="prefill attends a whole prompt"):
        pattern.prefill(q[:, :, :5], k, v, None, 0.25)


def test_a_new_pattern_is_one_subclass():
    """Subclassing registers the name; the torch prefill and the training path work from its rule alone."""

    @dataclass(frozen=True)
    class EveryOther(PositionalPattern):
        name: ClassVar[str] = "test_every_other"
        phase: int = 0

        def visible(self, q_pos, k_pos, prompt_len=None):
            return (q_pos - k_pos) % 2 == self.phase

        def reference(self, q, k, v, kv_pad, scale):
            _, pos = padding_layout(kv_pad, q.shape[0], q.shape[2], q.device)
            causal = streaming_mask(q.shape[2], q.shape[2], kv_pad, 0, None, q.shape[0], q.device)
            rule = (pos[:, :, None] - pos[:, None, :]) % 2 == self.phase
            return masked_attention_reference(q, k, v, (causal & rule).unsqueeze(1), scale)

    try:
        pattern = get_pattern("test_every_other", phase=0)
        q, k, v = qkv(2, 4, 2, 30, 16, seed=9)
        pad = torch.tensor([0, 7], device=DEVICE)
        ref = pattern.reference(q, k, v, pad, 0.3)
        torch.testing.assert_close(pattern.prefill(q, k, v, pad, 0.3, backend="torch"), ref, atol=2e-5, rtol=2e-5)
        with pytest.raises(PatternError, match="'test_every_other' has no Triton prefill kernel yet"):
            pattern.prefill(q, k, v, pad, 0.3, backend="triton")
        with pytest.raises(PatternError, match="name 'streaming' is taken by"):
            type("Clash", (SparsePattern,), {"name": "streaming", "__annotations__": {}})
    finally:
        PATTERNS.pop("test_every_other", None)


def test_router_is_evaluated_with_its_own_pattern():
    cfg_pattern = StreamingPattern(sink=64, window=256)
    meta = {"sparse": {"pattern": "triangle", "sink": 16, "window": 32, "last_q": 8}}
    assert pattern_for_router(meta, cfg_pattern, explicitly_overridden=False) == TrianglePattern(16, 32, 8)
    assert pattern_for_router(meta, cfg_pattern, explicitly_overridden=True) is cfg_pattern
    assert pattern_for_router({}, cfg_pattern, explicitly_overridden=False) is cfg_pattern
    with pytest.raises(PatternError, match="unknown sparse pattern 'gone'"):
        pattern_for_router({"sparse": {"pattern": "gone"}}, cfg_pattern, explicitly_overridden=False)
    assert sparse_overridden(["sparse=xattn", "eval=ruler"])
    assert sparse_overridden(["+sparse.window=512"])
    assert not sparse_overridden(["routing.mode=router", "sparse_quickstart=none", "eval.task.n=2"])


@pytest.mark.parametrize("case", ["triangle", "xattn"])
def test_flux_model_triton_backend_matches_reference_backend(case):
    """Inside FluxModel with a mixed plan: the Triton path (prefill kernel per pattern, then decode) gives the same
    logits and greedy tokens as the float64 reference backend."""
    bb = load_backbone("tiny_random", family="llama", tiny={"num_layers": 2}, device=DEVICE, dtype="float32")
    pattern = TrianglePattern(sink=2, window=5, last_q=3) if case == "triangle" else \
        XAttentionPattern(block_size=16, stride=4, threshold=0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, bb.config.vocab_size, (2, 37), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    fm = FluxModel(bb, pattern=pattern, sa_backend="reference")
    results = {}
    for backend in ("reference", "triton"):
        fm.sa_backend = backend
        with torch.no_grad():
            logits = fm(ids, mask, plan=[True, False]).logits
        results[backend] = logits, fm.generate(ids, mask, plan=[True, False], max_new_tokens=4).sequences
    tolerance = 5e-3 if DEVICE == "cuda" else 1e-4
    assert (results["triton"][0] - results["reference"][0])[mask.bool()].abs().max() < tolerance
    assert torch.equal(results["triton"][1], results["reference"][1])
