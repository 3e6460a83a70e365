"""Loaders and task objects of flux.evals on small hand-made files in the official formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from flux.evals import EvalDataError, PerplexityTask, UnknownEvalTaskError, get_eval_task
from flux.evals.base import DEFAULT_TEMPLATE, EvalSample
from flux.evals.longbench import LongBenchTask
from flux.evals.longbench_v2 import LongBenchV2Task
from flux.evals.math_tasks import MathTask
from flux.evals.ppl import make_windows
from flux.evals.ruler import RulerTask, template_overhead

CONF = Path(__file__).resolve().parents[1] / "conf" / "eval"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


class WhitespaceTokenizer:
    """Token = whitespace-separated word (ids are word positions), enough for RULER lengths and ppl windows."""

    def __call__(self, text, add_special_tokens=False, **_):
        if isinstance(text, str):
            return {"input_ids": list(range(len(text.split())))}
        return {"input_ids": [list(range(len(t.split()))) for t in text]}


# --------------------------------------------------------------------------------------------------- samples


def test_sample_prompt_fields_default_and_template():
    plain = EvalSample("a", "t", "CTX", "Q?", ("x",), 3)
    assert plain.template == DEFAULT_TEMPLATE
    assert plain.prompt_fields() == ("CTX", "Q?", "\n\n")
    braces = EvalSample("b", "t", "{x} ctx", "why {y}?", ("x",), 3, template="Read.\n{context}\nQ: {question}\nA:")
    assert braces.prompt_fields() == ("Read.\n{x} ctx", "\nQ: why {y}?\nA:", "")
    assert braces.render() == "Read.\n{x} ctx\nQ: why {y}?\nA:"
    with pytest.raises(ValueError, match="exactly once"):
        EvalSample("c", "t", "", "", ("x",), 0, template="no slot")
    with pytest.raises(ValueError, match="after"):
        EvalSample("d", "t", "", "", ("x",), 0, template="{question} {context}")


# --------------------------------------------------------------------------------------------------- jsonl


def test_jsonl_task_loads_scores_and_groups(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"context": "The code is 4417.", "question": "What is the code?", "answers": ["4417"], "id": 7,
         "task": "codes"},
        "",
        {"context": "Ann lives in Oslo.", "question": "Where does Ann live?", "answers": ["Oslo", "Norway"]},
    ])
    task = get_eval_task("jsonl", path=str(path))
    samples = task.samples()
    assert [s.id for s in samples] == ["7", "mine-1"]
    assert [task.row_key(s) for s in samples] == [("jsonl/codes", 0), ("jsonl/mine", 0)]
    assert samples[0].render() == "The code is 4417.\n\nWhat is the code?"
    assert task.score("It is 4417", samples[0]) == 1.0
    assert task.score("She lives in NORWAY", samples[1]) == 1.0
    assert task.score("Bergen", samples[1]) == 0.0
    assert task.max_new_tokens(samples[0]) == 64
    assert samples[1].meta["task_type"] == "retrieval"


@pytest.mark.parametrize(("line", "message"), [
    ('{"context": "c", "answers": ["a"]}', r"mine.jsonl:2: record has no 'question' field"),
    ('{"context": "c", "question": "q"}', r"mine.jsonl:2: record has no 'answers' field"),
    ('{"context": "c", "question": "q", "answers": []}', r"mine.jsonl:2: field 'answers' must be a non-empty list"),
    ('{"context": "c", "question": "q", "answers": "a"}', r"mine.jsonl:2: field 'answers' must be a non-empty list"),
    ('{"context": 3, "question": "q", "answers": ["a"]}', r"mine.jsonl:2: field 'context' must be a string"),
    ('{"context": "c", "question": "q", "answers": ["a"]', r"mine.jsonl:2: invalid JSON"),
    ('["not", "an", "object"]', r"mine.jsonl:2: expected a JSON object"),
    ('{"context": "c", "question": "q", "answers": ["a"], "id": "0"}', r"mine.jsonl:2: duplicate id '0'"),
])
def test_jsonl_bad_lines_name_file_and_line(tmp_path, line, message):
    good = '{"context": "c", "question": "q", "answers": ["a"], "id": "0"}'
    path = write_jsonl(tmp_path / "mine.jsonl", [good, line])
    with pytest.raises(EvalDataError, match=message):
        get_eval_task("jsonl", path=str(path))


def test_jsonl_lines_split_on_newline_only(tmp_path):
    # Raw U+2028 / U+0085 are legal inside JSON strings and must not end the line; CRLF files work too.
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"context": "a\u2028b\x85c", "question": "q", "answers": ["b"]}, ensure_ascii=False)
                    + "\r\n", encoding="utf-8")
    (sample,) = get_eval_task("jsonl", path=str(path)).samples()
    assert sample.context == "a\u2028b\x85c"


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found: .*nope.jsonl"):
        get_eval_task("jsonl", path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(EvalDataError, match="not a regular file"):
        get_eval_task("jsonl", path=str(tmp_path))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"context": "caf\xe9"}\n')
    with pytest.raises(EvalDataError, match="not UTF-8"):
        get_eval_task("jsonl", path=str(tmp_path / "latin1.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match="holds no records"):
        get_eval_task("jsonl", path=str(tmp_path / "empty.jsonl"))


# --------------------------------------------------------------------------------------------------- registry


def test_registry_errors():
    with pytest.raises(UnknownEvalTaskError, match=r"unknown eval task 'rulr'; known tasks: \['jsonl', 'longbench'"):
        get_eval_task("rulr")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lenghts'\]"):
        get_eval_task("ruler", lenghts=[1024])
    with pytest.raises(ValueError, match=r"needs option\(s\) \['path'\]"):
        get_eval_task("math")
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        get_eval_task("ruler", max_new_tokens=0)


# --------------------------------------------------------------------------------------------------- LongBench


def lb_record(i: int, dataset: str, **fields) -> dict:
    base = {"input": f"question {i}?", "context": f"passage {i}", "answers": [f"answer {i}"], "length": 100,
            "dataset": dataset, "language": "en", "all_classes": None, "_id": f"{dataset}-{i}"}
    return {**base, **fields}


def test_longbench_folder_prompts_scores_and_budgets(tmp_path):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [lb_record(0, "hotpotqa", answers=["Miller v. California"]),
                                              lb_record(1, "hotpotqa")])
    write_jsonl(tmp_path / "trec.jsonl", [lb_record(2, "trec", input="What is a bat?", answers=["Animal"],
                                                    all_classes=["Animal", "Description", "Entity"])])
    task = get_eval_task("longbench", path=str(tmp_path), datasets=["hotpotqa", "trec"])
    hot, _, trec = task.samples()
    assert hot.prompt_fields().context.startswith("Answer the question based on the given passages.")
    assert hot.prompt_fields().context.endswith("The following are given passages.\npassage 0")
    assert hot.prompt_fields().question == (
        "\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nQuestion: question 0?\nAnswer:")
    assert hot.chat and not trec.chat
    # QA F1 after normalisation: pred [miller, v, california, 1973] vs ref [miller, v, california] -> 6/7.
    assert task.score("Miller v. California (1973)", hot) == pytest.approx(6 / 7)
    # trec keeps only the first line, then classification: only "Animal" is mentioned there.
    assert task.score("Animal\nDescription", trec) == 1.0
    assert task.score("Animal or Entity", trec) == pytest.approx(0.5)
    assert (task.max_new_tokens(hot), task.max_new_tokens(trec)) == (32, 64)
    assert task.row_key(hot) == ("longbench/hotpotqa", 0)
    assert hot.meta["category"] == "Multi-Doc QA" and hot.meta["task_type"] == "retrieval"
    assert LongBenchTask(str(tmp_path), ["trec"], max_new_tokens=5).max_new_tokens(trec) == 5


def test_longbench_single_file_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [lb_record(0, "hotpotqa"), lb_record(1, "gov_report", input="")])
    task = get_eval_task("longbench", path=str(path))
    assert [s.task for s in task.samples()] == ["hotpotqa", "gov_report"]
    assert task.score("the gunman was killed", EvalSample(
        "x", "gov_report", "", "", ("the gunman was killed by police",), 0)) == pytest.approx(2 * 4 / (4 + 6))
    assert [s.task for s in get_eval_task("longbench", path=str(path), datasets=["gov_report"]).samples()] == [
        "gov_report"]

    with pytest.raises(FileNotFoundError, match=r"lacks \['narrativeqa.jsonl'"):
        get_eval_task("longbench", path=str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown longbench dataset\(s\) \['hotpot'\]"):
        get_eval_task("longbench", path=str(path), datasets=["hotpot"])
    write_jsonl(tmp_path / "bad.jsonl", [lb_record(0, "hotpotqa"), {k: v for k, v in lb_record(1, "hotpotqa").items()
                                                                    if k != "input"}])
    with pytest.raises(EvalDataError, match=r"bad.jsonl:2: record has no 'input' field"):
        get_eval_task("longbench", path=str(tmp_path / "bad.jsonl"))
    write_jsonl(tmp_path / "unknown.jsonl", [lb_record(0, "squad")])
    with pytest.raises(EvalDataError, match=r"unknown.jsonl:1: unknown LongBench dataset 'squad'"):
        get_eval_task("longbench", path=str(tmp_path / "unknown.jsonl"))
    write_jsonl(tmp_path / "noclasses.jsonl", [lb_record(0, "trec")])
    with pytest.raises(EvalDataError, match="needs 'all_classes'"):
        get_eval_task("longbench", path=str(tmp_path / "noclasses.jsonl"))


def test_longbench_e_buckets_and_suffixed_names(tmp_path):
    write_jsonl(tmp_path / "qasper_e.jsonl", [lb_record(i, "qasper_e", length=n)
                                              for i, n in enumerate((1000, 3999, 4000, 9000))])
    task = get_eval_task("longbench_e", path=str(tmp_path), datasets=["qasper"])
    assert [task.row_key(s) for s in task.samples()] == [("longbench_e/qasper", 0), ("longbench_e/qasper", 0),
                                                         ("longbench_e/qasper", 4000), ("longbench_e/qasper", 8000)]
    assert task.max_new_tokens(task.samples()[0]) == 128
    with pytest.raises(ValueError, match=r"unknown longbench_e dataset\(s\) \['narrativeqa'\]"):
        get_eval_task("longbench_e", path=str(tmp_path), datasets=["narrativeqa"])
    write_jsonl(tmp_path / "all.jsonl", [lb_record(0, "narrativeqa")])
    with pytest.raises(EvalDataError, match="not part of longbench_e"):
        get_eval_task("longbench_e", path=str(tmp_path / "all.jsonl"))


def test_passage_retrieval_and_code_datasets(tmp_path):
    path = write_jsonl(tmp_path / "lb.jsonl", [
        lb_record(0, "passage_retrieval_en", answers=["Paragraph 12"]),
        lb_record(1, "repobench-p", input="def add(a, b):\n", answers=["    return a + b"]),
        lb_record(2, "passage_count", answers=["4"]),
    ])
    retrieval, code, count = get_eval_task("longbench", path=str(path)).samples()
    task = get_eval_task("longbench", path=str(path))
    assert task.score("Paragraph 12", retrieval) == 1.0
    assert task.score("Paragraph 3 or Paragraph 12", retrieval) == pytest.approx(0.5)
    assert code.prompt_fields().question == "def add(a, b):\nNext line of code:\n" and not code.chat
    assert task.score("```\n    return a + b\n```", code) == 1.0
    assert task.score("4", count) == 1.0


# --------------------------------------------------------------------------------------------------- LongBench-v2


def v2_record(i: int, **fields) -> dict:
    base = {"_id": f"v2-{i}", "domain": "Single-Document QA", "sub_domain": "Academic", "difficulty": "easy",
            "length": "short", "question": f"Which is right {i}?", "choice_A": "one", "choice_B": "two",
            "choice_C": "three", "choice_D": "four", "answer": "B", "context": "a b c d"}
    return {**base, **fields}


def test_longbench_v2_json_and_jsonl(tmp_path):
    records = [v2_record(0), v2_record(1, difficulty="hard", length="long", answer="D")]
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    task = get_eval_task("longbench_v2", path=str(tmp_path / "data.json"))
    easy, hard = task.samples()
    text = easy.render()
    assert "<text>\na b c d\n</text>" in text
    assert ("What is the correct answer to this question: Which is right 0?\nChoices:\n(A) one\n(B) two\n"
            "(C) three\n(D) four\n\nFormat your response as follows:") in text
    assert task.score("The correct answer is (B)", easy) == 1.0
    assert task.score("The correct answer is (B)", hard) == 0.0
    assert [task.row_key(s) for s in (easy, hard)] == [("longbench_v2/easy", 0), ("longbench_v2/hard", 128_000)]
    assert task.max_new_tokens(easy) == 128
    jsonl = write_jsonl(tmp_path / "data.jsonl", records)
    assert [s.id for s in LongBenchV2Task(str(jsonl)).samples()] == ["v2-0", "v2-1"]

    write_jsonl(tmp_path / "bad.jsonl", [v2_record(0, difficulty="medium")])
    with pytest.raises(EvalDataError, match=r"bad.jsonl:1: field 'difficulty' must be one of \['easy', 'hard'\]"):
        LongBenchV2Task(str(tmp_path / "bad.jsonl"))
    write_jsonl(tmp_path / "noq.jsonl", [{k: v for k, v in v2_record(0).items() if k != "question"}])
    with pytest.raises(EvalDataError, match="noq.jsonl:1: record has no 'question' field"):
        LongBenchV2Task(str(tmp_path / "noq.jsonl"))


# --------------------------------------------------------------------------------------------------- math


def test_math_formats_detect_and_score(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Natalia sold 48 clips and half as many more. How many?", "answer": "48/2 = 24\n#### 72"},
        {"question": "How much is 1000 + 234?", "answer": "#### 1,234"}])
    task = get_eval_task("math", path=str(gsm))
    s0, s1 = task.samples()
    assert task.format == "gsm8k" and s0.answers == ("72",) and s1.answers == ("1234",)
    assert s0.render() == s0.question + "\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert task.score("48 + 24 = 72. The answer is 72.", s0) == 1.0
    assert task.score("\\boxed{1,234}", s1) == 1.0
    assert task.score("1233", s1) == 0.0
    assert task.row_key(s0) == ("math/gsm8k", 0) and task.max_new_tokens(s0) == 512

    m500 = write_jsonl(tmp_path / "m500.jsonl", [
        {"problem": "Compute 14/3.", "solution": "...", "answer": "\\frac{14}{3}", "unique_id": "test/a/1.json"}])
    task = get_eval_task("math", path=str(m500), label="math500_subset")
    (s,) = task.samples()
    assert task.format == "math500" and s.id == "test/a/1.json"
    assert task.score("so it is \\boxed{\\dfrac{14}{3}}", s) == 1.0
    assert task.row_key(s) == ("math/math500_subset", 0) and task.max_new_tokens(s) == 1024

    aime = write_jsonl(tmp_path / "aime.jsonl", [{"problem": "Find n.", "answer": 33}, {"problem": "m?", "answer": "7"}])
    task = MathTask(str(aime))
    assert task.format == "aime" and [s.answers for s in task.samples()] == [("33",), ("7",)]
    assert task.score("\\boxed{033}", task.samples()[0]) == 1.0


def test_math_errors(tmp_path):
    write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no hashes"}])
    with pytest.raises(EvalDataError, match="cannot tell the math format"):
        get_eval_task("math", path=str(tmp_path / "g.jsonl"))
    with pytest.raises(EvalDataError, match=r"g.jsonl:1: GSM8K answer has no '#### N' line"):
        get_eval_task("math", path=str(tmp_path / "g.jsonl"), format="gsm8k")
    write_jsonl(tmp_path / "a.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "p2"}])
    with pytest.raises(EvalDataError, match=r"a.jsonl:2: record has no 'answer' field"):
        get_eval_task("math", path=str(tmp_path / "a.jsonl"))
    with pytest.raises(ValueError, match="math format must be"):
        get_eval_task("math", path=str(tmp_path / "a.jsonl"), format="svamp")


# --------------------------------------------------------------------------------------------------- ppl


def test_ppl_windows_hand_computed():
    ids = list(range(10))
    disjoint = make_windows(ids, window=4, stride=4, prefix="t")
    assert [w.input_ids for w in disjoint] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [w.n_scored for w in disjoint] == [3, 3, 1]  # the first token of each window has no history
    sliding = make_windows(ids, window=4, stride=2, prefix="t")
    assert [(w.input_ids[0], w.score_from) for w in sliding] == [(0, 0), (2, 2), (4, 2), (6, 2)]
    assert sum(w.n_scored for w in sliding) == 9  # every token but the very first, each once
    assert [w.input_ids for w in make_windows(list(range(9)), 4, 4, "t")] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_ppl_task_text_and_jsonl(tmp_path):
    (tmp_path / "wiki.txt").write_text("one two three four five six seven", encoding="utf-8")
    task = get_eval_task("ppl", path=str(tmp_path / "wiki.txt"), window=3)
    assert isinstance(task, PerplexityTask)
    windows = task.windows(WhitespaceTokenizer())
    assert [len(w.input_ids) for w in windows] == [3, 3] and windows[0].id == "wiki-0"  # 7th token: no history
    row = task.result_row([2.0, 1.0], [3, 1], [[1, 0], [True, True]])
    assert row == {"task": "ppl/wiki", "length": 3, "n": 2, "score": pytest.approx(math.exp(-3 / 4)),
                   "sparsity": pytest.approx(0.75)}
    assert task.required_positions() == 3
    record = task.record(windows[0], nll_sum=2.0, decisions=[True, False])
    assert (record.id, record.task, record.length, record.prompt_tokens) == ("wiki-0", "ppl/wiki", 3, 3)
    assert record.score == pytest.approx(math.exp(-1.0)) and record.sparsity == 0.5  # 2 scored tokens
    write_jsonl(tmp_path / "docs.jsonl", [{"text": "a b"}, {"text": "c"}])
    assert PerplexityTask(str(tmp_path / "docs.jsonl")).text == "a b\n\nc"
    with pytest.raises(ValueError, match=r"stride must be an integer in \[1, window=3\]"):
        PerplexityTask(str(tmp_path / "wiki.txt"), window=3, stride=4)
    with pytest.raises(ValueError, match="one NLL sum, token count and decision list per window"):
        task.result_row([1.0], [1, 2], [[0]])


# --------------------------------------------------------------------------------------------------- RULER


def chat_tokenizer():
    """A word-level HF tokenizer with a tiny chat template: user message "x" renders as 6 tokens, 5 of template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "x": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")
    fast.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant :{% endif %}")
    return fast


