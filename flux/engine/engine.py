"""flux's one inference engine: routed prefill + per-sample KV + (CUDA-graph) decode + on-device sampling.

`FluxModel.generate` and every inference forward (`FluxModel.forward` without gradients: scoring, perplexity,
validation) run here, and therefore `flux.evaluate`, `flux.passkey`, the demo, the notebooks, lm-eval and
`flux.bench`. The same code runs on CPU (transformers' modules and SDPA, or the Triton kernels under the
interpreter) and on CUDA (Triton kernels, a CUDA graph per generate call).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from flux.attention.patterns import SparsePattern
from flux.engine.decode import Decoder
from flux.engine.kv import KVCache
from flux.engine.ops import TorchOps, make_ops
from flux.engine.parts import EngineError, ModelParts, model_parts
from flux.engine.prefill import Packed, prefill
from flux.engine.sampling import Sampler, check_sampling
from flux.plan import GatePlan, Plan

GIB = 2 ** 30


@dataclass
class GenerationResult:
    """`sequences` [B, max_new_tokens]: new tokens; after a sample ends (eos, stop string, or length) the pad id.
    `num_generated` [B]: tokens up to and including the eos / the token that completed a stop string.
    `decisions` [B, L] (True = SA) as decided at prefill. KV bytes are what the engine's cache held for the batch,
    per sample, and what a cache with every layer full would have held. `timings` (seconds, wall clock, the device
    synchronised): `ttft` (call to first token), `capture` (CUDA-graph capture), `decode` (the remaining steps),
    `decode_steps`. With num_return_sequences = n, rows are sample-major (n rows per prompt)."""

    sequences: torch.Tensor
    num_generated: torch.Tensor
    decisions: torch.Tensor
    kv_bytes: int
    kv_bytes_dense: int
    kv_bytes_per_sample: list[int]
    finish_reasons: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def kv_saved_fraction(self) -> float:
        return 1.0 - self.kv_bytes / self.kv_bytes_dense if self.kv_bytes_dense else 0.0


def _check_ids(input_ids: torch.Tensor, vocab: int) -> None:
    batch_size(input_ids)
    if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise EngineError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; tokenize the text "
                          "and pass torch.long ids")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise EngineError(f"token id {bad} is outside the vocabulary [0, {vocab}); the ids were made by another "
                          "tokenizer or are padding markers such as -100: use this backbone's tokenizer")


def _check_mask(attention_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if attention_mask.shape != shape:
        raise EngineError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(shape)}")
    values = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(torch.float64)
    if attention_mask.dtype != torch.bool and bool(((values != 0) & (values != 1)).any()):
        bad = values[(values != 0) & (values != 1)][0].item()
        raise EngineError(f"attention_mask may hold only 0 (padding) and 1 (token), found {bad}; flux does not "
                          "weight tokens")
    mask = attention_mask.bool()
    lengths = mask.sum(dim=-1)
    if bool((lengths == 0).any()):
        raise EngineError("a sample in the batch has no real tokens (attention_mask row all zero); drop it")
    idx = torch.arange(shape[1], device=mask.device)
    start = torch.where(mask, idx, shape[1]).min(dim=-1).values
    inside = (idx[None, :] >= start[:, None]) & (idx[None, :] < (start + lengths)[:, None])
    if not bool((inside == mask).all()):
        raise EngineError("attention_mask must mark one contiguous run of tokens per sample (left or right "
                          "padding); found padding between tokens")
    return mask


def batch_size(input_ids: torch.Tensor) -> int:
    """The batch size of a [batch, tokens] id tensor, or the one clear error about its shape."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise EngineError(f"input_ids must be a non-empty [batch, tokens] tensor, got {shape}")
    return input_ids.shape[0]


def validate_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, parts: ModelParts,
                    extra_tokens: int = 0) -> torch.Tensor:
    """Check ids, mask and length against the model; returns the mask as bool on the ids' device."""
    _check_ids(input_ids, parts.vocab)
    mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else _check_mask(attention_mask.to(input_ids.device), input_ids.shape))
    longest = int(mask.sum(dim=-1).max())
    if longest + extra_tokens > parts.max_positions:
        raise EngineError(
            f"{longest} tokens (prompt{' + new tokens' if extra_tokens else ''}) exceed the backbone's "
            f"{parts.max_positions} positions; shorten the input (e.g. truncate the middle of the context) "
            "or lower max_new_tokens")
    return mask


