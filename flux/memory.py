"""How much GPU memory a router-training step needs, from the backbone's shape alone, and one clear error before
the first step when it cannot fit.

A router-training step keeps, for the backward pass, what every frozen layer saves so the gradient can flow from
the loss through the layers to each layer's router (the weights get no gradient, so linears save nothing: only the
norms, attention and the gated MLP save activations). Counted per token and layer, in bytes (e = bytes of the model
dtype, d hidden, H / Hkv query / KV heads of size Dh, I the MLP width):

    2 RMSNorms       2 (4d + 4)               fp32 copy of their input + the inverse RMS
    q/k RMSNorm      4 (H + Hkv) Dh           Qwen3 only
    attention        e (H + 2 Hkv) Dh         q, k, v after rotary, saved by the kernel of the chosen branch
                     2 e H Dh + 4 H           both branches' outputs (the gate's gradient reads FA - SA) + the LSE
    gated MLP        3 e I                    SiLU input, SiLU output, up projection

With activation checkpointing each layer keeps only its input (e d per token) and the backward re-runs one layer at a
time, so one layer's activations plus the backward's own buffers exist at once. The answer loss adds the logits of
the answer rows only (flux.objectives.answer_losses), and the teacher's logits at the same rows. The estimate was
checked against the bytes autograd actually saves and, with checkpointing, against the peak of a whole step
(forward, recomputation and backward) measured on CPU by flux.memory_probe (tests/test_train_memory.py; within 6% on
a cut Qwen3 preset, experiments/train_scale/README.md). The H200 peaks in experiments/train_scale were taken before
recomputed layers stopped keeping their activations until the end of the backward (35 GiB at 32k on Qwen3-8B that
no estimate should count); they have to be measured again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flux.errors import ConfigError
from flux.objectives import ANSWER_CHUNK_ROWS

GIB = 2 ** 30
# allocator fragmentation, cuBLAS workspaces, compiled-kernel buffers: a fixed part plus a share of the activations
MARGIN_BYTES = 1 * GIB
MARGIN_SHARE = 0.05


class MemoryFitError(ConfigError):
    """A training step of this length and batch cannot fit in the GPU's free memory."""


