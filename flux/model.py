"""FluxModel: a frozen backbone whose every attention layer is routed, per sample, to full or sparse attention.

Three lines in a notebook:
    bb = load_backbone("smollm2_135m")
    fm = FluxModel(bb, router=load_router("experiments/smollm2_8k/router")[0])
    res = fm.generate(ids, mask, plan="router", max_new_tokens=32)

Two paths, one model definition (the backbone's transformers modules):
  * inference (`generate`, and `forward` under torch.no_grad() with hard decisions) runs on flux's engine
    (flux.engine): router in the loop, Triton kernels on CUDA, per-sample KV, CUDA-graph decode, only the logits asked
    for;
  * training (`forward` with gradients, or soft gate plans) runs the transformers modules with flux's differentiable
    attention function (flux.attention.dispatch), so gradients reach the router through both branches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flux.attention import dispatch
from flux.attention.backends import check_backend
from flux.attention.patterns import SparsePattern, StreamingPattern
from flux.backbone import Backbone
from flux.engine import Engine, EngineError, GenerationResult, batch_size, check_supported, validate_inputs
from flux.plan import GatePlan, Plan, make_plan

InputError = EngineError  # the name earlier flux versions raised for bad inputs

__all__ = ["FluxModel", "FluxOutput", "GenerationResult", "InputError", "real_positions"]


@dataclass
class FluxOutput:
    """`logits` [B, T or K, V] (None when the forward was asked for `hidden` instead); `hidden` [N, d]: the final
    hidden states at the positions `hidden_at` chose (training losses that run the LM head themselves)."""

    logits: torch.Tensor | None
    decisions: torch.Tensor
    gates: torch.Tensor | None
    hidden: torch.Tensor | None = None


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Real-token positions under left or right padding: 0 for the first real token; padding gets clamped values."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class FluxModel(nn.Module):
    """Wraps a frozen backbone; routes each layer per sample via a plan (static list, tensors, or a router).

    `fa_backend` / `sa_backend` choose the attention kernels of the training forward; `kernels` (auto | triton |
    torch) those of the inference engine (auto: Triton on CUDA, the transformers modules on CPU)."""

    def __init__(self, backbone: Backbone, pattern: SparsePattern | None = None, fa_backend: str = "auto",
                 sa_backend: str = "auto", router: nn.Module | None = None, kernels: str = "auto") -> None:
        super().__init__()
        check_supported(backbone.model.config)
        self.backbone = backbone
        self.model = backbone.model
        self.fa_backend = check_backend("fa", fa_backend)
        self.sa_backend = check_backend("sa", sa_backend)
        self.router = router
        self.engine = Engine(self.model, pattern if pattern is not None else StreamingPattern(), kernels)
        dispatch.register()
        self.model.set_attn_implementation(dispatch.ATTENTION_NAME)
        if dispatch.attach(self.model) != self.num_layers:
            raise ValueError(f"found a different number of attention modules than the {self.num_layers} layers of "
                             f"{backbone.name}; this architecture is not supported by flux's dispatcher")

    @property
    def pattern(self) -> SparsePattern:
        return self.engine.pattern

    @pattern.setter
    def pattern(self, pattern: SparsePattern) -> None:
        self.engine.pattern = pattern

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    @property
    def lm_head(self) -> nn.Module:
        """The backbone's output projection (hidden -> vocabulary logits)."""
        return self.model.get_output_embeddings()

    def resolve_plan(self, plan: Any, batch_size: int) -> Plan:
        if isinstance(plan, str) and plan == "router":
            if self.router is None:
                raise EngineError("plan='router' needs a router; pass router=... to FluxModel")
            return self.router.as_plan()
        return make_plan(plan, self.num_layers, batch_size)

    def _training_path(self, plan: Plan, hidden_at: torch.Tensor | None) -> bool:
        """Gradients, or soft gates (which mix both branches), need the differentiable transformers forward; so do
        hidden states (the engine returns logits only)."""
        router = getattr(plan, "router", None)
        return (torch.is_grad_enabled() or isinstance(plan, GatePlan) or bool(router is not None and router.training)
                or hidden_at is not None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, plan: Any = "dense",
                segments: dict[str, torch.Tensor] | None = None, logits_to_keep: int = 0,
                hidden_at: torch.Tensor | None = None) -> FluxOutput:
        """One forward pass. `logits_to_keep`: 0 = logits at every position, k > 0 = at the last k positions.

        With gradients enabled (training) or soft gates this runs the transformers modules; under torch.no_grad()
        with hard decisions it runs on the engine (faster, same numbers within floating-point rounding).
        `hidden_at` ([B, T] bool) returns, instead of logits, the final (normed) hidden states at those positions as
        `hidden` [N, d] in row-major order, so a loss runs the LM head only where it reads (router training at
        32k+ tokens: flux.objectives.answer_losses)."""
        routing_plan = self.resolve_plan(plan, batch_size(input_ids))
        if not self._training_path(routing_plan, hidden_at):
            logits, decisions = self.engine.score(input_ids, attention_mask, routing_plan, segments, logits_to_keep)
            return FluxOutput(logits, decisions, None)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise EngineError(f"logits_to_keep must be an integer >= 0 (0 = every position), got {logits_to_keep!r}")
        mask = validate_inputs(input_ids, attention_mask, self.engine.parts)
        positions = real_positions(mask)
        valid = None if bool(mask.all()) else mask
        if hasattr(routing_plan, "begin_forward"):
            routing_plan.begin_forward(valid)
        state = dispatch.RoutingState(plan=routing_plan, pattern=self.pattern, fa_backend=self.fa_backend,
                                      sa_backend=self.sa_backend, q_pos=positions, valid=valid, segments=segments)
        if hidden_at is not None and (hidden_at.dtype != torch.bool or hidden_at.shape != input_ids.shape):
            raise EngineError(f"hidden_at must be a [batch, length] bool mask like input_ids {tuple(input_ids.shape)}, "
                              f"got {tuple(hidden_at.shape)}")
        kwargs = {"input_ids": input_ids, "attention_mask": None, "position_ids": positions, "use_cache": False,
                  dispatch.STATE_KWARG: state}
        logits = hidden = None
        if hidden_at is None:
            logits = self.model(logits_to_keep=logits_to_keep, **kwargs).logits
        else:
            hidden = self.model.get_decoder()(**kwargs).last_hidden_state[hidden_at.to(input_ids.device)]
        decisions = torch.stack([state.decisions[i].to(input_ids.device) for i in range(self.num_layers)], dim=1)
        gates = None
        if len(state.gates) == self.num_layers:
            gates = torch.stack([state.gates[i].to(input_ids.device) for i in range(self.num_layers)], dim=1)
        return FluxOutput(logits, decisions, gates, hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, plan: Any = "dense",
                 max_new_tokens: int = 32, segments: dict[str, torch.Tensor] | None = None,
                 eos_token_id: int | Sequence[int] | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | Sequence[int] | None = None, stop: Sequence[str] | None = None,
                 num_return_sequences: int = 1, **engine_options: Any) -> GenerationResult:
        """Generate up to `max_new_tokens` per sample with decisions fixed at prefill.

        Greedy by default; `do_sample=True` samples with temperature / top_k / top_p, reproducibly with `seed` (one
        int for every sample, or one per sample). Generation of a sample ends at an eos id (default: the model's
        generation config, else the tokenizer's) or once its text contains one of the `stop` strings. Left or right
        padding both give exactly what each sample gives alone. `num_return_sequences` = n samples n continuations
        of every prompt from one prefill (rows sample-major; continuation i uses seed + i). `engine_options`:
        `use_graph` (CUDA-graph decode; default on CUDA) and `check_every` (decode steps between stop checks)."""
        routing_plan = self.resolve_plan(plan, batch_size(input_ids))
        return self.engine.generate(input_ids, attention_mask, routing_plan, max_new_tokens, segments,
                                    eos_token_id, do_sample, temperature, top_k, top_p, seed, stop,
                                    tokenizer=self.backbone.tokenizer, num_return_sequences=num_return_sequences,
                                    **engine_options)
