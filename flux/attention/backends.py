"""Attention backends for the two branches. All take HF layout q [B, H, Tq, D], k/v [B, Hkv, Tk, D] and return
[B, H, Tq, D]. Full attention (FA): flash-attn when importable, else torch SDPA, or eager on request; padded calls at
long lengths on CUDA take FlexAttention, whose block mask never holds [Tq, Tk]. Sparse attention (SA): the exact
reference, SDPA with a dense boolean mask, FlexAttention with a cached block mask, or Triton kernels.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from flux.attention.masks import position_mask
from flux.errors import FluxUserError

if TYPE_CHECKING:  # patterns import this module; the type is only needed for annotations
    from flux.attention.patterns import SparsePattern

FA_BACKENDS = ("auto", "flash_attn", "sdpa", "eager", "flex")
SA_BACKENDS = ("auto", "reference", "masked_sdpa", "flex", "triton")
FLEX_MIN_TOKENS = 16384


class BackendError(FluxUserError):
    """An attention backend was asked for that does not exist or cannot run here."""


def dense_mask_too_big(tq: int, tk: int) -> bool:
    """Whether a call is too long for a dense [Tq, Tk] mask: from FLEX_MIN_TOKENS² elements per sample (16k² bool is
    256 MiB, 128k² 16 GiB, and a masked kernel may build a float bias of the same shape). Such calls take
    FlexAttention on CUDA, and a batch that mixes FA and SA samples is split by rows instead of masked."""
    return tq * tk >= FLEX_MIN_TOKENS ** 2


def check_backend(kind: str, name: str) -> str:
    allowed = FA_BACKENDS if kind == "fa" else SA_BACKENDS
    if name not in allowed:
        raise BackendError(f"unknown {kind.upper()} backend {name!r}; choose one of {', '.join(allowed)}")
    return name


@lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, is_causal: bool = False) -> torch.Tensor:
    """Plain matmul-softmax-matmul with fp32 softmax: the definition the other backends are checked against."""
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    if is_causal:
        tq, tk = q.shape[2], k.shape[2]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scaling: float, is_causal: bool = False) -> torch.Tensor:
    """SDPA. With a mask, GQA heads are expanded explicitly: SDPA's memory-efficient kernel takes masks but not
    `enable_gqa`, and the math fallback it would pick instead materialises [B, H, Tq, Tk] scores (22 GB at batch 60
    x 4k tokens on SmolLM2)."""
    groups = q.shape[1] // k.shape[1]
    if mask is not None and groups > 1:
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling,
                                          enable_gqa=mask is None and groups > 1)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                    is_causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scaling,
                          causal=is_causal)
    return out.transpose(1, 2)


def memo_mask(memo: dict | None, q_pos: torch.Tensor, k_pos: torch.Tensor,
              k_valid: torch.Tensor | None) -> torch.Tensor:
    """The full-attention position_mask, computed once per forward for each distinct (positions, validity) and
    reused by every layer that shares those tensors (the routed cache shares them per layout)."""
    if memo is None:
        return position_mask(q_pos, k_pos, k_valid)
    key = (id(q_pos), id(k_pos), id(k_valid))
    if key not in memo:
        memo[key] = position_mask(q_pos, k_pos, k_valid)
    return memo[key]


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   k_valid: torch.Tensor | None, scaling: float, backend: str, memo: dict | None = None) -> torch.Tensor:
    """Causal attention over every real key. Unpadded inputs take the mask-free kernels (is_causal or decode);
    padded ones a masked kernel, or FlexAttention (asked for, or `auto` on CUDA where a dense mask is too big)."""
    tq, tk = q.shape[2], k.shape[2]
    if backend == "flex" or (backend == "auto" and q.is_cuda and k_valid is not None and dense_mask_too_big(tq, tk)):
        return flex_full_attention(q, k, v, q_pos, k_pos, k_valid, scaling)
    maskless = k_valid is None and (tq == tk or tq == 1)
    if maskless:
        causal = tq > 1
        if backend in ("auto", "flash_attn") and flash_attn_available() and q.dtype in (torch.float16, torch.bfloat16):
            return flash_attention(q, k, v, scaling, causal)
        if backend == "eager":
            return eager_attention(q, k, v, None, scaling, is_causal=causal)
        return sdpa_attention(q, k, v, None, scaling, is_causal=causal)
    mask = memo_mask(memo, q_pos, k_pos, k_valid)
    attend = eager_attention if backend == "eager" else sdpa_attention
    return attend(q, k, v, mask, scaling)


_FLEX_MASKS: OrderedDict[tuple, object] = OrderedDict()
_FLEX_CACHE_SIZE = 32


@lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    """FlexAttention compiled with torch.compile's automatic dynamic shapes: the first call compiles for its shape,
    the first call at another length recompiles with the lengths symbolic, and that kernel serves every later
    length. Training data of many lengths would otherwise compile once per length, and past dynamo's recompile
    limit fall back to the unfused path, whose [T, T] scores do not fit at 32k+."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=None)


def _flex_fn(device: torch.device) -> Callable:
    """Compiled on CUDA (the fused kernel); eager on CPU, where it falls back to an exact math path for tests."""
    if device.type == "cuda":
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def sparse_block_mask(pattern: SparsePattern, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor | None,
                      k_pos: torch.Tensor | None, k_valid: torch.Tensor | None, scale: float):
    """FlexAttention block mask of an SA call from the pattern's mask_mod. Masks the pattern marks cacheable
    (positional rules on unpadded calls) are kept per (pattern, lengths, device); the others are built per call.
    On CUDA the mask is built by the compiled path, which walks the sequence in blocks, so a 128k mask never
    exists densely."""
    mask_mod, cache_key = pattern.flex_mask_mod(q, k, q_pos, k_pos, k_valid, scale)
    return cached_block_mask(mask_mod, cache_key, q, k, per_head=not pattern.positional)