@dataclass(frozen=True)
class Shape:
    """The few numbers of a decoder-only backbone the estimate needs."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qk_norm: bool
    dtype_bytes: int

    @classmethod
    def of(cls, config: Any, dtype: torch.dtype) -> Shape:
        heads = int(config.num_attention_heads)
        return cls(layers=int(config.num_hidden_layers), hidden=int(config.hidden_size), heads=heads,
                   kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
                   intermediate=int(config.intermediate_size), vocab=int(config.vocab_size),
                   qk_norm=config.model_type == "qwen3", dtype_bytes=torch.empty((), dtype=dtype).element_size())

    def saved_per_token_layer(self) -> int:
        """Bytes one layer saves for the backward, per token (the table in the module docstring)."""
        e, d, dh = self.dtype_bytes, self.hidden, self.head_dim
        norms = 2 * (4 * d + 4)
        qk_norm = 4 * (self.heads + self.kv_heads) * dh if self.qk_norm else 0
        attention = e * (self.heads + 2 * self.kv_heads) * dh + 2 * e * self.heads * dh + 4 * self.heads
        return norms + qk_norm + attention + 3 * e * self.intermediate

    def backward_per_token_layer(self) -> int:
        """Bytes of one layer's backward buffers per token: gradients of the residual stream, of the MLP width and
        of q/k/v and the output, plus the attention kernel's fp32 dq accumulator."""
        e, dh = self.dtype_bytes, self.head_dim
        return (e * (2 * self.hidden + 2 * self.intermediate + (2 * self.heads + 2 * self.kv_heads) * dh)
                + 4 * self.heads * dh)

    def outside_layers_per_token(self) -> int:
        """Bytes per token outside the layers: the final hidden states, the final norm's fp32 copy and the gradient
        scattered back from the answer rows."""
        return (2 * self.dtype_bytes + 4) * self.hidden


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of one training step, by part. `weights` is 0 when the weights already sit on the device (then they
    are no longer part of its free memory)."""

    weights: int
    activations: int
    logits: int
    margin: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.logits + self.margin

    def describe(self) -> str:
        parts = [("weights", self.weights), ("activations", self.activations), ("answer logits", self.logits),
                 ("margin", self.margin)]
        return ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts if value)


def estimate_training_memory(shape: Shape, tokens: int, batch: int, checkpointing: bool, answer_rows: int,
                             distill: bool, weight_bytes: int = 0) -> TrainingMemory:
    """Memory of one step over `batch` samples padded to `tokens`, with at most `answer_rows` answer rows per
    sample; `weight_bytes` for weights not yet on the device."""
    n = batch * tokens
    layer = shape.saved_per_token_layer()
    if checkpointing:
        kept = shape.layers * shape.dtype_bytes * shape.hidden + layer + shape.backward_per_token_layer()
    else:
        kept = shape.layers * layer + shape.backward_per_token_layer()
    activations = n * (kept + shape.outside_layers_per_token())
    rows = batch * answer_rows
    # one checkpointed chunk of the student: bf16 logits, fp32 copy, log-softmax and its gradient (and the
    # teacher's log-softmax); the teacher's fp32 logits of the answer window and of the gathered rows
    chunk = min(rows, ANSWER_CHUNK_ROWS) * shape.vocab * (shape.dtype_bytes + 4 * (4 if distill else 3))
    teacher = 2 * rows * shape.vocab * 4 if distill else 0
    logits = chunk + teacher
    margin = MARGIN_BYTES + int(MARGIN_SHARE * activations)
    return TrainingMemory(weight_bytes, activations, logits, margin)


def tokens_that_fit(shape: Shape, free: int, batch: int, checkpointing: bool, answer_rows: int, distill: bool,
                    weight_bytes: int) -> int:
    """The longest padded length whose step fits in `free` bytes (0 when not even the weights fit)."""
    fixed = estimate_training_memory(shape, 0, batch, checkpointing, answer_rows, distill, weight_bytes).total
    per_token = estimate_training_memory(shape, 1, batch, checkpointing, answer_rows, distill, 0).total - \
        estimate_training_memory(shape, 0, batch, checkpointing, answer_rows, distill, 0).total
    return max(0, (free - fixed) // per_token) if per_token > 0 else 0


def check_training_fits(shape: Shape, tokens: int, batch: int, checkpointing: bool, answer_rows: int,
                        distill: bool, free: int, weight_bytes: int, device: str,
                        can_checkpoint: bool = True) -> TrainingMemory:
    """Raise MemoryFitError, naming the estimate and the switch that helps, when the step cannot fit in `free`
    bytes; return the estimate otherwise. `can_checkpoint`: whether the backbone can recompute its layers."""
    need = estimate_training_memory(shape, tokens, batch, checkpointing, answer_rows, distill, weight_bytes)
    if need.total <= free:
        return need
    what = (f"training on {batch} x {tokens} tokens needs about {need.total / GIB:.1f} GiB of GPU memory "
            f"({need.describe()}) {'with' if checkpointing else 'without'} gradient_checkpointing, but {device} has "
            f"{free / GIB:.1f} GiB free")
    if not checkpointing and can_checkpoint:
        with_ckpt = estimate_training_memory(shape, tokens, batch, True, answer_rows, distill, weight_bytes)
        if with_ckpt.total <= free:
            raise MemoryFitError(f"{what}; set gradient_checkpointing=true (about {with_ckpt.total / GIB:.1f} GiB)")
    best = checkpointing or can_checkpoint
    fit = tokens_that_fit(shape, free, batch, best, answer_rows, distill, weight_bytes)
    even = "even with gradient_checkpointing=true it does not fit" if best else "the backbone cannot checkpoint"
    raise MemoryFitError(f"{what}; {even}: lower data.max_tokens / data.length_tokens or data.batch_size (about "
                         f"{fit} tokens per sample fit at batch {batch}), or shard the backbone over several GPUs "
                         "(trainer=fsdp)")


def free_cuda_memory(device: torch.device) -> int:
    """Bytes a new allocation can get on `device`: free memory plus what torch's allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def check_training_memory(model: torch.nn.Module, device: torch.device, tokens: int, batch: int,
                          checkpointing: bool, answer_rows: int, distill: bool, shards: int = 1) -> TrainingMemory | None:
    """Before the first step of a CUDA run: does one step fit? Weights already on `device` are part of its used
    memory; weights elsewhere (loaded on the CPU, moved by Lightning) count, divided over `shards` (FSDP). Returns
    None off CUDA, where free memory is not known."""
    if device.type != "cuda":
        return None
    param = next(model.parameters())
    shape = Shape.of(model.config, param.dtype)
    resident = param.device.type == "cuda"
    weight_bytes = 0 if resident else sum(p.numel() * p.element_size() for p in model.parameters()) // shards
    return check_training_fits(shape, tokens, batch, checkpointing, answer_rows, distill,
                               free_cuda_memory(device), weight_bytes, str(device),
                               bool(getattr(model, "supports_gradient_checkpointing", False)))
