"""Prompt building (spans, truncation), the left-padded collate, SFT tokenisation and FluxDataModule batches,
with SmolLM2's real tokenizer (no model weights)."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from flux.data.module import FluxDataModule
from flux.data.prompting import (
    IGNORE_INDEX,
    PromptInput,
    PromptTooLongError,
    _encode_pieces,
    _template_pieces,
    build_prompt,
    build_prompts,
    collate_left_padded,
)
from flux.data.sft import load_sft

CONTEXT = "Otters live in rivers. " * 40 + "The special magic number for quiet-otter is 4417.  It never changes."
QUESTION = "What is the special magic number for quiet-otter?"


@pytest.fixture(scope="session")
def plain_tokenizer(tokenizer):
    """The same vocabulary without a chat template, as for a base model."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def decode(tokenizer, prompt, span) -> str:
    return tokenizer.decode(list(prompt.input_ids[span[0] : span[1]]))


def test_spans_decode_to_their_texts_and_ids_match_the_rendered_template(tokenizer):
    prompt = build_prompt(tokenizer, CONTEXT, QUESTION, answer="4417", task="niah", example_id="x1", answers=["4417"])
    assert decode(tokenizer, prompt, prompt.context_span) == CONTEXT
    assert decode(tokenizer, prompt, prompt.question_span) == QUESTION
    assert decode(tokenizer, prompt, prompt.answer_span) == "4417"
    messages = [{"role": "user", "content": CONTEXT + "\n\n" + QUESTION}, {"role": "assistant", "content": "4417"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert list(prompt.input_ids) == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert (prompt.task, prompt.id, prompt.answers, prompt.truncated) == ("niah", "x1", ("4417",), 0)
    # the generation prompt is exactly the training prompt cut before the answer
    generation = build_prompt(tokenizer, CONTEXT, QUESTION)
    assert generation.answer_span is None
    assert list(generation.input_ids) == list(prompt.input_ids[: prompt.answer_span[0]])
    assert tokenizer.decode(list(generation.input_ids[-4:])) == "<|im_start|>assistant\n"


def test_system_message_and_missing_parts(tokenizer):
    prompt = build_prompt(tokenizer, "", QUESTION, answer="yes", system="You answer tersely.")
    text = tokenizer.decode(list(prompt.input_ids))
    assert text.startswith("<|im_start|>system\nYou answer tersely.<|im_end|>") and "SmolLM" not in text
    assert prompt.context_span is None and decode(tokenizer, prompt, prompt.question_span) == QUESTION
    with pytest.raises(ValueError, match="context and question are both empty"):
        build_prompt(tokenizer, "", "")
    with pytest.raises(ValueError, match="answer is an empty string"):
        build_prompt(tokenizer, CONTEXT, QUESTION, answer="")


def test_plain_layout_without_chat_template(plain_tokenizer):
    prompt = build_prompt(plain_tokenizer, "The cat is grey.", "Which colour?", answer="grey", system="Be exact.")
    assert (
        plain_tokenizer.decode(list(prompt.input_ids)) == "Be exact.\n\nThe cat is grey.\n\nWhich colour?\nAnswer: grey"
    )
    assert decode(plain_tokenizer, prompt, prompt.context_span) == "The cat is grey."
    assert decode(plain_tokenizer, prompt, prompt.question_span) == "Which colour?"
    assert decode(plain_tokenizer, prompt, prompt.answer_span) == " grey"
    raw = build_prompt(plain_tokenizer, "Doc.", "Q: why?\nAnswer:", answer="because", answer_cue="", separator="\n")
    assert plain_tokenizer.decode(list(raw.input_ids)) == "Doc.\nQ: why?\nAnswer: because"


def test_piecewise_encoding_for_tokenizers_without_offsets(tokenizer):
    parts = {"context": CONTEXT, "question": QUESTION, "answer": "4417"}
    layout = _template_pieces(tokenizer, parts, "\n\n", None, None)
    (pieces,) = _encode_pieces(tokenizer, [layout], plain=False)
    for (name, _), ids in zip(layout, pieces, strict=True):
        if name is not None:
            assert tokenizer.decode(ids) == parts[name]
    assert tokenizer.decode([i for ids in pieces for i in ids]) == tokenizer.apply_chat_template(
        [{"role": "user", "content": CONTEXT + "\n\n" + QUESTION}, {"role": "assistant", "content": "4417"}],
        tokenize=False,
    )


def test_batched_prompts_equal_single_prompts_and_name_bad_inputs(tokenizer):
    inputs = [
        PromptInput(CONTEXT[: 40 * (i + 1)], f"Question {i}?", answer=f"A{i}", task="t", id=f"q{i}") for i in range(5)
    ]
    batched = build_prompts(tokenizer, inputs, max_tokens=60, batch_size=2)
    single = [build_prompt(tokenizer, x.context, x.question, x.answer, 60, task="t", example_id=x.id) for x in inputs]
    assert batched == single and [p.id for p in batched] == ["q0", "q1", "q2", "q3", "q4"]
    bad = [inputs[0], PromptInput("ctx", "q", answer="", meta={"where": "data.jsonl:7"})]
    with pytest.raises(ValueError, match="data.jsonl:7: answer is an empty string"):
        build_prompts(tokenizer, bad)


def test_truncation_cuts_the_middle_of_the_context_only(tokenizer):
    full = build_prompt(tokenizer, CONTEXT, QUESTION, answer="4417")
    limit = len(full) - 100
    cut = build_prompt(tokenizer, CONTEXT, QUESTION, answer="4417", max_tokens=limit)
    assert len(cut) == limit and cut.truncated == 100
    assert decode(tokenizer, cut, cut.question_span) == QUESTION and decode(tokenizer, cut, cut.answer_span) == "4417"
    full_context = list(full.input_ids[slice(*full.context_span)])
    kept = list(cut.input_ids[slice(*cut.context_span)])
    half = len(kept) // 2
    assert kept[:half] == full_context[:half] and kept[half:] == full_context[len(full_context) - len(kept) + half :]
    outside = len(full) - len(full_context)
    with pytest.raises(PromptTooLongError, match=f"needs {outside} tokens besides the context .* max_tokens=20"):
        build_prompt(tokenizer, CONTEXT, QUESTION, answer="4417", max_tokens=20)


def test_collate_left_pads_and_labels_only_answers(tokenizer):
    long = build_prompt(tokenizer, CONTEXT, QUESTION, answer="4417", task="niah", example_id="a", answers=["4417"])
    short = build_prompt(tokenizer, "Tiny.", "Why?", answer="No idea", task="chat", example_id="b")
    bare = build_prompt(tokenizer, "", "Only a question?", task="chat")
    batch = collate_left_padded([short, long, bare], pad_id=7, task_index={"niah": 3, "chat": 5})
    width = len(long)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (3, width)
    assert batch["task_ids"].tolist() == [5, 3, 5] and batch["tasks"] == ["chat", "niah", "chat"]
    assert batch["ids"] == ["b", "a", ""] and batch["answers"] == [[], ["4417"], []]
    for row, prompt in enumerate((short, long, bare)):
        pad = width - len(prompt)
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(prompt)
        assert batch["input_ids"][row, :pad].eq(7).all() and batch["input_ids"][row, pad:].tolist() == list(
            prompt.input_ids
        )
        expected = torch.full((width,), IGNORE_INDEX)
        if prompt.answer_span is not None:
            start, end = prompt.answer_span
            expected[pad + start : pad + end] = torch.tensor(list(prompt.input_ids[start:end]))
        assert torch.equal(batch["labels"][row], expected)
        context = prompt.context_span or (0, 0)  # an absent span is empty, at the first real token
        assert batch["segments"]["context"][row].tolist() == [pad + context[0], pad + context[1]]
        assert batch["segments"]["question"][row].tolist() == [pad + s for s in prompt.question_span]
    labelled = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(labelled) == "4417"

    generation = collate_left_padded([short, long], pad_id=7, task_index={"niah": 0, "chat": 1}, drop_answer=True)
    assert generation["input_ids"].shape[1] == long.answer_span[0]
    assert generation["labels"].eq(IGNORE_INDEX).all()
    assert generation["input_ids"][1].tolist() == list(long.input_ids[: long.answer_span[0]])
    with pytest.raises(KeyError, match=r"task\(s\) \['chat'\] are not in task_index"):
        collate_left_padded([short], pad_id=0, task_index={"niah": 0})


def write_sft(path: Path, n: int, task: str = "qa", task_type: str = "retrieval") -> Path:
    with open(path, "w") as handle:
        for i in range(n):
            record = {
                "context": f"Record {i}. " + "Filler text here. " * 30,
                "question": f"Which record is {i}?",
                "answer": f"record {i}",
                "task": task,
                "task_type": task_type,
            }
            handle.write(json.dumps(record) + "\n")
    return path


def test_load_sft_truncates_the_context_to_max_tokens(tokenizer, tmp_path):
    path = write_sft(tmp_path / "train.jsonl", 3)
    prompts, types = load_sft(path, tokenizer, max_tokens=80)
    assert types == {"qa": "retrieval"}
    for i, prompt in enumerate(prompts):
        assert len(prompt) == 80 and prompt.truncated > 0 and prompt.id == f"{path}:{i + 1}"
        assert decode(tokenizer, prompt, prompt.question_span) == f"Which record is {i}?"
        assert decode(tokenizer, prompt, prompt.answer_span) == f"record {i}"
    with pytest.raises(PromptTooLongError, match=rf"{path}:1: the prompt needs \d+ tokens besides the context"):
        load_sft(path, tokenizer, max_tokens=30)


def test_synthetic_datamodule_batches(tokenizer):
    dm = FluxDataModule(
        tokenizer,
        tasks=["niah_single", "fwe", "continuation"],
        n_train=3,
        n_val=2,
        length_tokens=[200, 300],
        batch_size=4,
        max_tokens=400,
    )
    assert dm.task_names == ["niah_single", "fwe", "continuation"]
    assert dm.task_types == {"niah_single": "retrieval", "fwe": "holistic", "continuation": "holistic"}
    dm.setup("fit")
    assert len(dm.train_dataset) == 18 and len(dm.val_dataset) == 12
    assert not {p.id for p in dm.train_dataset.prompts} & {p.id for p in dm.val_dataset.prompts}
    assert Counter(p.task for p in dm.val_dataset.prompts) == {"niah_single": 4, "fwe": 4, "continuation": 4}
    batches = list(dm.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 4, 4, 2]
    for batch in batches:
        width = batch["input_ids"].shape[1]
        assert width <= 400 and batch["attention_mask"][:, -1].eq(1).all()  # left padded
        assert batch["segments"]["context"].shape == batch["segments"]["question"].shape == (len(batch["tasks"]), 2)
        assert batch["task_ids"].tolist() == [dm.task_index[t] for t in batch["tasks"]]
        assert ((batch["labels"] != IGNORE_INDEX).sum(1) > 0).all()
    val = next(iter(dm.val_dataloader()))
    generation = next(iter(dm.generation_dataloader()))
    assert generation["ids"] == val["ids"] and generation["labels"].eq(IGNORE_INDEX).all()
    assert all(answers for answers in generation["answers"])

    too_long = r"> data\.max_tokens=150; lower data\.length_tokens or raise data\.max_tokens"
    with pytest.raises(ValueError, match=too_long):
        FluxDataModule(tokenizer, tasks=["niah_single"], n_train=1, n_val=1, length_tokens=200, max_tokens=150).setup(
            "fit"
        )


def test_file_and_mixture_datamodules(tokenizer, tmp_path):
    train = write_sft(tmp_path / "train.jsonl", 6)
    dm = FluxDataModule(tokenizer, source="jsonl", train_files=[str(train)], n_val=2, batch_size=2, max_tokens=64)
    assert dm.task_types == {"qa": "retrieval"}
    dm.setup("fit")
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2
    assert max(len(p) for p in dm.train_dataset.prompts) == 64
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (2, 64)

    sft_types = write_sft(tmp_path / "summ.jsonl", 4, task="summ", task_type="holistic")
    mix = FluxDataModule(
        tokenizer,
        source="mixture",
        tasks=["niah_single", "kv_lookup"],
        n_train=2,
        n_val=1,
        length_tokens=200,
        train_files=[str(train)],
        val_files=[str(sft_types)],
        weights={"synthetic": 1.0, "files": 3.0},
        batch_size=3,
    )
    assert mix.task_names == ["niah_single", "kv_lookup", "qa", "summ"]
    assert mix.task_types["summ"] == "holistic"
    mix.setup("fit")
    assert len(mix.train_dataset) == 4 + 6 and len(mix.val_dataset) == 2 + 4
    sampler = mix.train_dataloader().sampler
    weights = sampler.weights.tolist()
    assert sum(weights[:4]) == pytest.approx(1.0) and sum(weights[4:]) == pytest.approx(3.0)
    assert sampler.num_samples == 10
    tasks = [t for b in mix.train_dataloader() for t in b["tasks"]]
    assert len(tasks) == 10 and set(tasks) <= set(mix.task_names)


def test_datamodule_rejects_bad_configuration(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"unknown data source 'csv'; choose one of"):
        FluxDataModule(tokenizer, source="csv")
    with pytest.raises(KeyError, match="unknown synthetic task 'needle'"):
        FluxDataModule(tokenizer, tasks=["needle"])
    with pytest.raises(ValueError, match="train_seed and val_seed are both 3"):
        FluxDataModule(tokenizer, train_seed=3, val_seed=3)
    with pytest.raises(FileNotFoundError, match=r"data file '.*nope.jsonl' does not exist"):
        FluxDataModule(tokenizer, source="jsonl", train_files=[str(tmp_path / "nope.jsonl")])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['k'\] for task 'fwe'"):
        FluxDataModule(tokenizer, tasks=["fwe"], task_options={"fwe": {"k": 1}})
    with pytest.raises(ValueError, match="unknown haystack 'essays'"):
        FluxDataModule(tokenizer, haystack="essays")
    with pytest.raises(ValueError, match="length_tokens must be >= 64, got 8"):
        FluxDataModule(tokenizer, length_tokens=[1024, 8])
    with pytest.raises(ValueError, match="weights only apply to source='mixture'"):
        FluxDataModule(tokenizer, weights={"synthetic": 1.0})
    train = write_sft(tmp_path / "t.jsonl", 2)
    with pytest.raises(ValueError, match=r"unknown mixture weight key\(s\) \['sft'\]"):
        FluxDataModule(tokenizer, source="mixture", train_files=[str(train)], weights={"sft": 1.0})
    with pytest.raises(ValueError, match="n_val=2 held-out records leave none of the 2 training records; give more"):
        FluxDataModule(tokenizer, source="jsonl", train_files=[str(train)], n_val=2).setup("fit")
    clash = write_sft(tmp_path / "clash.jsonl", 1, task="fwe", task_type="retrieval")
    with pytest.raises(ValueError, match="task 'fwe' has task_type 'retrieval', but it is 'holistic'"):
        _ = FluxDataModule(
            tokenizer, source="mixture", tasks=["fwe"], train_files=[str(train)], val_files=[str(clash)]
        ).task_types


@pytest.mark.parametrize("name", ["synthetic", "jsonl", "mixture"])
def test_hydra_configs_instantiate_with_an_injected_tokenizer(tokenizer, tmp_path, name):
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from flux.conf import CONFIG_MODULE

    train = write_sft(tmp_path / "train.jsonl", 40)
    overrides = [f"data={name}"] + ([] if name == "synthetic" else [f"data.train_files=[{train}]"])
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides).data
    dm = instantiate(cfg, tokenizer=tokenizer)
    assert isinstance(dm, FluxDataModule) and dm.tokenizer is tokenizer and dm.source == name
    assert isinstance(dm.tasks, list) and dm.train_seed != dm.val_seed
    if name != "jsonl":
        assert len(dm.tasks) == 10 and set(dm.task_types.values()) == {"retrieval", "holistic"}


@pytest.mark.parametrize(("records", "fraction", "held"), [(40, 0.05, 2), (3, 0.05, 1), (10, 0.5, 5)])
def test_val_fraction_holds_out_a_share_of_the_records(tokenizer, tmp_path, records, fraction, held):
    train = write_sft(tmp_path / "train.jsonl", records)
    dm = FluxDataModule(tokenizer, source="jsonl", train_files=[str(train)], val_fraction=fraction, max_tokens=256)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (records - held, held)
    again = FluxDataModule(tokenizer, source="jsonl", train_files=[str(train)], val_fraction=fraction, max_tokens=256)
    again.setup("fit")  # the same records are held out every time (val_seed)
    assert [list(x.input_ids) for x in again.val_dataset] == [list(x.input_ids) for x in dm.val_dataset]


def test_val_fraction_errors_name_the_setting(tokenizer, tmp_path):
    one = write_sft(tmp_path / "one.jsonl", 1)
    with pytest.raises(ValueError, match=r"val_fraction=0.05 \(1 records\) held-out records leave none of the 1"):
        FluxDataModule(tokenizer, source="jsonl", train_files=[str(one)], val_fraction=0.05).setup("fit")
    with pytest.raises(ValueError, match=r"val_fraction=1.5 must lie in \(0, 1\)"):
        FluxDataModule(tokenizer, source="jsonl", train_files=[str(one)], val_fraction=1.5)
