"""The sparse-pattern plugin contract, its registry, and the machinery every pattern shares.

A pattern says which keys a query sees when its layer is routed to sparse attention (SA). It is a frozen dataclass
whose fields are its parameters; subclassing `SparsePattern` with a `name` registers it, so adding a pattern is one
module in this package plus `conf/sparse/<name>.yaml`. A pattern provides:

* `prompt_rule`: which keys each query of a whole prompt may see (the one method a new pattern must write);
* `reference`: its float64 definition (tests only);
* `kv_policy`: what a layer routed to it keeps for decode — (sink, window) or the full KV;
* `prefill`: inference attention of a left-padded prompt (Triton kernels on CUDA, a chunked masked-SDPA torch
  path on CPU); the torch path here works for any rule, so a new pattern runs before it has a kernel;
* `attention`: the differentiable training path behind the dispatcher (reference / masked_sdpa / flex), plus
  the Triton kernels when no gradient is needed.

Queries that are not a whole prompt (a decode step, Tq < Tk) follow the KV policy: a (sink, window) pattern shows
the sinks and the window, a full-KV pattern every causal key. That is exactly what the engine's decode sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from flux.attention import backends
from flux.attention.masks import position_mask
from flux.errors import FluxUserError

# (lo, hi) -> bool [B, 1 or H, hi - lo, Tk]: the rule for query rows lo..hi-1 (None: every key, i.e. no rule)
RowRule = Callable[[int, int], torch.Tensor]
PREFILL_BACKENDS = ("auto", "triton", "torch")
# bool elements of one masked-SDPA chunk of the torch prefill path (its fp32 scores are 4x this in bytes)
TORCH_CHUNK_ELEMENTS = 1 << 25


class PatternError(FluxUserError):
    """A sparse pattern was asked for with an unknown name or invalid parameters."""


PATTERNS: dict[str, type[SparsePattern]] = {}


def check_int(pattern: str, field: str, value: Any, minimum: int, example: str) -> None:
    """One clear error for a parameter that must be an integer >= minimum (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PatternError(f"{pattern} {field} must be an integer >= {minimum}, got {value!r}; use e.g. {example}")


@dataclass(frozen=True)
class SparsePattern:
    """Base class. Subclasses set `name`, declare their parameters as fields, and implement `prompt_rule` and
    `reference`; `kv_policy` and the kernels are optional (defaults: full KV, the torch path)."""

    name: ClassVar[str] = ""
    # True when the mask depends only on positions (not on q/k): one mask then serves every layer of a forward
    positional: ClassVar[bool] = False
    # True when a query's keys depend only on positions up to its own (not on where the prompt ends): the engine
    # may then run `prefill_rows` on chunks of queries and overwrite each chunk's queries with its output
    chunkable_queries: ClassVar[bool] = False
    # SA backends that can run this pattern ('auto' chooses among them)
    backends: ClassVar[tuple[str, ...]] = ("reference", "masked_sdpa", "flex", "triton")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not name:
            return
        known = PATTERNS.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise PatternError(f"sparse pattern name {name!r} is taken by {known.__module__}.{known.__qualname__}; "
                               f"give {cls.__module__}.{cls.__qualname__} another name")
        PATTERNS[name] = cls  # a module reload replaces its own class

    # ----------------------------------------------------------------------------------------- description
    def describe(self) -> dict[str, Any]:
        """{"pattern": name, **params}: what results.json and router.json record."""
        return {"pattern": self.name, **asdict(self)}

    def kv_policy(self) -> tuple[int, int] | None:
        """(sink, window) when decode needs only the first `sink` and the last `window` real tokens (the engine keeps
        them in a sink + ring cache, all visible to the decode query); None when decode attends the full KV."""
        return None

    # ----------------------------------------------------------------------------------------- the rule
    def prompt_rule(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    k_valid: torch.Tensor | None, scale: float) -> RowRule | None:
        """The pattern's rule for a whole prompt (queries = keys): which keys each query row may see, before
        causality and padding are applied. None means every key (plain causal attention). q/k and the attention
        scale are there for rules that read the activations."""
        raise NotImplementedError

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
        """Float64 definition of `prefill` (dense mask, no tricks); tests only."""
        raise NotImplementedError

    def policy_rule(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> RowRule | None:
        """Rule for queries that are not a whole prompt (decode steps): the KV policy's keys."""
        policy = self.kv_policy()
        if policy is None:
            return None

        def rule(lo: int, hi: int) -> torch.Tensor:
            return within_policy(q_pos[:, None, lo:hi, None], k_pos[:, None, None, :], policy)

        return rule

    def row_rule(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 k_valid: torch.Tensor | None, scale: float) -> RowRule | None:
        if q.shape[2] == k.shape[2]:
            return self.prompt_rule(q, k, q_pos, k_pos, k_valid, scale)
        return self.policy_rule(q_pos, k_pos)

    def mask(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
             k_valid: torch.Tensor | None, scale: float, sa_rows: torch.Tensor | None = None,
             memo: dict | None = None) -> torch.Tensor:
        """Full mask [B, 1 or H, Tq, Tk] for masked attention: causal, real keys, and the rule (only for the samples
        in `sa_rows` when given). Positional patterns memoise it per forward: every layer shares the positions."""
        key = None
        if memo is not None and self.positional:
            key = (id(q_pos), id(k_pos), id(k_valid), self, id(sa_rows), q.shape[2] == k.shape[2])
            if key in memo:
                return memo[key]
        with torch.no_grad():
            rule = self.row_rule(q, k, q_pos, k_pos, k_valid, scale)
            out = position_mask(q_pos, k_pos, k_valid, None if rule is None else rule(0, q.shape[2]), sa_rows)
        if key is not None:
            memo[key] = out
        return out

    def flex_mask_mod(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                      k_valid: torch.Tensor | None, scale: float) -> tuple[Callable, Hashable | None]:
        """(mask_mod(b, h, q_idx, kv_idx), cache key or None) for FlexAttention, causal and padding included.
        This default reads the dense mask, which is right for any rule but holds [B, H, Tq, Tk]; positional
        patterns and block-sparse ones override it with their rule written over indices."""
        dense = self.mask(q, k, q_pos, k_pos, k_valid, scale)
        heads = dense.shape[1]

        def mask_mod(b, h, qi, ki):
            return dense[b, h if heads > 1 else 0, qi, ki]

        return mask_mod, None

    # ----------------------------------------------------------------------------------------- inference
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                scale: float, backend: str = "auto") -> torch.Tensor:
        """SA attention of a whole left-padded prompt: q [B, H, T, D] (any strides, unit stride in D), k/v
        [B, Hkv, T, D], kv_pad [B] ints or None. Returns [B, H, T, D] in q's dtype laid out as [B, T, H, D]
        (so `.transpose(1, 2).reshape(B, T, H * D)` is free); padding rows are zeros."""
        backend = resolve_prefill_backend(self, backend, q.device)
        check_prompt(q, k, v, kv_pad)
        if backend == "triton":
            return self.triton_prefill(q, k, v, kv_pad, scale)
        return self.torch_prefill(q, k, v, kv_pad, scale)

    def prefill_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     backend: str = "auto") -> torch.Tensor:
        """SA attention of the last Tq queries of an unpadded prompt prefix: q [B, H, Tq, D] are positions
        Tk - Tq .. Tk - 1 of the keys k/v [B, Hkv, Tk, D]. Only for patterns with `chunkable_queries`."""
        raise PatternError(f"sparse pattern {self.name!r} reads the whole prompt; call prefill on it")

    def triton_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
        raise PatternError(f"sparse pattern {self.name!r} has no Triton prefill kernel yet; use backend='torch'")

    def torch_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
        """Masked SDPA over chunks of query rows, so the mask and scores held at once stay bounded."""
        batch, heads, seq_len, head_dim = q.shape
        valid, pos = padding_layout(kv_pad, batch, seq_len, q.device)
        rule = self.prompt_rule(q, k, pos, pos, valid, scale)
        group = heads // k.shape[1]
        kx, vx = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = torch.empty(batch, seq_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
        rows = max(1, TORCH_CHUNK_ELEMENTS // max(1, batch * heads * seq_len))
        idx = torch.arange(seq_len, device=q.device)
        for lo in range(0, seq_len, rows):
            hi = min(seq_len, lo + rows)
            with torch.no_grad():
                # causal by index (left padding keeps real tokens in order); padding rows and keys see nothing
                allowed = idx[lo:hi, None] >= idx[None, :]
                allowed = allowed & valid[:, None, lo:hi, None] & valid[:, None, None, :]
                if rule is not None:
                    allowed = allowed & rule(lo, hi)
                has_key = allowed.any(dim=-1, keepdim=True)
                allowed = allowed | ~has_key  # padding rows: any finite softmax, zeroed below
            part = torch.nn.functional.scaled_dot_product_attention(q[:, :, lo:hi], kx, vx, attn_mask=allowed,
                                                                    scale=scale)
            out[:, :, lo:hi] = part * has_key
        return out

    # ----------------------------------------------------------------------------------------- training
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                  k_pos: torch.Tensor, k_valid: torch.Tensor | None, scale: float, backend: str = "auto",
                  memo: dict | None = None) -> torch.Tensor:
        """Differentiable SA for the dispatcher: q [B, H, Tq, D], k/v [B, Hkv, Tk, D], real positions q_pos [B, Tq]
        and k_pos [B, Tk], k_valid [B, Tk] or None. `memo` caches positional masks across layers."""
        name = backends.resolve_sparse_backend(self, backend, q, k, v)
        if name == "triton":
            from flux.attention.triton_backend import triton_sparse_attention

            return triton_sparse_attention(q, k, v, q_pos, k_pos, k_valid, self, scale)
        if name == "flex":
            return backends.flex_sparse_attention(q, k, v, q_pos, k_pos, k_valid, self, scale)
        attend = backends.eager_attention if name == "reference" else backends.sdpa_attention
        return attend(q, k, v, self.mask(q, k, q_pos, k_pos, k_valid, scale, memo=memo), scale)


# --------------------------------------------------------------------------------------------------- helpers
def within_policy(q_pos: torch.Tensor, k_pos: torch.Tensor, policy: tuple[int, int]) -> torch.Tensor:
    """Keys a (sink, window) KV policy keeps for a query, elementwise on broadcastable real positions."""
    sink, window = policy
    return (k_pos < sink) | (q_pos - k_pos < window)


def check_prompt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pad: torch.Tensor | None) -> None:
    """Shapes of a prompt attention call: q [B, H, T, D], k/v [B, Hkv, T, D] with H a multiple of Hkv."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"prefill expects q [B, H, T, D] and k/v [B, Hkv, T, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"prefill attends a whole prompt: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on "
                         "batch, length and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}) for GQA")
    if kv_pad is not None and (kv_pad.shape != (q.shape[0],) or kv_pad.dtype.is_floating_point
                               or kv_pad.dtype == torch.bool):
        raise ValueError(f"kv_pad must be an integer tensor of shape [B]=({q.shape[0]},), got {kv_pad.dtype} "
                         f"{tuple(kv_pad.shape)}")


def padding_layout(kv_pad: torch.Tensor | None, batch: int, seq_len: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [B, T] bool, real positions [B, T]) of a left-padded prompt; padding gets position 0."""
    idx = torch.arange(seq_len, device=device).view(1, seq_len)
    pad = torch.zeros(batch, 1, dtype=torch.long, device=device) if kv_pad is None else \
        kv_pad.to(device=device, dtype=torch.long).view(batch, 1)
    return idx >= pad, (idx - pad).clamp(min=0)


