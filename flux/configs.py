"""Building flux's objects from a composed config: the library side of the entry points (train, evaluate, demo).

`build_pattern` and `build_backbone` turn the `sparse` and `backbone` groups into objects, so every entry point reads
those groups the same way without importing another entry point.

`build` is Hydra instantiation that lets a user's mistake surface as flux's own message:
hydra.utils.instantiate wraps every exception from the target in InstantiationException, which buries "file not
found: x.jsonl (give the path ...)" under a Hydra stack trace. flux's user errors are the message the user needs, so
they are re-raised as they are. A library's ValueError/TypeError/KeyError/FileNotFoundError raised while building an
object from a config node (an unknown keyword such as `+data.foo=1`, a value the class rejects) is a config mistake
too (as is Lightning's MisconfigurationException, e.g. `trainer.accelerator=gpu` without a GPU): it becomes one
ConfigError naming the node's target. Anything else keeps Hydra's context (a bug, not a setting).
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flux.attention.patterns import SparsePattern, get_pattern
from flux.backbone import Backbone, load_backbone
from flux.errors import ConfigError, FluxUserError, one_line, user_error_types


def _target(config: Any) -> str:
    target = config.get("_target_") if isinstance(config, (dict, DictConfig)) else None
    return str(target) if target else "config"


def build(config: Any, **kwargs: Any) -> Any:
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, FluxUserError):
            raise cause from None
        if isinstance(cause, (ValueError, FileNotFoundError, KeyError, TypeError, *user_error_types())):
            raise ConfigError(f"{_target(config)}: {one_line(str(cause))}; fix this setting in the config") from cause
        raise


def build_pattern(cfg: DictConfig) -> SparsePattern:
    """The sparse pattern of `cfg.sparse` (its `name` picks the registered pattern, the other keys are its settings);
    a null setting keeps the pattern class's own default (the one documented default)."""
    params = {k: v for k, v in OmegaConf.to_container(cfg.sparse, resolve=True).items()
              if k != "name" and v is not None}
    return get_pattern(cfg.sparse.name, **params)


def build_backbone(cfg: DictConfig, device: str | None = None) -> Backbone:
    """The frozen backbone of `cfg.backbone` (its `description` is documentation, not a loader argument); `device`
    replaces the configured one when given."""
    params = OmegaConf.to_container(cfg.backbone, resolve=True)
    params.pop("description", None)
    if device is not None:
        params["device"] = device
    return load_backbone(**params)
