"""The lm-evaluation-harness backend (`--model flux`): registration on `import flux`, the three request types against
references computed with transformers directly, batch and padding invariance, routing reports, one clear error per
request or argument it cannot serve, and the real `flux-lm-eval` command on SmolLM2 with local task files.

Everything is offline: tasks are YAML files with a local JSONL data file (datasets' packaged json builder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, LlamaConfig

from flux.backbone import load_backbone
from flux.lm_eval_backend import FluxEvalError, FluxLM
from flux.router import LayerRouter, RouterCheckpointError, export_router

REPO = Path(__file__).resolve().parents[1]
SHIPPED_ROUTER = REPO / "experiments" / "smollm2_8k" / "router"
CONTEXTS = ["The capital of France is", "Water boils at one hundred degrees",
            "Once upon a time there was a small fox who lived in the forest. Every morning the fox"]
CONTINUATIONS = [" Paris.", " Celsius at sea level.", " ran to the river to drink."]


@pytest.fixture(scope="module")
def short_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny Llama with only 24 positions, so rolling windows and the position limit show on short texts."""
    folder = tmp_path_factory.mktemp("tiny_short")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = LlamaConfig(**{**model.config.to_dict(), "max_position_embeddings": 24})
    short = AutoModelForCausalLM.from_config(config)
    short.load_state_dict(model.state_dict())
    short.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_dir / name).is_file():
            (folder / name).write_bytes((tiny_dir / name).read_bytes())
    return folder


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def reference_model(path: Path):
    """The same weights as a plain transformers model in float64 (flux's copy has its attention routed)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager").eval()


def reference_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) and greedy-ness from the transformers model alone."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    rows, cont = logp[len(context) - 1:], torch.tensor(continuation)
    return float(rows.gather(1, cont[:, None]).sum()), bool((rows.argmax(-1) == cont).all())


def test_import_flux_registers_the_backend_lazily() -> None:
    code = ("import sys, flux\n"
            "from lm_eval.api.registry import get_model, model_registry\n"
            "assert 'flux' in model_registry and 'flux.lm_eval_backend' not in sys.modules\n"
            "print(get_model('flux').__module__, get_model('flux').__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["flux.lm_eval_backend", "FluxLM"]


def test_loglikelihood_matches_transformers_in_batches(tiny_dir) -> None:
    lm = FluxLM(backbone=str(tiny_dir), dtype="float32", routing="dense", batch_size=2)
    args = list(zip(CONTEXTS, CONTINUATIONS, strict=True)) + [("", " Hello there")]
    got = lm.loglikelihood(requests("loglikelihood", args), disable_tqdm=True)
    reference = reference_model(tiny_dir)
    for (context, continuation), (score, greedy) in zip(args, got, strict=True):
        if context:
            ctx, cont = lm._encode_pair(context, continuation)
        else:  # lm-eval conditions an empty context on the prefix token
            ctx, cont = [lm.prefix_token_id], lm.tok_encode(continuation)
        ref_score, ref_greedy = reference_logprob(reference, ctx, cont)
        assert score == pytest.approx(ref_score, abs=1e-3) and greedy == ref_greedy
    alone = FluxLM(backbone=str(tiny_dir), dtype="float32", routing="dense", batch_size=1)
    one_by_one = alone.loglikelihood(requests("loglikelihood", args), disable_tqdm=True)
    assert [s for s, _ in one_by_one] == pytest.approx([s for s, _ in got], abs=1e-4)
    report = lm.routing_report()
    assert report["by_request_type"]["loglikelihood"] == {"forwards": 4, "mean_sparsity": 0.0}


def test_sparse_routing_changes_scores_and_reports_full_sparsity(tiny_dir) -> None:
    args = [(CONTEXTS[2] * 3, CONTINUATIONS[2])]  # longer than sink + window, so sparse attention differs
    dense = FluxLM(backbone=str(tiny_dir), dtype="float32", routing="dense")
    sparse = FluxLM(backbone=str(tiny_dir), dtype="float32", routing="sparse", **{"sparse.sink": 2,
                                                                                   "sparse.window": 8})
    d, s = (m.loglikelihood(requests("loglikelihood", args), disable_tqdm=True)[0][0] for m in (dense, sparse))
    assert abs(d - s) > 1e-3
    assert sparse.routing_report()["mean_sparsity"] == 1.0
    assert sparse.routing_report()["sparse"] == {"pattern": "streaming", "sink": 2, "window": 8}


def test_loglikelihood_rolling_predicts_every_token_once_across_windows(short_dir) -> None:
    lm = FluxLM(backbone=str(short_dir), dtype="float32", routing="dense", batch_size=3)
    text = " ".join(CONTEXTS * 2)  # longer than twice the model's 24 positions: three windows
    tokens = lm.tok_encode(text)
    assert len(tokens) > 2 * lm.max_length
    (total,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    model, reference, predicted, start = reference_model(short_dir), 0.0, 0, 0
    while predicted < len(tokens):  # lm-eval's windows: full context, every token scored once
        end = min(len(tokens), predicted + lm.max_length)
        context = ([lm.prefix_token_id] + tokens)[max(0, end - lm.max_length):end]
        with torch.no_grad():
            logp = model(torch.tensor([context])).logits[0].log_softmax(-1)
        targets = torch.tensor(tokens[max(0, end - lm.max_length):end])
        scored = end - predicted
        reference += float(logp[-scored:].gather(1, targets[-scored:, None]).sum())
        predicted, start = end, start + 1
    assert total == pytest.approx(reference, abs=1e-3)
    assert lm.routing_report()["by_request_type"]["loglikelihood_rolling"]["forwards"] == start


def test_generate_until_matches_greedy_transformers_and_cuts_at_stop_strings(tiny_dir) -> None:
    lm = FluxLM(backbone=str(tiny_dir), dtype="float32", routing="dense", batch_size=3)
    prompts, model = CONTEXTS, reference_model(tiny_dir)
    free = lm.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 6}) for p in prompts]),
                             disable_tqdm=True)
    for prompt, text in zip(prompts, free, strict=True):
        ids = torch.tensor([lm.tok_encode(prompt)])
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=lm.eot_token_id,
                                             pad_token_id=lm.eot_token_id)
        expected = lm.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=False)
        assert text == expected.split(lm.tokenizer.decode([lm.eot_token_id]))[0]
    stop = free[0][2:4]  # a stop string taken from the free generation, so it really occurs there
    (cut,) = lm.generate_until(requests("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 6})]),
                               disable_tqdm=True)
    assert cut == free[0][:free[0].index(stop)]
    assert lm.routing_report()["by_request_type"]["generate_until"]["forwards"] == 4


def test_a_router_from_a_folder_routes_the_requests(tiny_dir, tmp_path) -> None:
    backbone = load_backbone(str(tiny_dir), dtype="float32")
    export_router(LayerRouter(3, 8, init_fa_bias=-6.0), tmp_path / "router", backbone,
                  {"pattern": "streaming", "sink": 2, "window": 8})  # biased to SA: every decision sparse
    lm = FluxLM(backbone=str(tiny_dir), dtype="float32", router=str(tmp_path / "router"))
    assert lm.routing == "router" and lm.pattern.describe() == {"pattern": "streaming", "sink": 2, "window": 8}
    lm.loglikelihood(requests("loglikelihood", [(CONTEXTS[0], CONTINUATIONS[0])]), disable_tqdm=True)
    assert lm.get_model_info()["flux_routing"]["mean_sparsity"] == 1.0


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"backbone": "tiny_random", "batch_size": "auto"}, FluxEvalError, "no 'auto'"),
    ({"backbone": "tiny_random", "window": 8}, FluxEvalError, r"unknown flux model_args \['window'\]"),
    ({"backbone": "tiny_random", "routing": "router"}, FluxEvalError, "routing=router needs router="),
    ({"backbone": "tiny_random", "truncate": "left"}, FluxEvalError, r"truncate='left' is not one of"),
    ({"backbone": "tiny_random", "device": "cuda:0"}, FluxEvalError, "pass --device cpu"),
    ({"backbone": "tiny_random", "router": "flux-test/no-such-router"}, RouterCheckpointError,
     "not in the local Hub cache while HF_HUB_OFFLINE=1 is set"),
])
def test_bad_model_args_fail_with_one_message(kwargs, error, message, monkeypatch) -> None:
    if kwargs.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the message is for machines without it")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(error, match=message):
        FluxLM(**kwargs)


def test_a_router_card_for_another_backbone_is_refused(tiny_dir, tmp_path) -> None:
    other = load_backbone("tiny_random", tiny={"num_layers": 3})
    export_router(LayerRouter(3, 16), tmp_path / "router", other, {})
    with pytest.raises(RouterCheckpointError, match=r"trained for backbone 'tiny_random-llama' .*hidden_size 64 vs 32"):
        FluxLM(backbone=str(tiny_dir), router=str(tmp_path / "router"))


def test_requests_it_cannot_serve_fail_with_one_message(short_dir) -> None:
    lm = FluxLM(backbone=str(short_dir), dtype="float32", routing="dense")
    long = " ".join(CONTEXTS)
    with pytest.raises(FluxEvalError, match=r"loglikelihood request 0 needs \d+ positions .* has 24; shorten"):
        lm.loglikelihood(requests("loglikelihood", [(long, " end")]), disable_tqdm=True)
    with pytest.raises(FluxEvalError, match=r"generate_until request 0: a prompt of \d+ tokens plus max_gen_toks=8 .*"
                                            r"or pass truncate=middle"):
        lm.generate_until(requests("generate_until", [(long, {"max_gen_toks": 8})]), disable_tqdm=True)
    with pytest.raises(FluxEvalError, match=r"generation settings \['num_beams'\]"):
        lm.generate_until(requests("generate_until", [("Hi", {"num_beams": 4})]), disable_tqdm=True)


def test_truncate_middle_keeps_both_ends_of_a_long_generation_prompt(short_dir) -> None:
    """LongBench's protocol, opted into with truncate=middle: the same output as the hand-truncated prompt."""
    lm = FluxLM(backbone=str(short_dir), dtype="float32", routing="dense", truncate="middle")
    long = " ".join(CONTEXTS)
    tokens, room = lm.tok_encode(long), lm.max_length - 4
    assert len(tokens) > room
    (text,) = lm.generate_until(requests("generate_until", [(long, {"max_gen_toks": 4})]), disable_tqdm=True)
    kept = tokens[:room // 2] + tokens[len(tokens) - (room - room // 2):]
    ids = torch.tensor([kept])
    with torch.no_grad():
        ref = reference_model(short_dir).generate(ids, max_new_tokens=4, do_sample=False,
                                                  eos_token_id=lm.eot_token_id, pad_token_id=lm.eot_token_id)
    expected = lm.tokenizer.decode(ref[0, len(kept):], skip_special_tokens=False)
    assert text == expected.split(lm.tokenizer.decode([lm.eot_token_id]))[0]
    assert lm.routing_report()["truncated_prompts"] == 1


TASKS = {
    "flux_tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                      "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 8, "do_sample": False},
                      "metric_list": [{"metric": "exact_match", "ignore_case": True, "ignore_punctuation": True}]},
    "flux_tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                     "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]},
    "flux_tiny_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                      "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
}
DOCS = [{"question": "Question: What is the capital of France?\nAnswer:", "answer": " Paris",
         "choices": [" Paris", " Berlin", " Madrid"], "label": 0,
         "text": "Paris is the capital and largest city of France."},
        {"question": "Question: What colour is the sky on a clear day?\nAnswer:", "answer": " Blue",
         "choices": [" green", " blue", " red"], "label": 1,
         "text": "The sky on a clear day looks blue because air scatters blue light."},
        {"question": "Question: How many legs does a spider have?\nAnswer:", "answer": " Eight",
         "choices": [" six", " four", " eight"], "label": 2,
         "text": "A spider has eight legs and most spiders spin silk webs."}]