def test_ruler_grid_from_the_synthetic_generators():
    task = get_eval_task("ruler", tasks=["niah_multivalue", "variable_tracking"], lengths=[256, 384], n=2, seed=3)
    samples = task.samples(WhitespaceTokenizer(), prompt_overhead=10)
    assert len(samples) == 2 * 2 * 2
    assert [task.row_key(s) for s in samples[:4]] == [("ruler/niah_multivalue", 256)] * 2 + [
        ("ruler/niah_multivalue", 384)] * 2
    # Prompt + generation fit in the cell: message = length - budget (128 niah, 30 vt) - overhead - 1% margin.
    assert [s.meta["message_tokens"] for s in samples[::2]] == [256 - 128 - 10 - 2, 384 - 128 - 10 - 3,
                                                                 256 - 30 - 10 - 2, 384 - 30 - 10 - 3]
    mv = samples[0]
    assert len(mv.answers) == 4 and mv.meta["task_type"] == "retrieval"
    assert task.score(" ".join(mv.answers), mv) == 1.0
    assert task.score(" ".join(mv.answers[:3]), mv) == pytest.approx(0.75)  # string_match_all
    assert task.max_new_tokens(mv) == 128 and task.max_new_tokens(samples[-1]) == 30
    assert task.required_positions() == 384
    again = get_eval_task("ruler", tasks=["niah_multivalue", "variable_tracking"], lengths=[256, 384], n=2, seed=3)
    assert [s.answers for s in again.samples(WhitespaceTokenizer(), prompt_overhead=10)] == [s.answers for s in samples]


