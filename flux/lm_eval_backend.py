"""lm-evaluation-harness backend: `--model flux` runs a FluxModel, a routed frozen backbone, on any lm-eval task.

    flux-lm-eval --model flux --model_args backbone=smollm2_135m,router=PATH_OR_HUB_ID,sparse=streaming \\
        --tasks <task> --batch_size 4

`import flux` registers the name `flux` with lm-eval when lm-eval is installed (lm-eval 0.4 reads no plugin entry
points); `flux-lm-eval` is lm-eval's own command line with flux imported first. All three request types run on the
engine: `generate_until` through `FluxModel.generate` (stop strings and `max_gen_toks`), `loglikelihood` and
`loglikelihood_rolling` through `FluxModel.forward` with only the scored positions' logits, in length-sorted,
left-padded batches. The share of layers each request ran on sparse attention (Omega) is collected and reported as
`flux_routing` in the results' config, beside the scores, and printed by `flux-lm-eval` after lm-eval's table.

model_args: `backbone` (a flux backbone source: preset, local folder, .gguf, hub id), `router` (a router folder or
Hub id `org/name[@revision]`), `routing` (router | dense | sparse; default router when a router is given, else dense),
`sparse` (pattern name; default the router's training pattern, else streaming) with `sparse.<setting>=value` for its
settings (e.g. `sparse.sink=64,sparse.window=256`), `dtype`, `device`, `batch_size`, `max_gen_toks`,
`truncate` (none | middle: whether a generation prompt too long for the backbone is an error, the default, or loses
the middle of its tokens as LongBench's protocol does; a scored text is never truncated), and `tokenizer`, which
only lm-eval's RULER tasks read (they size their generated prompts with it); the model uses its backbone's.
"""

from __future__ import annotations

import importlib
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from flux.attention.patterns import get_pattern
from flux.backbone import load_backbone
from flux.model import FluxModel
from flux.router import load_router

ROUTINGS = ("router", "dense", "sparse")
TRUNCATIONS = ("none", "middle")
# what a task's generation_kwargs may hold (lm-eval's aliases of max_gen_toks included)
GEN_KEYS = {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens", "do_sample",
            "temperature", "top_k", "top_p", "seed"}
SPARSE_PREFIX = "sparse."
# the backend built last in this process, so flux-lm-eval can print its routing report after lm-eval's table
LATEST: FluxLM | None = None


class FluxEvalError(ValueError):
    """A model argument or an lm-eval request the flux backend cannot serve; the message names it and the fix."""


class GenerationJob(NamedTuple):
    """One generate_until request, tokenized and checked: requests with equal settings share batches."""

    index: int
    context: list[int]
    until: list[str]
    budget: int
    sampling: dict[str, Any]

    def settings(self) -> str:
        return repr((self.until, self.budget, sorted(self.sampling.items())))