def write_tasks(folder: Path) -> Path:
    """One YAML per task over one local JSONL file: lm-eval reads them with --include_path, offline."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (folder / f"{name}.yaml").write_text(json.dumps(task, indent=2), encoding="utf-8")  # JSON is YAML
    return folder


@pytest.mark.slow
def test_flux_lm_eval_runs_lm_eval_tasks_on_smollm2_with_the_shipped_router(tmp_path) -> None:
    """The README's command on the real backbone and router, with three small local tasks (one per request type);
    the report beside the scores and the scores themselves are checked against an in-process backend."""
    tasks = write_tasks(tmp_path / "tasks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    model_args = f"backbone=smollm2_135m,router={SHIPPED_ROUTER}"
    cmd = [sys.executable, "-m", "flux.lm_eval_backend", "--model", "flux", "--model_args", model_args,
           "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2",
           "--output_path", str(tmp_path / "out")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(result_file.read_text())
    routing = results["config"]["flux_routing"]
    assert routing["routing"] == "router" and routing["sparse"] == {"pattern": "streaming", "sink": 64, "window": 256}
    counts = {k: v["forwards"] for k, v in routing["by_request_type"].items()}
    assert counts == {"generate_until": 3, "loglikelihood": 9, "loglikelihood_rolling": 3}
    assert 0.0 <= routing["mean_sparsity"] <= 1.0
    assert f"  {'all':<24} Ω {routing['mean_sparsity']:.3f}" in proc.stdout  # printed after lm-eval's table
    assert "|flux_tiny_mc" in proc.stdout.replace(" ", "") or "flux_tiny_mc" in proc.stdout

    lm = FluxLM(backbone="smollm2_135m", router=str(SHIPPED_ROUTER))
    scores = lm.loglikelihood(requests("loglikelihood", [(d["question"], c) for d in DOCS for c in d["choices"]]),
                              disable_tqdm=True)
    picks = [max(range(3), key=lambda c, i=i: scores[3 * i + c][0]) for i in range(len(DOCS))]
    accuracy = sum(p == d["label"] for p, d in zip(picks, DOCS, strict=True)) / len(DOCS)
    assert results["results"]["flux_tiny_mc"]["acc,none"] == pytest.approx(accuracy)
    print(f"flux-lm-eval on SmolLM2 (CPU), 3 tasks x 3 documents: {seconds:.1f} s")