def test_ruler_samples_record_where_their_answers_sit():
    """Retrieval samples carry needle_depth / needle_distance_tokens (words here), checked by hand on the context;
    holistic samples (no single answer position) carry neither."""
    from flux.evals.ruler import needle_position

    tok = WhitespaceTokenizer()
    assert needle_position("a b KEY c d e", ["KEY"], tok) == {"needle_distance_tokens": 4, "needle_depth": 0.3333}
    assert needle_position("x A y B z", ["B", "A"], tok) == {"needle_distance_tokens": 4, "needle_depth": 0.2}
    assert needle_position("x y", ["missing"], tok) == {}
    task = RulerTask(tasks=["niah_multikey", "niah_multivalue", "fwe"], lengths=[384], n=3, seed=1)
    samples = task.samples(tok, prompt_overhead=10)
    for sample in samples:
        if sample.task == "fwe":
            assert "needle_depth" not in sample.meta and "needle_distance_tokens" not in sample.meta
            continue
        words = sample.context.split()
        first = min(i for i, w in enumerate(words) if any(a in w for a in sample.answers))
        assert sample.meta["needle_distance_tokens"] == len(words) - first
        assert sample.meta["needle_depth"] == pytest.approx(first / len(words), abs=1e-4)
    # the generator's own depth of the queried needle agrees with the measured one (sentences vs words)
    multikey = [s for s in samples if s.task == "niah_multikey"]
    assert all(abs(s.meta["needle_depth"] - s.meta["depths"][0]) < 0.1 for s in multikey)