def left_padding(k_valid: torch.Tensor | None, what: str) -> torch.Tensor | None:
    """kv_pad [B] of a validity mask, which must be left padding (the layout the Triton kernels take)."""
    if k_valid is None:
        return None
    pad = (~k_valid).sum(dim=1)
    idx = torch.arange(k_valid.shape[1], device=k_valid.device).view(1, -1)
    if not bool(torch.equal(k_valid, idx >= pad.view(-1, 1))):
        raise backends.BackendError(f"{what} takes left-padded batches only (padding before the real tokens); "
                                    "left-pad the batch or use sa_backend='masked_sdpa'")
    return pad


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (switching stale kernel modules over)."""
    if device.type == "cuda":
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from flux_kernels.interpret import use_interpreter_without_cuda

    use_interpreter_without_cuda()
    return True


def resolve_prefill_backend(pattern: SparsePattern, backend: str, device: torch.device) -> str:
    if backend not in PREFILL_BACKENDS:
        raise PatternError(f"unknown prefill backend {backend!r}; choose one of {', '.join(PREFILL_BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not triton_usable(device):
        raise PatternError(f"prefill backend 'triton' for pattern {pattern.name!r} needs CUDA tensors, or "
                           f"TRITON_INTERPRET=1 on CPU (slow, for tests); got {device.type} tensors, so use "
                           "backend='torch' or 'auto'")
    return backend


def get_pattern(name: str, **params: Any) -> SparsePattern:
    """Build a registered pattern by name; unknown names and parameters fail with the list of valid ones."""
    if name not in PATTERNS:
        raise PatternError(f"unknown sparse pattern {name!r}; registered patterns: {', '.join(sorted(PATTERNS))}")
    cls = PATTERNS[name]
    allowed = {f.name for f in fields(cls)}
    unknown = set(params) - allowed
    if unknown:
        raise PatternError(f"sparse pattern {name!r} got unknown parameter(s) {sorted(unknown)}; "
                           f"it takes {sorted(allowed)}")
    return cls(**params)


def pattern_from_description(described: dict[str, Any]) -> SparsePattern:
    """Inverse of `describe()`: the pattern a results.json or router.json records."""
    params = dict(described)
    name = params.pop("pattern", None)
    if not isinstance(name, str):
        raise PatternError(f"recorded sparse pattern {described!r} has no 'pattern' name; expected "
                           "{'pattern': <name>, **params} as written by SparsePattern.describe()")
    return get_pattern(name, **params)


def pattern_for_router(meta: dict[str, Any], cfg_pattern: SparsePattern,
                       explicitly_overridden: bool) -> SparsePattern:
    """The pattern to evaluate a trained router with: the one its router.json records (`meta["sparse"]`), unless
    the user chose one explicitly (`sparse=...` or `sparse.<param>=...` on the command line), or the router.json
    predates pattern recording (then `cfg_pattern`)."""
    recorded = meta.get("sparse")
    if explicitly_overridden or not recorded:
        return cfg_pattern
    return pattern_from_description(recorded)


def sparse_overridden(overrides: list[str]) -> bool:
    """Whether Hydra task overrides (e.g. HydraConfig.get().overrides.task) choose the sparse pattern or one of its
    parameters explicitly."""
    keys = (item.split("=", 1)[0].lstrip("+~") for item in overrides)
    return any(key == "sparse" or key.startswith("sparse.") for key in keys)


@dataclass(frozen=True)
class PositionalPattern(SparsePattern):
    """A pattern whose rule reads only real positions (and the prompt's length): one mask serves every layer, and
    FlexAttention's mask can be cached per length. Subclasses implement `visible`."""

    positional: ClassVar[bool] = True

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor,
                prompt_len: torch.Tensor | int | None = None) -> torch.Tensor:
        """Which causal keys a prompt query sees, elementwise on broadcastable real positions; `prompt_len` is the
        number of real tokens of the query's sample (patterns that single out the prompt's end need it)."""
        raise NotImplementedError

    def _rule_at(self, q_pos: torch.Tensor, k_pos: torch.Tensor, prompt_len: torch.Tensor | int,
                 prompt: bool) -> torch.Tensor:
        if prompt:
            return self.visible(q_pos, k_pos, prompt_len)
        policy = self.kv_policy()
        return k_pos >= 0 if policy is None else within_policy(q_pos, k_pos, policy)

    def prompt_rule(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                    k_valid: torch.Tensor | None, scale: float) -> RowRule:
        lengths = prompt_lengths(k_valid, k_pos.shape[0], k_pos.shape[1], k_pos.device)[:, None, None, None]

        def rule(lo: int, hi: int) -> torch.Tensor:
            return self.visible(q_pos[:, None, lo:hi, None], k_pos[:, None, None, :], lengths)

        return rule

    def flex_mask_mod(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor | None,
                      k_pos: torch.Tensor | None, k_valid: torch.Tensor | None,
                      scale: float) -> tuple[Callable, Hashable | None]:
        tq, tk = q.shape[2], k.shape[2]
        prompt = tq == tk
        if k_valid is None:  # unpadded: positions are indices, one mask per (pattern, lengths)
            offset = tk - tq

            def mask_mod(b, h, qi, ki):
                qp = qi + offset
                return (ki <= qp) & self._rule_at(qp, ki, tk, prompt)

            return mask_mod, (self, tq, tk)
        lengths = prompt_lengths(k_valid, k_valid.shape[0], tk, k_valid.device)

        def padded_mask_mod(b, h, qi, ki):
            qp, kp = q_pos[b, qi], k_pos[b, ki]
            return k_valid[b, ki] & (kp <= qp) & self._rule_at(qp, kp, lengths[b], prompt)

        return padded_mask_mod, None


def prompt_lengths(k_valid: torch.Tensor | None, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Real tokens per sample [B] of a whole-prompt call."""
    if k_valid is None:
        return torch.full((batch,), seq_len, dtype=torch.long, device=device)
    return k_valid.sum(dim=-1)


def check_sink_window(pattern: str, sink: Any, window: Any) -> None:
    check_int(pattern, "sink", sink, 0, "sink=128")
    check_int(pattern, "window", window, 1, "window=2048 (it counts the query's own token)")
