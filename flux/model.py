"""FluxModel: a frozen backbone whose every attention layer is routed to full or sparse attention.

Three lines in a notebook:
    bb = load_backbone("smollm2_135m")
    fm = FluxModel(bb, pattern=StreamingPattern(sink=128, window=2048))
    res = fm.generate(ids, mask, plan=[i % 2 == 1 for i in range(bb.num_layers)], max_new_tokens=32)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flux.attention import dispatch
from flux.attention.backends import check_backend
from flux.attention.patterns import SparsePattern, StreamingPattern
from flux.backbone import Backbone
from flux.cache import RoutedCache
from flux.errors import FluxUserError
from flux.plan import Plan, make_plan


class InputError(FluxUserError):
    """Inputs that the model cannot take (empty, too long, mismatched shapes)."""


@dataclass
class FluxOutput:
    logits: torch.Tensor
    decisions: torch.Tensor
    gates: torch.Tensor | None
    cache: RoutedCache | None = None


@dataclass
class GenerationResult:
    sequences: torch.Tensor
    decisions: torch.Tensor
    kv_bytes: int
    kv_bytes_dense: int

    @property
    def kv_saved_fraction(self) -> float:
        return 1.0 - self.kv_bytes / self.kv_bytes_dense if self.kv_bytes_dense else 0.0


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Real-token positions under left (or right) padding: 0 for the first real token; padding gets 0 too."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class FluxModel(nn.Module):
    """Wraps a frozen backbone; routes each layer per sample via a plan (static list, tensors, or a router)."""

    def __init__(self, backbone: Backbone, pattern: SparsePattern | None = None, fa_backend: str = "auto",
                 sa_backend: str = "auto", router: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.model = backbone.model
        self.pattern = pattern if pattern is not None else StreamingPattern()
        self.fa_backend = check_backend("fa", fa_backend)
        self.sa_backend = check_backend("sa", sa_backend)
        self.router = router
        self.active_state: dispatch.RoutingState | None = None
        self._decode_plan = make_plan("dense", self.num_layers, 1)  # unused in decode; the cache holds decisions
        dispatch.register()
        self.model.set_attn_implementation(dispatch.ATTENTION_NAME)
        if dispatch.attach(self.model, self) != self.num_layers:
            raise ValueError(f"found a different number of attention modules than the {self.num_layers} layers of "
                             f"{backbone.name}; this architecture is not supported by flux's dispatcher")

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      extra_tokens: int = 0) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise InputError(f"input_ids must be a non-empty [batch, tokens] tensor, got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        longest = int(attention_mask.sum(dim=-1).max()) + extra_tokens
        if longest > self.backbone.max_positions:
            raise InputError(
                f"{longest} tokens (prompt{' + new tokens' if extra_tokens else ''}) exceed the backbone's "
                f"{self.backbone.max_positions} positions; shorten the input (e.g. truncate the middle of the "
                "context) or lower max_new_tokens")
        if bool((attention_mask.sum(dim=-1) == 0).any()):
            raise InputError("a sample in the batch has no real tokens (attention_mask all zero)")
        return attention_mask

    def resolve_plan(self, plan: Any, batch_size: int) -> Plan:
        if plan == "router":
            if self.router is None:
                raise InputError("plan='router' needs a router; pass router=... to FluxModel")
            return self.router.as_plan()
        return make_plan(plan, self.num_layers, batch_size)

    def _state(self, plan: Plan, positions: torch.Tensor, valid: torch.Tensor | None, cache: RoutedCache | None,
               segments: dict[str, torch.Tensor] | None, decode: bool) -> dispatch.RoutingState:
        return dispatch.RoutingState(plan=plan, pattern=self.pattern, fa_backend=self.fa_backend,
                                     sa_backend=self.sa_backend, q_pos=positions, valid=valid, cache=cache,
                                     segments=segments, decode=decode)

    def _collect(self, state: dispatch.RoutingState, batch: int, device: torch.device):
        decisions = torch.stack([state.decisions[i].to(device) for i in range(self.num_layers)], dim=1)
        gates = None
        if len(state.gates) == self.num_layers:
            gates = torch.stack([state.gates[i].to(device) for i in range(self.num_layers)], dim=1)
        return decisions, gates

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, plan: Any = "dense",
                segments: dict[str, torch.Tensor] | None = None, use_cache: bool = False,
                trim_cache: bool = True) -> FluxOutput:
        """One forward pass (training or scoring). With `use_cache`, returns the prefilled RoutedCache as well."""
        attention_mask = self._check_inputs(input_ids, attention_mask)
        batch = input_ids.shape[0]
        routing_plan = self.resolve_plan(plan, batch)
        positions = real_positions(attention_mask)
        valid_bool = attention_mask.bool()
        valid = None if bool(valid_bool.all()) else valid_bool
        cache = None
        if use_cache:
            cache = RoutedCache(self.num_layers, self.pattern, trim=trim_cache)
            cache.begin_step(positions, valid_bool)
        if hasattr(routing_plan, "begin_forward"):
            routing_plan.begin_forward(valid)
        state = self.active_state = self._state(routing_plan, positions, valid, cache, segments, decode=False)
        out = self.model(input_ids=input_ids, attention_mask=None, position_ids=positions,
                         past_key_values=cache, use_cache=use_cache)
        if cache is not None:
            cache.end_step(input_ids.shape[1])
        decisions, gates = self._collect(state, batch, input_ids.device)
        return FluxOutput(out.logits, decisions, gates, cache)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: RoutedCache) -> torch.Tensor:
        """Append one token per sample ([B, 1], real positions [B, 1]) and return next-token logits [B, V]; the layer
        decisions come from the cache (no plan, no router)."""
        cache.begin_step(positions, torch.ones_like(tokens, dtype=torch.bool))
        self.active_state = self._state(self._decode_plan, positions, None, cache, None, decode=True)
        out = self.model(input_ids=tokens, attention_mask=None, position_ids=positions, past_key_values=cache,
                         use_cache=True)
        cache.end_step(1)
        return out.logits[:, -1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, plan: Any = "dense",
                 max_new_tokens: int = 32, segments: dict[str, torch.Tensor] | None = None,
                 eos_token_id: int | list[int] | None = None, trim_cache: bool = True) -> GenerationResult:
        """Greedy decoding with decisions fixed at prefill. Finished samples are padded with the first eos id."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        attention_mask = self._check_inputs(input_ids, attention_mask, extra_tokens=max_new_tokens)
        if eos_token_id is None:
            eos_token_id = getattr(self.backbone.tokenizer, "eos_token_id", None)
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        eos_ids = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
        out = self.forward(input_ids, attention_mask, plan, segments, use_cache=True, trim_cache=trim_cache)
        cache = out.cache
        next_tok = out.logits[:, -1].argmax(dim=-1)
        positions = torch.tensor(cache.lengths, device=input_ids.device)[:, None]
        produced = [next_tok]
        done = torch.isin(next_tok, eos_ids) if eos else torch.zeros_like(
            next_tok, dtype=torch.bool)
        for _ in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            logits = self.decode_step(next_tok[:, None], positions, cache)
            positions = positions + 1
            next_tok = logits.argmax(dim=-1)
            if eos:
                next_tok = torch.where(done, torch.full_like(next_tok, eos[0]), next_tok)
                done = done | torch.isin(next_tok, eos_ids)
            produced.append(next_tok)
        return GenerationResult(torch.stack(produced, dim=1), out.decisions, cache.kv_bytes(),
                                cache.kv_bytes_dense())