def test_ruler_measures_the_template_overhead():
    from flux.data.prompting import build_prompt

    tokenizer = chat_tokenizer()
    assert template_overhead(tokenizer) == 5
    task = RulerTask(tasks=["niah_single"], lengths=[256], n=2, max_new_tokens=40)
    for sample in task.samples(tokenizer):
        assert sample.meta["message_tokens"] == 256 - 40 - 5 - 2
        assert len(build_prompt(tokenizer, sample.context, sample.question).input_ids) + 40 <= 256


def test_ruler_config_errors():
    with pytest.raises(ValueError, match=r"unknown ruler task\(s\) \['niah'\]"):
        RulerTask(tasks=["niah"])
    with pytest.raises(ValueError, match="ruler lengths must be"):
        RulerTask(lengths=[1024, "2k"])
    with pytest.raises(ValueError, match=r"cells \[\('niah_single', 128\)\] leave fewer than 64 tokens"):
        RulerTask(tasks=["niah_single"], lengths=[128, 1024])
    with pytest.raises(ValueError, match="leaves 58 tokens for 'niah_single'"):
        RulerTask(tasks=["niah_single"], lengths=[200]).samples(WhitespaceTokenizer(), prompt_overhead=12)
    with pytest.raises(ValueError, match="ruler haystack must be one of"):
        RulerTask(haystack="essays")
    with pytest.raises(ValueError, match="ruler n"):
        RulerTask(n=0)
    with pytest.raises(ValueError, match="needs the backbone's tokenizer"):
        RulerTask().samples()


