"""Next-token choice on the device: greedy, or sampling with temperature / top-k / top-p.

Sampling uses the Gumbel-max trick with counter-based noise: the uniform draw for (seed, step, token) is a hash of
those three integers (splitmix64 finaliser in int64 torch ops). That needs no generator state, so it runs inside a
captured CUDA graph, gives the same draws on CPU and GPU, and makes a sample's tokens independent of its batch-mates:
with the same seed, a batch gives exactly what each sample gives alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flux.engine.parts import EngineError


def _signed(x: int) -> int:
    """A 64-bit constant as the int64 value with the same bits (torch integers are signed)."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_STEP = _signed(0xD6E8FEB86659FD93)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seeds: torch.Tensor, step: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[B, V] float32 in (0, 1): a hash of (seed_b, step, token) for seeds [B], step [1] and token_ids [V] (int64)."""
    x = seeds[:, None] * _GOLDEN + step * _STEP + token_ids[None, :] * _MIX2
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).float() + 0.5) * (1.0 / (1 << 24))


class Sampler:
    """Picks the next token from float32 logits [B * copies, V]; capturable in a CUDA graph (no host reads).
    `batch` counts prompts; each prompt's `copies` continuations draw with seeds seed_b, seed_b + 1, ..."""

    def __init__(self, batch: int, vocab: int, device: torch.device, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | Sequence[int] | None = None, copies: int = 1) -> None:
        check_sampling(do_sample, temperature, top_k, top_p, vocab)
        self.do_sample = do_sample
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        if not do_sample:
            return
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        seeds = [int(seed)] * batch if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != batch:
            raise EngineError(f"seed has {len(seeds)} entries for a batch of {batch}; give one int (every sample "
                              "uses it) or one per sample")
        # the i-th of several continuations of one prompt draws with seed + i
        seeds = [s + i for s in seeds for i in range(copies)]
        self.seeds = torch.tensor(seeds, dtype=torch.long, device=device)
        self.token_ids = torch.arange(vocab, dtype=torch.long, device=device)

    def __call__(self, logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        scores = logits / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            scores = _top_p(scores, self.top_p)
        gumbel = -torch.log(-torch.log(uniform_noise(self.seeds, step, self.token_ids)))
        return (scores + gumbel).argmax(dim=-1)


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of highest-probability tokens whose probability reaches top_p (at least one)."""
    ordered, order = scores.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, vocab: int) -> None:
    """One clear error per bad sampling argument, before any model work."""
    if not isinstance(do_sample, bool):
        raise EngineError(f"do_sample must be True or False, got {do_sample!r}")
    if not do_sample:
        if temperature != 1.0 or top_k is not None or top_p is not None:
            raise EngineError(f"temperature={temperature}, top_k={top_k}, top_p={top_p} only apply with "
                              "do_sample=True; pass do_sample=True to sample, or drop them for greedy decoding")
        return
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise EngineError(f"temperature must be > 0 when sampling, got {temperature!r}; use do_sample=False for "
                          "greedy decoding")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise EngineError(f"top_k must be an integer >= 1 (or None), got {top_k!r}")
    if top_k is not None and top_k > vocab:
        raise EngineError(f"top_k={top_k} exceeds the vocabulary ({vocab} tokens); use a smaller top_k or None")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise EngineError(f"top_p must lie in (0, 1], got {top_p!r}")