def cached_block_mask(mask_mod: Callable, cache_key: object | None, q: torch.Tensor, k: torch.Tensor,
                      per_head: bool):
    """FlexAttention block mask of `mask_mod`; a mask with a cache key (one that depends on the lengths only) is
    kept per (key, device) and serves the whole batch, a mask without one is built per call and per sample."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = None if cache_key is None else (cache_key, str(q.device))
    if key is not None and key in _FLEX_MASKS:
        _FLEX_MASKS.move_to_end(key)
        return _FLEX_MASKS[key]
    batch = None if cache_key is not None else q.shape[0]
    heads = q.shape[1] if per_head else None
    block_mask = create_block_mask(mask_mod, batch, heads, q.shape[2], k.shape[2], device=q.device,
                                   _compile=q.device.type == "cuda")
    if key is not None:
        _FLEX_MASKS[key] = block_mask
        if len(_FLEX_MASKS) > _FLEX_CACHE_SIZE:
            _FLEX_MASKS.popitem(last=False)
    return block_mask


def full_mask_mod(tq: int, tk: int, q_pos: torch.Tensor | None, k_pos: torch.Tensor | None,
                  k_valid: torch.Tensor | None) -> tuple[Callable, object | None]:
    """(mask_mod, cache key) of full causal attention over real keys, written over indices: the position_mask rule
    without the [Tq, Tk] tensor. Unpadded calls are causal by index (queries aligned to the last keys)."""
    if k_valid is None:
        offset = tk - tq

        def causal(b, h, qi, ki):
            return ki <= qi + offset

        return causal, ("full", tq, tk)

    def padded(b, h, qi, ki):
        return k_valid[b, ki] & (k_pos[b, ki] <= q_pos[b, qi])

    return padded, None


def run_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scaling: float) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _flex_fn(q.device)(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


def flex_full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None,
                        k_pos: torch.Tensor | None, k_valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Full causal attention through FlexAttention (differentiable): the padded long-sequence FA path. A query row
    of padding sees the first real key (its clamped position is 0), so no row is empty; its output is never read."""
    mask_mod, cache_key = full_mask_mod(q.shape[2], k.shape[2], q_pos, k_pos, k_valid)
    return run_flex(q, k, v, cached_block_mask(mask_mod, cache_key, q, k, per_head=False), scaling)


def flex_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None,
                          k_pos: torch.Tensor | None, k_valid: torch.Tensor | None, pattern: SparsePattern,
                          scaling: float) -> torch.Tensor:
    """The pattern through FlexAttention (differentiable). Positions may be None for unpadded calls."""
    return run_flex(q, k, v, sparse_block_mask(pattern, q, k, q_pos, k_pos, k_valid, scaling), scaling)


def resolve_sparse_backend(pattern: SparsePattern, backend: str, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor) -> str:
    """The SA backend that runs `pattern` for this call. `auto`: the measured choice (experiments/speed/README.md,
    H100) among the backends the pattern supports: the Triton kernels wherever they apply (CUDA, no gradient:
    they have no backward); FlexAttention for long training sequences (it compiles per shape, seconds for every
    new length, so only where a dense mask would not fit); the masked SDPA path otherwise (CPU, short training
    batches). An explicit backend that cannot run the call fails with what to use instead."""
    check_backend("sa", backend)
    supported = pattern.backends
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if backend == "auto":
        if q.is_cuda and not needs_grad and "triton" in supported:
            return "triton"
        if q.is_cuda and needs_grad and dense_mask_too_big(q.shape[2], k.shape[2]) and "flex" in supported:
            return "flex"
        for name in ("masked_sdpa", "reference", "flex"):
            if name in supported:
                return name
        raise BackendError(f"no SA backend can run sparse pattern {pattern.name!r} (it supports {supported})")
    if backend not in supported:
        raise BackendError(f"SA backend {backend!r} cannot run sparse pattern {pattern.name!r}; use one of "
                           f"{', '.join(supported)} (or 'auto')")
    if backend == "triton":
        if needs_grad:
            raise BackendError(f"SA backend 'triton' has no backward pass, but this {pattern.name!r} call needs "
                               "gradients (training); use sa_backend='auto', 'masked_sdpa' or 'flex'")
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError("SA backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU, for tests); "
                               "use sa_backend='auto' or 'masked_sdpa' on CPU")
    return backend


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     k_valid: torch.Tensor | None, pattern: SparsePattern, scaling: float, backend: str,
                     sa_rows: torch.Tensor | None = None, memo: dict | None = None) -> torch.Tensor:
    """The pattern's attention. `sa_rows` limits the pattern to some samples (a mixed batch): one masked call
    (the reference backend when asked for, masked SDPA otherwise)."""
    if sa_rows is None:
        return pattern.attention(q, k, v, q_pos, k_pos, k_valid, scaling, backend, memo)
    check_backend("sa", backend)
    mask = pattern.mask(q, k, q_pos, k_pos, k_valid, scaling, sa_rows, memo)
    attend = eager_attention if backend == "reference" else sdpa_attention
    return attend(q, k, v, mask, scaling)
