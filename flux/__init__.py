"""flux: a trained per-layer router sends each layer of a frozen LLM to full or sparse attention (FluxAttention)."""

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _unshadow_kernels_folder() -> None:
    """Drop the repository root from sys.path when it is there (running `python -m ...` from a clone puts it
    first). Our top-level `kernels/` folder would otherwise shadow the unrelated `kernels` package that transformers
    probes for, and some transformers versions then fail to import `modeling_utils`. flux itself is installed (or
    already imported), and its Triton kernels are reached as `flux_kernels`, so nothing needs the root on the path.
    """
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if not _os.path.isdir(_os.path.join(root, "kernels")):
        return
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != root]


def _register_with_lm_eval() -> None:
    """Make `flux` a model name of lm-evaluation-harness when it is installed. lm-eval 0.4 reads no plugin entry
    points, so flux registers itself on import; the entry is a lazy path, so the backend (and torch) load only when
    lm-eval builds a `flux` model. Costs one find_spec without lm-eval, and importing lm-eval's registry (~0.1 s,
    mostly importlib.metadata, which transformers imports anyway) with it."""
    if _importlib_util.find_spec("lm_eval") is None:
        return
    from lm_eval.api.registry import model_registry

    if "flux" not in model_registry:
        model_registry.register("flux", target="flux.lm_eval_backend:FluxLM")


_unshadow_kernels_folder()
_register_with_lm_eval()
__version__ = "0.1.0"
