"""The anatomy of a supported decoder-only LM, read off the transformers modules (which stay the model definition).

The engine runs the model's own modules and weights block by block. It only repacks two groups of linears that
share an input (q/k/v, gate/up) into one matrix each, so prefill and decode run one GEMM where transformers runs
three or two; the original modules are re-pointed at row slices of the fused matrix, so the model keeps working
unchanged and no weight is stored twice. Families: Llama, Qwen2/2.5 (q/k/v bias), Qwen3 (per-head q/k RMSNorm),
Mistral without a sliding window. Anything else is refused with one clear error rather than run approximately.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flux.errors import FluxUserError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


class EngineError(FluxUserError):
    """The model, the plan or the inputs cannot run on flux's inference engine; the message says what to change."""


@dataclass
class Block:
    """One decoder block: its norms, fused projections and the modules that stay as they are."""

    in_norm: nn.Module
    post_norm: nn.Module
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_proj: nn.Linear
    gate_up_w: torch.Tensor
    gate_up_b: torch.Tensor | None
    down: nn.Linear
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    fused_from: tuple[nn.Linear, ...]


@dataclass
class ModelParts:
    """What the engine needs of the model: embeddings, rotary, blocks, final norm, LM head and head geometry."""

    embed: nn.Module
    rotary: nn.Module
    blocks: list[Block]
    final_norm: nn.Module
    lm_head: nn.Module
    n_q: int
    n_kv: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    max_positions: int
    scale: float
    apply_rope: Callable

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def is_current(self) -> bool:
        """False once the model's weights were moved or replaced after fusion (e.g. `model.to('cuda')`): the fused
        matrices would then be stale copies, so the engine re-reads the model."""
        for blk in self.blocks:
            fused = (blk.qkv_w, blk.gate_up_w)
            if not all(_points_into(lins, w) for lins, w in zip((blk.fused_from[:3], blk.fused_from[3:]), fused)):
                return False
        return True


def _points_into(linears: Sequence[nn.Linear], weight: torch.Tensor) -> bool:
    row = 0
    for lin in linears:
        if lin.weight.device != weight.device or lin.weight.data_ptr() != weight[row].data_ptr():
            return False
        row += lin.weight.shape[0]
    return True


def _fuse(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears sharing an input into one matrix and point the modules'
    parameters at row slices of it. Idempotent: a second call on already-fused modules returns the same storage."""
    fused = getattr(linears[0], "_flux_fused", None)
    if fused is not None and _points_into(linears, fused[0]):
        return fused
    has_bias = [lin.bias is not None for lin in linears]
    if any(has_bias) and not all(has_bias):
        raise EngineError("the engine fuses q/k/v and gate/up projections; they must all have biases or none")
    weight = torch.cat([lin.weight.data for lin in linears], dim=0)
    bias = torch.cat([lin.bias.data for lin in linears], dim=0) if all(has_bias) else None
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[row:row + n]
        if bias is not None:
            lin.bias.data = bias[row:row + n]
        row += n
    linears[0]._flux_fused = (weight, bias)
    return weight, bias


def check_supported(config) -> None:
    """Refuse architectures the engine would run wrongly, naming the setting and the fix."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(f"model type {model_type!r} is not supported by flux's engine; supported families: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise EngineError(f"the engine implements SiLU-gated MLPs; this model uses hidden_act={config.hidden_act!r}")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", model_type == "mistral")
    if window is not None and uses_window:
        raise EngineError(f"this {model_type} model uses its own sliding window ({window} tokens) in every layer; "
                          "flux routes full-attention backbones only: set config.sliding_window=None (Mistral "
                          "v0.2+ checkpoints ship without a window) or pick another backbone")
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise EngineError(f"this model mixes layer types {sorted(set(layer_types))}; flux routes models whose "
                          "layers all use full attention")


def model_parts(model: nn.Module) -> ModelParts:
    """Read the engine's view of `model` (a *ForCausalLM of a supported family), fusing q/k/v and gate/up."""
    cfg = model.config
    check_supported(cfg)
    inner = model.model
    blocks = []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = (mlp.gate_proj, mlp.up_proj)
        qkv_w, qkv_b = _fuse(qkv)
        gu_w, gu_b = _fuse(gate_up)
        blocks.append(Block(in_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm, qkv_w=qkv_w,
                            qkv_b=qkv_b, o_proj=attn.o_proj, gate_up_w=gu_w, gate_up_b=gu_b, down=mlp.down_proj,
                            q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                            fused_from=qkv + gate_up))
    n_q = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q)
    first_attn = inner.layers[0].self_attn
    return ModelParts(
        embed=inner.embed_tokens, rotary=inner.rotary_emb, blocks=blocks, final_norm=inner.norm,
        lm_head=model.lm_head, n_q=n_q, n_kv=int(getattr(cfg, "num_key_value_heads", None) or n_q),
        head_dim=head_dim, hidden=int(cfg.hidden_size), intermediate=int(cfg.intermediate_size),
        vocab=int(cfg.vocab_size), max_positions=int(cfg.max_position_embeddings),
        scale=float(getattr(first_attn, "scaling", head_dim ** -0.5)),
        apply_rope=sys.modules[type(first_attn).__module__].apply_rotary_pos_emb)