# --------------------------------------------------------------------------------------------------- conf/eval


@pytest.mark.parametrize("name", ["ruler", "jsonl", "longbench", "longbench_e", "longbench_v2", "math", "ppl"])
def test_conf_eval_groups_instantiate(tmp_path, name):
    cfg = OmegaConf.create({"eval": OmegaConf.load(CONF / f"{name}.yaml")})
    assert cfg.eval.name == name and cfg.eval.task.name == name and cfg.eval.batch_size >= 1
    if name == "ruler":
        assert list(cfg.eval.task.lengths) == [1024, 2048, 4096, 8192] and cfg.eval.task.n == 20
        assert isinstance(instantiate(cfg.eval.task), RulerTask)
        return
    with pytest.raises(MissingMandatoryValue):
        instantiate(cfg.eval.task)
    files = {
        "jsonl": ("u.jsonl", [{"context": "c", "question": "q", "answers": ["a"]}]),
        "longbench": ("lb.jsonl", [lb_record(0, "hotpotqa")]),
        "longbench_e": ("lbe.jsonl", [lb_record(0, "hotpotqa_e")]),
        "longbench_v2": ("v2.jsonl", [v2_record(0)]),
        "math": ("g.jsonl", [{"question": "q", "answer": "#### 1"}]),
        "ppl": ("t.jsonl", [{"text": "some text"}]),
    }
    filename, records = files[name]
    cfg.eval.task.path = str(write_jsonl(tmp_path / filename, records))
    task = instantiate(cfg.eval.task)
    expected = {"jsonl": "JsonlTask", "longbench": "LongBenchTask", "longbench_e": "LongBenchTask",
                "longbench_v2": "LongBenchV2Task", "math": "MathTask", "ppl": "PerplexityTask"}[name]
    assert type(task).__name__ == expected
    assert task.family == name