class FluxLM(TemplateLM):
    """A FluxModel behind lm-eval's LM interface; see the module docstring for its arguments."""

    def __init__(self, backbone: str = "smollm2_135m", router: str | None = None, routing: str | None = None,
                 sparse: str | None = None, dtype: str = "auto", device: str | None = None,
                 batch_size: int | str | None = 1, max_gen_toks: int = 256, truncate: str = "none",
                 tokenizer: str | None = None, **options: Any) -> None:
        super().__init__()
        global LATEST
        pattern_settings = {k.removeprefix(SPARSE_PREFIX): v for k, v in options.items() if k.startswith(SPARSE_PREFIX)}
        unknown = sorted(k for k in options if not k.startswith(SPARSE_PREFIX))
        if unknown:
            raise FluxEvalError(f"unknown flux model_args {unknown}; use backbone, router, routing, sparse, "
                                "sparse.<setting>, dtype, device, batch_size, max_gen_toks, truncate, tokenizer")
        routing = routing or ("router" if router else "dense")
        if routing not in ROUTINGS:
            raise FluxEvalError(f"routing={routing!r} is not one of {ROUTINGS}")
        if truncate not in TRUNCATIONS:
            raise FluxEvalError(f"truncate={truncate!r} is not one of {TRUNCATIONS}")
        if routing == "router" and not router:
            raise FluxEvalError("routing=router needs router=PATH_OR_HUB_ID (a router folder or org/name on the Hub)")
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise FluxEvalError(f"device={device!r} (lm-eval's default is cuda:0) but this machine has no CUDA device; "
                                "pass --device cpu")
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.truncate = truncate
        self.truncated = 0  # generation prompts that lost their middle (truncate=middle)
        self.backbone = load_backbone(backbone, dtype=dtype, device=device)
        self.tokenizer = self.backbone.tokenizer
        self.router, meta = (load_router(router, self.backbone) if router else (None, {}))
        if self.router is not None:
            self.router.to(self.backbone.device)
        # the router's own pattern by default (it was trained with it); explicit sparse.* settings win
        trained = dict(meta.get("sparse") or {})
        trained_name = trained.pop("pattern", None)
        name = sparse or trained_name or "streaming"
        self.pattern = get_pattern(name, **((trained if name == trained_name else {}) | pattern_settings))
        self.routing = routing
        self.model = FluxModel(self.backbone, pattern=self.pattern, router=self.router)
        self.router_source = router
        del tokenizer  # lm-eval hands it to RULER's data preparation; the model uses its backbone's tokenizer
        self.omega: dict[str, list[float]] = defaultdict(list)
        self._device = self.backbone.device
        LATEST = self

    # -- the TemplateLM interface ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.backbone.max_positions

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.backbone.name)).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def get_model_info(self) -> dict[str, Any]:
        """Added by lm-eval to the results' config: the model, the routing, and the sparsity Omega it reached."""
        return {"flux_routing": self.routing_report()}

    # -- scoring ---------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, kind: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding gives it) per request; `kind`
        names the request type in messages and in the routing report (rolling windows pass their own)."""
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise FluxEvalError(f"{kind} request {i} has an empty continuation; nothing to score")
            if len(ctx) + len(cont) - 1 > self.max_length:
                raise FluxEvalError(
                    f"{kind} request {i} needs {len(ctx) + len(cont) - 1} positions (context {len(ctx)} + "
                    f"continuation {len(cont)} tokens) but backbone {self.backbone.name!r} has {self.max_length}; "
                    "shorten the task's inputs or use a backbone with more positions (flux never truncates them)")
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in tqdm(range(0, len(order), self.batch_size), desc=f"flux {kind}", disable=disable_tqdm):
            idx = order[start:start + self.batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[:-1] for i in idx]
            keep = max(len(pairs[i][1]) for i in idx)
            ids, mask = self._left_padded(inputs)
            with torch.no_grad():
                out = self.model(ids, mask, plan=self._plan(), logits_to_keep=keep)
            logprobs = out.logits.float().log_softmax(dim=-1)
            for row, i in enumerate(idx):
                cont = torch.tensor(pairs[i][1], device=logprobs.device)
                rows = logprobs[row, keep - len(cont):]
                score = rows.gather(1, cont[:, None]).sum().item()
                results[i] = (score, bool((rows.argmax(dim=-1) == cont).all()))
            self._record(kind, out.decisions)
        if kind == "loglikelihood":  # rolling windows are cached as whole documents by their caller
            for (pair, _, _), result in zip(requests, results, strict=True):
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: windows of the model's length, each token predicted once."""
        windows, owner = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append(((text, ""), *window))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm, kind="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for n, (score, _) in zip(owner, scores, strict=True):
            totals[n] += score
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generation per request with its stop strings and token budget, batched by identical settings."""
        eos_text = self.tokenizer.decode([self.eot_token_id])
        jobs = []
        for n, request in enumerate(requests):
            context, raw = request.args
            unknown = sorted(set(raw) - GEN_KEYS)
            if unknown:
                raise FluxEvalError(f"generate_until request {n} asks for generation settings {unknown} the flux "
                                    f"backend does not have; it takes {sorted(GEN_KEYS)}")
            kwargs = normalize_gen_kwargs(raw, default_max_gen_toks=self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            ctx = self.tok_encode(context) or [self.prefix_token_id]  # as lm-eval conditions an empty context
            budget = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - budget
            if len(ctx) > room and self.truncate == "middle" and room >= 2:
                ctx = ctx[:room // 2] + ctx[len(ctx) - (room - room // 2):]
                self.truncated += 1
            if len(ctx) > room:
                raise FluxEvalError(
                    f"generate_until request {n}: a prompt of {len(ctx)} tokens plus max_gen_toks={budget} does not fit "
                    f"backbone {self.backbone.name!r} ({self.max_length} positions); shorten the task's inputs, lower "
                    "max_gen_toks, or pass truncate=middle to drop the middle of long prompts")
            jobs.append(GenerationJob(n, ctx, until, budget, kwargs))
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[GenerationJob]] = defaultdict(list)
        for job in jobs:
            groups[job.settings()].append(job)
        bar = tqdm(total=len(jobs), desc="flux generate_until", disable=disable_tqdm)
        for group in groups.values():
            group.sort(key=lambda job: -len(job.context))
            for start in range(0, len(group), self.batch_size):
                batch = group[start:start + self.batch_size]
                for job, text in zip(batch, self._generate(batch), strict=True):
                    outputs[job.index] = text
                    self.cache_hook.add_partial("generate_until", requests[job.index].args, text)
                bar.update(len(batch))
        bar.close()
        return outputs  # type: ignore[return-value]

    def _generate(self, batch: list[GenerationJob]) -> list[str]:
        """One engine call for jobs of equal settings; each text ends before its first stop string."""
        first = batch[0]
        ids, mask = self._left_padded([job.context for job in batch])
        s = first.sampling
        sampling = {"do_sample": bool(s.get("do_sample")), "temperature": float(s.get("temperature") or 1.0),
                    "top_k": s.get("top_k"), "top_p": s.get("top_p"), "seed": s.get("seed")}
        until = first.until
        res = self.model.generate(ids, mask, plan=self._plan(), max_new_tokens=first.budget, stop=until,
                                  eos_token_id=self.eot_token_id, **sampling)
        self._record("generate_until", res.decisions)
        texts = []
        for row in range(len(batch)):
            new = res.sequences[row, :int(res.num_generated[row])]
            texts.append(postprocess_generated_text(self.tokenizer.decode(new, skip_special_tokens=False), until,
                                                    None))
        return texts

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _plan(self) -> Any:
        return self.router.as_plan() if self.routing == "router" else self.routing

    def _left_padded(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
        return ids.to(self._device), mask.to(self._device)

    def _record(self, kind: str, decisions: torch.Tensor) -> None:
        self.omega[kind] += decisions.float().mean(dim=1).tolist()

    def routing_report(self) -> dict[str, Any]:
        """Omega (share of layers on sparse attention) per request type and over every forward of this run."""
        every = [x for values in self.omega.values() for x in values]
        return {"backbone": self.backbone.name, "router": self.router_source, "routing": self.routing,
                "sparse": self.pattern.describe(), "truncated_prompts": self.truncated,
                "mean_sparsity": sum(every) / len(every) if every else None,
                "by_request_type": {kind: {"forwards": len(v), "mean_sparsity": sum(v) / len(v)}
                                    for kind, v in self.omega.items()}}


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes --batch_size through as given; flux takes a fixed positive integer."""
    try:
        size = int(value if value is not None else 1)
    except (TypeError, ValueError):
        raise FluxEvalError(f"batch_size={value!r}: the flux backend takes a positive integer (no 'auto')") from None
    if size < 1:
        raise FluxEvalError(f"batch_size={value!r} must be >= 1")
    return size


def format_report(report: dict[str, Any]) -> str:
    lines = [f"flux routing={report['routing']} sparse={report['sparse']} router={report['router']}"]
    for kind, row in report["by_request_type"].items():
        lines.append(f"  {kind:<24} Ω {row['mean_sparsity']:.3f} over {row['forwards']} samples")
    if report["mean_sparsity"] is not None:
        lines.append(f"  {'all':<24} Ω {report['mean_sparsity']:.3f}")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> None:
    """`flux-lm-eval`: lm-eval's command line with the flux backend registered (flux is imported first)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    # lm-eval builds the model from the registered module, which is not this one under `python -m`
    latest = importlib.import_module(__spec__.name if __spec__ else __name__).LATEST
    if latest is not None:
        print(format_report(latest.routing_report()))


if __name__ == "__main__":
    main()
