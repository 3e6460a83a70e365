"""Layer routers: decide per input whether each layer may run sparse attention.

`LayerRouter` holds one small MLP per layer (as in the paper's code). At prefill, layer l's router reads that layer's
query states, averaged over heads and pooled over four short spans (the first and last `pool_size` tokens of the
marked context and question), and emits two logits (FA, SA). Only 4 * pool_size query vectors are touched, and the
MLP runs once per sample, so the router's cost does not grow with the context.

Training samples a straight-through Gumbel-softmax gate: the forward value is hard (0 or 1, so the layer really runs
one branch's output) while gradients flow through the soft sample. Inference takes the argmax, or a threshold on
P(SA) chosen to hit a requested sparsity. `GlobalRouter` is the ablation: one MLP reading an early layer emits every
later layer's decision at once.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flux.plan import LayerDecision, Plan

POOLING = ("first_last", "mean")


class RouterConfigError(ValueError):
    """An invalid router setting (temperature, pool size, hidden sizes, ...)."""


@dataclass
class RouterConfig:
    """Router hyper-parameters; saved next to the weights so an exported router rebuilds itself."""

    kind: str = "per_layer"
    pool_size: int = 16
    hidden: list[int] = field(default_factory=lambda: [128])
    init_fa_bias: float = 3.0
    tau: float = 1.0
    pooling: str = "first_last"
    read_layer: int = 1
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("per_layer", "global"):
            raise RouterConfigError(f"router kind must be 'per_layer' or 'global', got {self.kind!r}")
        if self.pool_size < 1:
            raise RouterConfigError(f"router pool_size must be >= 1, got {self.pool_size}")
        if self.tau <= 0:
            raise RouterConfigError(f"router temperature tau must be > 0, got {self.tau}; use e.g. tau=1.0")
        if self.pooling not in POOLING:
            raise RouterConfigError(f"router pooling must be one of {POOLING}, got {self.pooling!r}")
        if any(h < 1 for h in self.hidden):
            raise RouterConfigError(f"router hidden sizes must be >= 1, got {self.hidden}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise RouterConfigError(f"router threshold must lie in (0, 1), got {self.threshold}")


def _mlp(in_dim: int, hidden: list[int], out_dim: int, fa_bias: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    dim = in_dim
    for h in hidden:
        layers += [nn.Linear(dim, h), nn.GELU()]
        dim = h
    last = nn.Linear(dim, out_dim)
    # Start every layer on FA: tiny weights, bias favouring the FA logit (even index) by `fa_bias`.
    nn.init.normal_(last.weight, std=1e-3)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([fa_bias / 2, -fa_bias / 2]).repeat(out_dim // 2))
    layers.append(last)
    return nn.Sequential(*layers)


def span_indices(segments: dict[str, torch.Tensor] | None, valid: torch.Tensor | None, batch: int, length: int,
                 pool: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices [B, 4, pool] (first/last `pool` tokens of context, then of question) and their validity.

    A sample without a marked segment (no segments at all, or an empty span) pools that segment over its whole real
    sequence instead; spans shorter than `pool` are masked, never padded with other tokens.
    """
    start = (~valid).sum(dim=-1).to(device) if valid is not None else torch.zeros(batch, dtype=torch.long,
                                                                                     device=device)
    whole = torch.stack([start, torch.full_like(start, length)], dim=-1)
    spans = [whole, whole]
    if segments and "context" in segments and "question" in segments:
        spans = [torch.where((seg[:, 1] > seg[:, 0])[:, None], seg, whole)
                 for seg in (segments["context"].to(device), segments["question"].to(device))]
    offsets = torch.arange(pool, device=device)
    idx, ok = [], []
    for span in spans:
        s, e = span[:, 0:1], span[:, 1:2]
        first = s + offsets
        last = e - pool + offsets
        idx += [first, last]
        ok += [first < e, last >= s]
    index = torch.stack(idx, dim=1).clamp(0, length - 1)
    return index, torch.stack(ok, dim=1)


