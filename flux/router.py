"""Layer routers: decide per input whether each layer may run sparse attention.

`LayerRouter` holds one small MLP per layer (as in the paper's code). At prefill, layer l's router reads that layer's
query states, averaged over heads and pooled over four short spans (the first and last `pool_size` tokens of the
marked context and question), and emits two logits (FA, SA). Only 4 * pool_size query vectors are touched, and the
MLP runs once per sample, so the router's cost does not grow with the context. The other poolings are ablations:
`question` reads only the question's two spans, `first_token` only the first real token (under causal attention its
query is the same for every input, so that router learns one plan for all inputs: the control for context
awareness), and `mean` averages every token.

Training samples a straight-through Gumbel-softmax gate: the forward value is hard (0 or 1, so the layer really runs
one branch's output) while gradients flow through the soft sample. Inference takes the argmax, or a threshold on
P(SA) chosen to hit a requested sparsity. `GlobalRouter` is the ablation: one MLP reading an early layer emits every
later layer's decision at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from flux.atomic import write_files_atomically
from flux.backbone import Backbone, architecture
from flux.errors import FluxUserError
from flux.evals.results import validate_results
from flux.hub import fetch_folder, split_hub_id
from flux.plan import LayerDecision, Plan
from flux.router_card import PAPER as PAPER_URL
from flux.router_card import render_router_card

# Pooling -> how many head_dim-sized vectors the router's MLP reads (`mean` keeps the four slots of first_last,
# filled with the one whole-sequence mean, so routers saved with it keep their input size).
POOLING_SPANS = {"first_last": 4, "question": 2, "first_token": 1, "mean": 4}
POOLING = tuple(POOLING_SPANS)


class RouterConfigError(FluxUserError):
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
    sequence instead (its real tokens, wherever the padding is); spans shorter than `pool` are masked, never padded
    with other tokens.
    """
    if valid is None:
        start = torch.zeros(batch, dtype=torch.long, device=device)
        end = torch.full_like(start, length)
    else:
        valid = valid.to(device)
        pos = torch.arange(length, device=device)
        start = torch.where(valid, pos, length).min(dim=-1).values
        end = torch.where(valid, pos + 1, 0).max(dim=-1).values
    whole = torch.stack([start, end], dim=-1)
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