class Engine:
    """Routed inference for one model and one sparse pattern. `kernels`: auto | triton | torch (see ops.make_ops)."""

    def __init__(self, model: torch.nn.Module, pattern: SparsePattern, kernels: str = "auto") -> None:
        self.model = model
        self.pattern = pattern
        self.kernels = kernels
        self._parts: ModelParts | None = None
        self._ops: tuple[torch.device, TorchOps] | None = None

    # ---------------------------------------------------------------------------------------------- model view
    @property
    def parts(self) -> ModelParts:
        if self._parts is None or not self._parts.is_current():
            self._parts = model_parts(self.model)
        return self._parts

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def ops(self) -> TorchOps:
        device = self.device
        if self._ops is None or self._ops[0] != device:
            self._ops = (device, make_ops(self.kernels, device))
        return self._ops[1]

    # ---------------------------------------------------------------------------------------------- inputs
    def pack(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             segments: dict[str, torch.Tensor] | None, extra_tokens: int = 0) -> tuple[Packed, torch.Tensor]:
        """Validate and pack a batch to the left (sample b's tokens at [0, n_b)); returns it and each sample's
        first-token index in the caller's layout."""
        batch_size(input_ids)
        device = self.device
        input_ids = input_ids.to(device)
        mask = validate_inputs(input_ids, attention_mask, self.parts, extra_tokens)
        lengths = mask.sum(dim=-1)
        lengths_host = [int(n) for n in lengths.tolist()]
        longest = max(lengths_host)
        t = input_ids.shape[1]
        idx = torch.arange(t, device=device)
        start = torch.where(mask, idx, t).min(dim=-1).values
        j = torch.arange(longest, device=device)
        src = (start[:, None] + j[None, :]).clamp(max=t - 1)
        valid = j[None, :] < lengths[:, None]
        ids = torch.where(valid, input_ids.gather(1, src), torch.zeros_like(src))
        shifted = None
        if segments:
            shifted = {}
            for name, seg in segments.items():
                seg = seg.to(device) - start[:, None]
                shifted[name] = torch.minimum(seg.clamp(min=0), lengths[:, None])
        packed = Packed(ids=ids, lengths=lengths, lengths_host=lengths_host,
                        valid=None if all(n == longest for n in lengths_host) else valid, segments=shifted)
        return packed, start

    # ---------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, plan: Plan,
              segments: dict[str, torch.Tensor] | None = None,
              logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of an inference forward in the caller's layout: every position (logits_to_keep=0) or the last
        `logits_to_keep` positions of input_ids; padding positions get zeros. Returns (logits, decisions)."""
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise EngineError(f"logits_to_keep must be an integer >= 0 (0 = every position), got {logits_to_keep!r}")
        packed, start = self.pack(input_ids, attention_mask, segments)
        t = input_ids.shape[1]
        keep = t if logits_to_keep == 0 else min(logits_to_keep, t)
        caller_pos = torch.arange(t - keep, t, device=packed.ids.device)
        local = caller_pos[None, :] - start[:, None]
        real = (local >= 0) & (local < packed.lengths[:, None])
        logits, decisions = prefill(self.parts, self.ops(), self.pattern, plan, packed,
                                    local.clamp(0, packed.length - 1))
        return logits.masked_fill_(~real[:, :, None], 0.0), decisions

    # ---------------------------------------------------------------------------------------------- generation
    def _eos_ids(self, eos_token_id: int | Sequence[int] | None, tokenizer) -> list[int]:
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            return []
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not all(isinstance(i, int) and 0 <= i < self.parts.vocab for i in ids):
            raise EngineError(f"eos_token_id {eos_token_id!r} must be token ids in [0, {self.parts.vocab})")
        return ids

    def _check_memory(self, packed: Packed, capacity: int, plan: Plan, copies: int = 1) -> None:
        """On CUDA, refuse a batch whose smallest possible KV plus prefill buffers cannot fit in free memory."""
        if self.device.type != "cuda":
            return
        parts, b, t = self.parts, packed.batch, packed.length
        elem = next(self.model.parameters()).element_size()
        token = 2 * parts.n_kv * parts.head_dim * elem
        policy = self.pattern.kv_policy()
        ring = min(capacity, sum(policy)) if policy is not None else capacity
        sa_layers = getattr(plan, "sa_layers", None)
        if sa_layers is not None:
            kv = sum(ring if sa else capacity for sa in sa_layers) * b * copies * token
        else:
            kv = parts.num_layers * b * copies * ring * token
        transient = b * t * (2 * parts.hidden + parts.n_q * parts.head_dim) * elem + b * capacity * token
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if kv + transient > free:
            raise EngineError(f"batch {b} x {copies} x {t} tokens (+{capacity - t} new) needs at least "
                              f"{(kv + transient) / GIB:.1f} GiB for its KV cache and prefill buffers, but "
                              f"{free / GIB:.1f} GiB are free on {self.device}; lower the batch size, the prompt "
                              "length or max_new_tokens")

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, plan: Plan,
                 max_new_tokens: int = 32, segments: dict[str, torch.Tensor] | None = None,
                 eos_token_id: int | Sequence[int] | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | Sequence[int] | None = None, stop: Sequence[str] | None = None, tokenizer=None,
                 num_return_sequences: int = 1, use_graph: bool | None = None,
                 check_every: int | None = None) -> GenerationResult:
        start_time = time.perf_counter()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        copies = num_return_sequences
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise EngineError(f"num_return_sequences must be an integer >= 1, got {copies!r}")
        if copies > 1 and not do_sample:
            raise EngineError(f"num_return_sequences={copies} with greedy decoding would return {copies} identical "
                              "copies; pass do_sample=True")
        if isinstance(plan, GatePlan):
            raise EngineError("generate takes hard decisions: a float gate plan mixes FA and SA outputs, which "
                              "only the training forward computes; pass a bool [batch, layers] tensor instead")
        check_sampling(do_sample, temperature, top_k, top_p, self.parts.vocab)
        stops = _check_stop(stop, tokenizer)
        eos = self._eos_ids(eos_token_id, tokenizer)
        packed, _ = self.pack(input_ids, attention_mask, segments, extra_tokens=max_new_tokens)
        device, b = self.device, packed.batch
        sampler = Sampler(b, self.parts.vocab, device, do_sample, temperature, top_k, top_p, seed, copies)
        capacity = packed.length + max_new_tokens
        self._check_memory(packed, capacity, plan, copies)
        policy = self.pattern.kv_policy() or (0, 1)
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(b, capacity, policy[0], policy[1], self.parts.n_kv, self.parts.head_dim, dtype, device)
        try:
            logits, decisions = prefill(self.parts, self.ops(), self.pattern, plan, packed,
                                        (packed.lengths - 1)[:, None], cache)
        except torch.OutOfMemoryError as err:
            raise EngineError(f"out of GPU memory during prefill of batch {b} x {packed.length} tokens; lower the "
                              "batch size or the prompt length") from err
        cache.expand(copies)
        logits, decisions = logits.repeat_interleave(copies, 0), decisions.repeat_interleave(copies, 0)
        first = sampler(logits[:, 0], torch.zeros(1, dtype=torch.long, device=device))
        pad_id = eos[0] if eos else int(getattr(tokenizer, "pad_token_id", None) or 0)
        dec = Decoder(self.parts, self.ops(), cache, packed.lengths.repeat_interleave(copies), first,
                      max_new_tokens, sampler, eos, pad_id)
        timings = {"ttft": _synced_seconds(device, start_time)}
        use_graph = (device.type == "cuda" and self.ops().name == "triton") if use_graph is None else use_graph
        every = check_every or (8 if use_graph else 1)
        stopped = [False] * (b * copies)
        if use_graph and max_new_tokens > 1 and not bool(dec.done.all()):
            tick = time.perf_counter()
            dec.capture()
            timings["capture"] = _synced_seconds(device, tick)
        tick = time.perf_counter()
        while dec.steps_done < max_new_tokens:
            if bool(dec.done.all()):
                break
            dec.run(min(every, max_new_tokens - dec.steps_done), use_graph)
            if stops:
                _apply_stop_strings(dec, stops, tokenizer, stopped)
        timings["decode"] = _synced_seconds(device, tick)
        timings["decode_steps"] = float(dec.steps_done - 1)
        result = self._result(dec, decisions, cache, eos, stopped)
        result.timings = timings
        return result

    def _result(self, dec: Decoder, decisions: torch.Tensor, cache: KVCache, eos: list[int],
                stopped: list[bool]) -> GenerationResult:
        out = dec.out
        steps = torch.arange(out.shape[1], device=out.device)
        is_eos = (out[:, :, None] == torch.tensor(eos or [-1], device=out.device)).any(-1)
        first_eos = torch.where(is_eos, steps, out.shape[1]).min(dim=-1).values
        num = (first_eos + 1).clamp(max=out.shape[1])
        num = torch.minimum(num, torch.tensor([n if s else out.shape[1] for n, s in zip(dec.stop_at, stopped)],
                                              device=out.device)) if any(stopped) else num
        seq = out.masked_fill(steps[None, :] >= num[:, None], dec.pad_id)
        reasons = ["stop" if s else ("eos" if int(f) < out.shape[1] else "length")
                   for s, f in zip(stopped, first_eos.tolist())]
        return GenerationResult(seq, num, decisions, cache.nbytes(), cache.nbytes_dense(),
                                cache.nbytes_per_sample(), reasons)


def _synced_seconds(device: torch.device, since: float) -> float:
    """Wall seconds since `since`, after the device finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - since


def _check_stop(stop: Sequence[str] | str | None, tokenizer) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    stops = list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise EngineError(f"stop must be a list of non-empty strings, got {stop!r}")
    if stops and tokenizer is None:
        raise EngineError("stop strings need the tokenizer to read the generated text; pass tokenizer=...")
    return stops


def _apply_stop_strings(dec: Decoder, stops: list[str], tokenizer, stopped: list[bool]) -> None:
    """Host side: end every sample whose generated text now contains a stop string, at the token completing it."""
    steps = dec.steps_done
    tokens = dec.out[:, :steps].tolist()
    done = dec.done.tolist()
    for b, row in enumerate(tokens):
        if stopped[b] or done[b]:
            continue
        text = tokenizer.decode(row, skip_special_tokens=True)
        if not any(s in text for s in stops):
            continue
        # the shortest prefix whose text contains a stop string ends the sample
        lo, hi = 1, len(row)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s in tokenizer.decode(row[:mid], skip_special_tokens=True) for s in stops):
                hi = mid
            else:
                lo = mid + 1
        stopped[b] = True
        dec.stop_at[b] = lo
        dec.done[b] = True