def pool_queries(query: torch.Tensor, index: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Mean over heads and over each span's tokens: [B, H, T, D] -> [B, 4 * D]. Gathers only 4 * pool tokens."""
    b, h, _t, d = query.shape
    flat = index.reshape(b, 1, -1, 1).expand(b, h, -1, d)
    picked = query.gather(2, flat).float().mean(dim=1).reshape(b, index.shape[1], index.shape[2], d)
    w = ok.float().unsqueeze(-1)
    pooled = (picked * w).sum(dim=2) / w.sum(dim=2).clamp(min=1.0)
    return pooled.reshape(b, -1)


def gumbel_straight_through(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard one-hot with soft gradients, soft sample) for logits [..., 2]."""
    u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32, generator=generator)
    g = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
    soft = ((logits.float() + g) / tau).softmax(dim=-1)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
    return hard - soft.detach() + soft, soft


class LayerRouter(nn.Module):
    """One router per layer (kind='per_layer') or one global router (kind='global')."""

    def __init__(self, num_layers: int, head_dim: int, config: RouterConfig | None = None, **overrides) -> None:
        super().__init__()
        self.config = config or RouterConfig(**overrides)
        self.num_layers, self.head_dim = num_layers, head_dim
        cfg = self.config
        if cfg.kind == "global" and not 0 <= cfg.read_layer < num_layers:
            raise RouterConfigError(f"global router read_layer must be in [0, {num_layers}), got {cfg.read_layer}")
        in_dim = 4 * head_dim
        if cfg.kind == "per_layer":
            self.mlps = nn.ModuleList(_mlp(in_dim, cfg.hidden, 2, cfg.init_fa_bias) for _ in range(num_layers))
        else:
            self.mlps = nn.ModuleList([_mlp(in_dim, cfg.hidden, 2 * num_layers, cfg.init_fa_bias)])
        self.register_buffer("tau", torch.tensor(float(cfg.tau)), persistent=False)

    def set_tau(self, tau: float) -> None:
        if tau <= 0:
            raise RouterConfigError(f"router temperature tau must be > 0, got {tau}")
        self.tau.fill_(float(tau))

    def logits_for(self, layer_idx: int, query: torch.Tensor, segments, valid,
                   spans: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Logits [B, 2] for one layer, or [B, L, 2] from the global router at its read layer (None elsewhere).
        `spans` are span_indices computed once per forward and shared by every layer (they depend on the input
        only)."""
        cfg = self.config
        if cfg.kind == "global" and layer_idx != cfg.read_layer:
            return None
        b, _, t, _ = query.shape
        if cfg.pooling == "mean":
            w = valid.float() if valid is not None else torch.ones(b, t, device=query.device)
            q = query.float().mean(dim=1)
            pooled = ((q * w[..., None]).sum(1) / w.sum(1, keepdim=True)).repeat(1, 4)
        else:
            index, ok = spans if spans is not None else span_indices(segments, valid, b, t,
                                                                     min(cfg.pool_size, t), query.device)
            pooled = pool_queries(query, index, ok)
        mlp = self.mlps[layer_idx if cfg.kind == "per_layer" else 0]
        mlp_dtype = next(mlp.parameters()).dtype
        logits = mlp(pooled.to(mlp_dtype)).float()
        return logits if cfg.kind == "per_layer" else logits.view(b, self.num_layers, 2)

    def as_plan(self, threshold: float | None = None, generator: torch.Generator | None = None) -> RouterPlan:
        return RouterPlan(self, threshold=threshold, generator=generator)


class RouterPlan(Plan):
    """A plan backed by a router. Records logits per layer so losses and metrics can read them after the forward.

    In training mode (router.training) gates are straight-through Gumbel samples (both branches run); otherwise
    decisions are hard: argmax, or P(SA) > threshold when a threshold is set (see `calibrate_threshold`). The global
    router keeps every layer up to and including its read layer on FA: those layers run before it has decided.
    `gates` keeps each routed layer's straight-through gate (training only): the sparsity constraint needs a
    differentiable hard value for the routed layers even when unrouted layers leave the model without a full gate set.
    """

    name = "router"

    def __init__(self, router: LayerRouter, threshold: float | None = None,
                 generator: torch.Generator | None = None, valid: torch.Tensor | None = None) -> None:
        self.router = router
        self.generator = generator
        self.valid = valid
        self.threshold = threshold if threshold is not None else router.config.threshold
        self.logits: dict[int, torch.Tensor] = {}
        self.soft: dict[int, torch.Tensor] = {}
        self.gates: dict[int, torch.Tensor] = {}
        self._global: torch.Tensor | None = None
        self._spans: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin_forward(self, valid: torch.Tensor | None) -> None:
        """Called by FluxModel before each forward: new padding, and no records or pooling indices from the last."""
        self.valid = valid
        self.logits, self.soft, self.gates = {}, {}, {}
        self._global, self._spans = None, None

    def spans(self, query: torch.Tensor, segments) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooling indices for this forward, built at the first routed layer and reused by the others."""
        b, _, t, _ = query.shape
        if self._spans is None:
            pool = min(self.router.config.pool_size, t)
            self._spans = span_indices(segments, self.valid, b, t, pool, query.device)
        return self._spans

    def decide(self, layer_idx: int, query: torch.Tensor, segments) -> LayerDecision:
        router = self.router
        if router.config.kind == "global":
            read = router.config.read_layer
            if layer_idx == read:
                self._global = router.logits_for(layer_idx, query, segments, self.valid,
                                                 self.spans(query, segments))
            if layer_idx <= read:
                return LayerDecision(torch.zeros(query.shape[0], dtype=torch.bool, device=query.device),
                                     uniform=False)
            logits = self._global[:, layer_idx]
        else:
            logits = router.logits_for(layer_idx, query, segments, self.valid, self.spans(query, segments))
        self.logits[layer_idx] = logits
        if router.training:
            z, soft = gumbel_straight_through(logits, float(router.tau), self.generator)
            self.soft[layer_idx] = soft[:, 0]
            self.gates[layer_idx] = z[:, 0]
            return LayerDecision(z[:, 0] < 0.5, gate=z[:, 0])
        p_sa = logits.softmax(dim=-1)[:, 1]
        self.soft[layer_idx] = 1 - p_sa
        return LayerDecision(p_sa > (self.threshold if self.threshold is not None else 0.5))

    def routed_layers(self) -> list[int]:
        """Layers whose decision the router made (all of them, or those after the global router's read layer)."""
        return sorted(self.logits)


def calibrate_threshold(p_sa: torch.Tensor, sparsity: float) -> float:
    """Threshold on P(SA) so that a fraction `sparsity` of (sample, layer) decisions are SA on calibration data."""
    if not 0.0 <= sparsity <= 1.0:
        raise RouterConfigError(f"target sparsity must be in [0, 1], got {sparsity}")
    flat = p_sa.flatten().float().sort(descending=True).values
    k = round(sparsity * flat.numel())
    if k == 0:
        return 1.0 - 1e-6
    if k >= flat.numel():
        return float(flat[-1]) * (1 - 1e-6)
    return float((flat[k - 1] + flat[k]) / 2)


def cosine_tau(step: int, total_steps: int, tau_start: float = 1.5, tau_end: float = 1.0,
               fraction: float = 0.6) -> float:
    """Temperature schedule: cosine from tau_start to tau_end over the first `fraction` of training, then flat."""
    if tau_start <= 0 or tau_end <= 0:
        raise RouterConfigError(f"temperatures must be > 0, got tau_start={tau_start}, tau_end={tau_end}")
    span = max(1.0, fraction * total_steps)
    progress = min(1.0, step / span)
    return tau_end + (tau_start - tau_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def router_config_dict(router: LayerRouter) -> dict:
    return {**asdict(router.config), "num_layers": router.num_layers, "head_dim": router.head_dim}


# -- router files: router.safetensors + router.json ------------------------------------------------------------

def export_router(router: LayerRouter, out_dir: str | Path, backbone: str, pattern: dict[str, Any],
                  summary: dict[str, Any] | None = None) -> Path:
    """Write router.safetensors + router.json (enough to rebuild and run the router without Lightning)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in router.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=".router.", dir=out)
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, out / "router.safetensors")
    meta = {"backbone": backbone, "num_layers": router.num_layers, "head_dim": router.head_dim,
            "sparse": pattern, "router": router_config_dict(router), "training": summary or {}}
    (out / "router.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


class RouterCheckpointError(ValueError):
    """A router checkpoint is missing, malformed, or made for another backbone."""


def check_router_files(path: str | Path | None) -> tuple[Path, Path]:
    """(weights, metadata) paths of an exported router (its folder or its router.safetensors), or a clear error."""
    if not path:
        raise RouterCheckpointError("a router is needed but no checkpoint was given; pass routing.checkpoint=PATH "
                                    "(a folder with router.safetensors and router.json, as written by flux.train)")
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    weights, meta_path = folder / "router.safetensors", folder / "router.json"
    if not weights.is_file() or not meta_path.is_file():
        raise RouterCheckpointError(f"router checkpoint {str(path)!r} needs router.safetensors and router.json in "
                                    f"{folder}; export one with flux.train (it writes both at the end)")
    return weights, meta_path


def load_router(path: str | Path, backbone_name: str | None = None, num_layers: int | None = None
                ) -> tuple[LayerRouter, dict[str, Any]]:
    """Load an exported router (folder or router.safetensors path); checks backbone and layer count when given."""
    weights, meta_path = check_router_files(path)
    meta = json.loads(meta_path.read_text())
    if backbone_name is not None and meta.get("backbone") != backbone_name:
        raise RouterCheckpointError(f"router {str(path)!r} was trained for backbone {meta.get('backbone')!r}, not "
                                    f"{backbone_name!r}; use the matching backbone or retrain the router")
    if num_layers is not None and meta.get("num_layers") != num_layers:
        raise RouterCheckpointError(f"router {str(path)!r} routes {meta.get('num_layers')} layers but the backbone "
                                    f"has {num_layers}; it belongs to another model")
    cfg = {k: v for k, v in meta["router"].items() if k not in ("num_layers", "head_dim")}
    router = LayerRouter(meta["num_layers"], meta["head_dim"], RouterConfig(**cfg))
    router.load_state_dict(load_file(str(weights)))
    return router.eval(), meta
