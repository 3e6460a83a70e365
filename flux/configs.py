"""Building flux's objects from a composed config: the library side of the entry points (train, evaluate, demo).

`build_pattern` and `build_backbone` turn the `sparse` and `backbone` groups into objects, so every entry point reads
those groups the same way without importing another entry point.

`build` is Hydra instantiation that lets a user's mistake surface as flux's own message:
hydra.utils.instantiate wraps every exception from the target in InstantiationException, which buries "file not
found: x.jsonl (give the path ...)" under a Hydra stack trace. flux's errors are the message the user needs, so they
are re-raised as they are; anything else keeps Hydra's context.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flux.attention.patterns import SparsePattern, get_pattern
from flux.backbone import Backbone, load_backbone


def build(config: Any, **kwargs: Any) -> Any:
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError, KeyError, TypeError)):
            raise cause from None
        raise


def build_pattern(cfg: DictConfig) -> SparsePattern:
    """The sparse pattern of `cfg.sparse` (its `name` picks the registered pattern, the other keys are its settings)."""
    params = {k: v for k, v in OmegaConf.to_container(cfg.sparse, resolve=True).items() if k != "name"}
    return get_pattern(cfg.sparse.name, **params)


def build_backbone(cfg: DictConfig) -> Backbone:
    """The frozen backbone of `cfg.backbone` (its `description` is documentation, not a loader argument)."""
    params = OmegaConf.to_container(cfg.backbone, resolve=True)
    params.pop("description", None)
    return load_backbone(**params)