def pooling_spans(pooling: str, segments: dict[str, torch.Tensor] | None, valid: torch.Tensor | None, batch: int,
                  length: int, pool: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The spans a span pooling reads, from `span_indices`: [B, S, pool] indices and validity with S spans
    (POOLING_SPANS). `question` keeps the question's first and last `pool` tokens; `first_token` the sequence's first
    real token (one span of one token)."""
    if pooling == "first_token":
        index, ok = span_indices(None, valid, batch, length, 1, device)
        return index[:, :1], ok[:, :1]
    index, ok = span_indices(segments, valid, batch, length, pool, device)
    return (index[:, 2:], ok[:, 2:]) if pooling == "question" else (index, ok)


def pool_queries(query: torch.Tensor, index: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Mean over heads and over each span's tokens: [B, H, T, D] -> [B, S * D] for S spans. Gathers only the
    spans' tokens."""
    b, h, _t, d = query.shape
    flat = index.reshape(b, 1, -1, 1).expand(b, h, -1, d)
    picked = query.gather(2, flat).float().mean(dim=1).reshape(b, index.shape[1], index.shape[2], d)
    w = ok.float().unsqueeze(-1)
    pooled = (picked * w).sum(dim=2) / w.sum(dim=2).clamp(min=1.0)
    return pooled.reshape(b, -1)


def gumbel_straight_through(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None,
                            u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard one-hot with soft gradients, soft sample) for logits [..., 2]; `u` reuses earlier uniform draws."""
    if u is None:
        u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32, generator=generator)
    g = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
    soft = ((logits.float() + g) / tau).softmax(dim=-1)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
    return hard - soft.detach() + soft, soft


@dataclass
class RouterCard:
    """What a router's files say besides its weights: the backbone it reads (name, fingerprint, architecture), the
    sparse pattern it was trained with, how training ended, and an evaluation (a results.json) when one is attached.
    It becomes router.json and the model card."""

    backbone: str
    backbone_fingerprint: str | None
    backbone_architecture: dict[str, Any] | None
    sparse: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None

    @classmethod
    def for_backbone(cls, backbone: Backbone, sparse: dict[str, Any], training: dict[str, Any] | None = None,
                     evaluation: dict[str, Any] | None = None) -> RouterCard:
        return cls(backbone.name, backbone.fingerprint, architecture(backbone.config), dict(sparse),
                   dict(training or {}), evaluation)


class LayerRouter(nn.Module, ModelHubMixin, library_name="flux", paper_url=PAPER_URL,
                  tags=["flux-attention", "layer-router", "sparse-attention"]):
    """One router per layer (kind='per_layer') or one global router (kind='global').

    Saved and loaded in huggingface_hub's ModelHubMixin conventions: `save_pretrained(folder)`, `push_to_hub(repo_id)`
    and `LayerRouter.from_pretrained(folder or "org/name")`. The folder is the one export_router writes and
    load_router reads (router.safetensors, router.json, and a README.md model card); router.json takes the place of
    the mixin's config.json. Saving needs `card` (set by export_router and by loading).
    """

    def __init__(self, num_layers: int, head_dim: int, config: RouterConfig | None = None, **overrides) -> None:
        super().__init__()
        self._hub_mixin_config = None  # router.json, written by _save_pretrained, is the config; no config.json
        self.card: RouterCard | None = None
        self._card_repo_id: str | None = None
        self.config = config or RouterConfig(**overrides)
        self.num_layers, self.head_dim = num_layers, head_dim
        cfg = self.config
        if cfg.kind == "global" and not 0 <= cfg.read_layer < num_layers:
            raise RouterConfigError(f"global router read_layer must be in [0, {num_layers}), got {cfg.read_layer}")
        in_dim = POOLING_SPANS[cfg.pooling] * head_dim
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
        `spans` are the pooling's spans (pooling_spans) computed once per forward and shared by every layer (they
        depend on the input only)."""
        cfg = self.config
        if cfg.kind == "global" and layer_idx != cfg.read_layer:
            return None
        b, _, t, _ = query.shape
        if cfg.pooling == "mean":
            w = valid.float() if valid is not None else torch.ones(b, t, device=query.device)
            q = query.float().mean(dim=1)
            pooled = ((q * w[..., None]).sum(1) / w.sum(1, keepdim=True)).repeat(1, 4)
        else:
            index, ok = spans if spans is not None else pooling_spans(cfg.pooling, segments, valid, b, t,
                                                                      min(cfg.pool_size, t), query.device)
            pooled = pool_queries(query, index, ok)
        mlp = self.mlps[layer_idx if cfg.kind == "per_layer" else 0]
        mlp_dtype = next(mlp.parameters()).dtype
        logits = mlp(pooled.to(mlp_dtype)).float()
        return logits if cfg.kind == "per_layer" else logits.view(b, self.num_layers, 2)

    def as_plan(self, threshold: float | None = None, generator: torch.Generator | None = None) -> RouterPlan:
        return RouterPlan(self, threshold=threshold, generator=generator)

    # -- ModelHubMixin ------------------------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        write_router_files(self, save_directory, self._card_repo_id)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """ModelHubMixin.push_to_hub (create the repo, save into a temp folder, upload it in one commit), with the repo
        id written into the model card's usage lines."""
        self._card_repo_id = repo_id
        try:
            return super().push_to_hub(repo_id, **kwargs)
        finally:
            self._card_repo_id = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, force_download: bool = False,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, revision: str | None = None,
                        backbone: Backbone | None = None) -> LayerRouter:
        """A router from a local folder or a Hub id (`org/name`, `org/name@revision`), checked against `backbone`
        when given; `router.card` holds its router.json. Same as `load_router(...)[0]`."""
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token, backbone=backbone)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         backbone: Backbone | None = None) -> LayerRouter:
        router, _ = load_router(model_id, backbone, revision=revision, cache_dir=cache_dir,
                                force_download=force_download, local_files_only=local_files_only, token=token)
        return router


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
        self._noise: dict[int, torch.Tensor] = {}

    def begin_forward(self, valid: torch.Tensor | None) -> None:
        """Called by FluxModel before each forward: new padding, and no records or pooling indices from the last."""
        self.valid = valid
        self.logits, self.soft, self.gates = {}, {}, {}
        self._global, self._spans = None, None
        self._noise = {}

    def query_positions(self, batch: int, length: int, segments, device: torch.device) -> torch.Tensor | None:
        """The pooling's span positions [B, S * pool] (None for `mean`, which reads every query). Later `decide`
        calls of this forward get queries at exactly these positions, so the spans are re-pointed at them."""
        cfg = self.router.config
        if cfg.pooling == "mean":
            return None
        index, ok = pooling_spans(cfg.pooling, segments, self.valid, batch, length, min(cfg.pool_size, length),
                                  device)
        compact = torch.arange(index[0].numel(), device=device).view(1, *index.shape[1:]).expand_as(index)
        self._spans = (compact, ok)
        return index.reshape(batch, -1)

    def spans(self, query: torch.Tensor, segments) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooling indices for this forward, built at the first routed layer and reused by the others."""
        b, _, t, _ = query.shape
        if self._spans is None:
            cfg = self.router.config
            self._spans = pooling_spans(cfg.pooling, segments, self.valid, b, t, min(cfg.pool_size, t), query.device)
        return self._spans

    def decide(self, layer_idx: int, query: torch.Tensor, segments) -> LayerDecision:
        """The layer's decision. A second call for a layer within one forward is gradient checkpointing re-running
        it in the backward: it computes the same decision (same Gumbel noise), so the recomputation saves what the
        forward saved, but records nothing. Recording would keep the recomputed logits and gates, and through their
        graphs every tensor the recomputation saved upstream of the router (the layer's normed input, its queries),
        alive until the backward ends: all layers' recomputed activations at once, which checkpointing exists to
        avoid (experiments/train_scale: 4.3 KB per token and layer at hidden 512, ~30 GiB at 32k on Qwen3-8B)."""
        router = self.router
        recomputing = layer_idx in self.logits
        if router.config.kind == "global":
            read = router.config.read_layer
            if layer_idx == read:
                logits = router.logits_for(layer_idx, query, segments, self.valid, self.spans(query, segments))
                if not recomputing:
                    self._global = logits
            if layer_idx <= read:
                return LayerDecision(torch.zeros(query.shape[0], dtype=torch.bool, device=query.device),
                                     uniform=False)
            logits = self._global[:, layer_idx]
        else:
            logits = router.logits_for(layer_idx, query, segments, self.valid, self.spans(query, segments))
        if not recomputing:
            self.logits[layer_idx] = logits
        if router.training:
            # a layer re-run by gradient checkpointing draws the same Gumbel noise, so it routes as its forward did
            if layer_idx not in self._noise:
                self._noise[layer_idx] = torch.rand(logits.shape, device=logits.device, dtype=torch.float32,
                                                    generator=self.generator)
            z, soft = gumbel_straight_through(logits, float(router.tau), u=self._noise[layer_idx])
            if not recomputing:
                self.soft[layer_idx] = soft[:, 0]
                self.gates[layer_idx] = z[:, 0]
            return LayerDecision(z[:, 0] < 0.5, gate=z[:, 0])
        p_sa = logits.softmax(dim=-1)[:, 1]
        if not recomputing:
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
#
# An exported router is a folder with router.safetensors (the MLP weights, float32), router.json (how to rebuild the
# router, which backbone it reads, the sparse pattern it was trained with, a training summary, an optional
# evaluation) and README.md (the model card rendered from router.json, for the Hub). That is enough to run it without
# Lightning. router.json records the backbone's architecture and its fingerprint, checked
# when the router is loaded onto a backbone, and the sha256 of router.safetensors, so a folder whose two files come
# from different exports (an export killed between its two renames) is refused instead of silently mixed.

WEIGHTS_FILE = "router.safetensors"
META_FILE = "router.json"
CARD_FILE = "README.md"
META_REQUIRED = ("backbone", "num_layers", "head_dim", "router")
REEXPORT = "export it again (flux.train writes both files at the end of training) or fetch it again"


class RouterCheckpointError(FluxUserError):
    """A router checkpoint is missing, unreadable, corrupt, or made for another backbone."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def router_meta(router: LayerRouter) -> dict[str, Any]:
    """router.json's content (without the weights' digest, added when the weights are written)."""
    card = router.card
    if card is None:
        raise RouterCheckpointError("this router has no card (backbone, sparse pattern); export it with "
                                    "export_router(router, folder, backbone, pattern) or set "
                                    "router.card = RouterCard.for_backbone(backbone, pattern.describe())")
    evaluation = validate_results(card.evaluation, "router evaluation") if card.evaluation is not None else None
    return {"backbone": card.backbone, "backbone_fingerprint": card.backbone_fingerprint,
            "backbone_architecture": card.backbone_architecture, "num_layers": router.num_layers,
            "head_dim": router.head_dim, "sparse": card.sparse, "router": router_config_dict(router),
            "training": card.training, "evaluation": evaluation}


def write_router_files(router: LayerRouter, out_dir: str | Path, repo_id: str | None = None) -> Path:
    """router.safetensors, router.json and the README.md model card, written as a set, each all or nothing
    (flux.atomic), mode 0644; temp files that an earlier, killed export left there are removed first."""
    out = Path(out_dir)
    meta = router_meta(router)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in router.state_dict().items()}

    def write_weights(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        meta["weights_sha256"] = file_sha256(tmp)

    def write_meta(tmp: Path) -> None:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    def write_card(tmp: Path) -> None:
        tmp.write_text(render_router_card(meta, repo_id), encoding="utf-8")

    write_files_atomically({out / WEIGHTS_FILE: write_weights, out / META_FILE: write_meta, out / CARD_FILE: write_card})
    return out


def export_router(router: LayerRouter, out_dir: str | Path, backbone: Backbone, pattern: dict[str, Any],
                  summary: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None) -> Path:
    """Describe the router (its card: backbone, sparse pattern, training summary, optional results.json) and save it
    into `out_dir` (router.safetensors + router.json + README.md), ready for load_router or push_to_hub."""
    router.card = RouterCard.for_backbone(backbone, pattern, summary, evaluation)
    router.save_pretrained(out_dir)
    return Path(out_dir)


def check_router_files(path: str | Path | None, revision: str | None = None, **download: Any) -> tuple[Path, Path]:
    """(weights, metadata) paths of an exported router: its local folder, its router.safetensors, or a Hub id
    (`org/name`, `org/name@revision`) fetched into the Hub cache; a clear error otherwise."""
    if not path:
        raise RouterCheckpointError("a router is needed but no checkpoint was given; pass routing.checkpoint=PATH "
                                    "(a folder with router.safetensors and router.json, as written by flux.train, or "
                                    "a Hub id org/name)")
    p = Path(path).expanduser()
    if not p.exists() and split_hub_id(str(path)) is not None:
        p = fetch_folder(str(path), "router", [WEIGHTS_FILE, META_FILE], RouterCheckpointError, revision, **download)
    folder = p if p.is_dir() else p.parent
    weights, meta_path = folder / WEIGHTS_FILE, folder / META_FILE
    if not weights.is_file() or not meta_path.is_file():
        raise RouterCheckpointError(f"router checkpoint {str(path)!r} needs router.safetensors and router.json in "
                                    f"{folder}; export one with flux.train (it writes both at the end)")
    return weights, meta_path


def read_router_meta(meta_path: Path) -> dict[str, Any]:
    """router.json, checked for the keys a router is rebuilt from."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise RouterCheckpointError(f"cannot read {meta_path} ({err}); {REEXPORT}") from None
    except json.JSONDecodeError as err:
        raise RouterCheckpointError(f"{meta_path} is not valid JSON ({err.msg} at line {err.lineno}): the file is "
                                    f"empty, truncated or corrupt; {REEXPORT}") from None
    missing = [k for k in META_REQUIRED if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise RouterCheckpointError(f"{meta_path} lacks {missing}; it is not a router.json written by flux; {REEXPORT}")
    return meta


def check_router_backbone(meta: dict[str, Any], backbone: Backbone, source: str) -> None:
    """The router reads this backbone's query states: same architecture (fingerprint), layer count and head size."""
    trained_on, stored = meta["backbone"], meta.get("backbone_fingerprint")
    if stored is not None and stored != backbone.fingerprint:
        ours = architecture(backbone.config)
        theirs = meta.get("backbone_architecture") or {}
        diff = ", ".join(f"{k} {theirs.get(k)!r} vs {ours[k]!r}" for k in ours if theirs.get(k) != ours[k])
        raise RouterCheckpointError(
            f"router {source!r} was trained for backbone {trained_on!r} (fingerprint {stored}), not for "
            f"{backbone.name!r} (fingerprint {backbone.fingerprint}): {diff}; load it onto the backbone it was "
            "trained for, or train a router for this one")
    if stored is None and trained_on != backbone.name:
        raise RouterCheckpointError(f"router {source!r} was trained for backbone {trained_on!r}, not "
                                    f"{backbone.name!r}; use the matching backbone or retrain the router")
    if trained_on != backbone.name:
        warnings.warn(f"router {source!r} was trained on {trained_on!r} and is loaded onto {backbone.name!r}, a model "
                      "of the same architecture (fingerprint); its decisions are only as good as the two models agree",
                      stacklevel=3)
    if meta["num_layers"] != backbone.num_layers:
        raise RouterCheckpointError(f"router {source!r} routes {meta['num_layers']} layers but the backbone has "
                                    f"{backbone.num_layers}; it belongs to another model")
    if meta["head_dim"] != backbone.head_dim:
        raise RouterCheckpointError(f"router {source!r} reads query states of head size {meta['head_dim']} but the "
                                    f"backbone's heads have size {backbone.head_dim}; it belongs to another model")


def load_router(path: str | Path, backbone: Backbone | None = None, *, revision: str | None = None,
                **download: Any) -> tuple[LayerRouter, dict[str, Any]]:
    """Load an exported router in eval mode, with its router.json: a local folder (or its router.safetensors), or a
    Hub id `org/name` / `org/name@revision` (`download` goes to huggingface_hub: cache_dir, token, force_download,
    local_files_only). A local path always wins, so local folders work offline.

    With `backbone`, the router must have been trained for it (fingerprint, layer count, head size). Every problem
    with the files (missing, empty, truncated, corrupt, from two different exports, an unreachable Hub id) is one
    RouterCheckpointError that names the file or id.
    """
    weights, meta_path = check_router_files(path, revision, **download)
    meta = read_router_meta(meta_path)
    if backbone is not None:
        check_router_backbone(meta, backbone, str(path))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise RouterCheckpointError(f"{weights} is not a readable safetensors file ({err}): the file is empty, "
                                    f"truncated or corrupt; {REEXPORT}") from None
    recorded = meta.get("weights_sha256")
    if recorded is not None and file_sha256(weights) != recorded:
        raise RouterCheckpointError(f"{weights} is not the file {meta_path} was written with (its sha256 differs): an "
                                    f"export was interrupted between the two files, or one was replaced; {REEXPORT}")
    try:
        cfg = {k: v for k, v in meta["router"].items() if k not in ("num_layers", "head_dim")}
        router = LayerRouter(meta["num_layers"], meta["head_dim"], RouterConfig(**cfg))
    except (TypeError, AttributeError, RouterConfigError) as err:
        raise RouterCheckpointError(f"{meta_path} holds router settings flux cannot build ({err}); {REEXPORT}"
                                    ) from None
    try:
        router.load_state_dict(state)
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        raise RouterCheckpointError(f"{weights} does not fit the router {meta_path} describes ({reason:.300}); "
                                    f"the two files come from different routers; {REEXPORT}") from None
    router.card = RouterCard(meta["backbone"], meta.get("backbone_fingerprint"), meta.get("backbone_architecture"),
                             meta.get("sparse") or {}, meta.get("training") or {}, meta.get("evaluation"))
    return router.eval(), meta
