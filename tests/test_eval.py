"""The eval harness: answer extraction, metrics against independent computations, stand-in models that know the
answers (100%) or always miss them (0%) on the real files, the tiny model on the same files, and `finetune eval`."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.errors import DataError
from finetune import metrics
from finetune.answers import equivalent, extract
from finetune.harness import score_items, task_entry
from finetune.tasks import EvalTask, load_items, load_task_file

from .conftest import ROOT

# --------------------------------------------------------------------------------------------------
# Answer extraction: (generated text, expected answer or None)

TRICKY = [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("#### 1,000", "1,000"),
    ("The total is $18.\n#### $18", "$18"),
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{3} then corrected: \\boxed{5}", "5"),
    ("\\boxed{x^{2}+1}", "x^{2}+1"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("The answer is \\boxed 7", "7"),
    ("\\boxed{12", "12"),  # unclosed box: falls through to the last number
    ("The answer is 18.", "18"),
    ("The answer is: 3.5", "3.5"),
    ("The final answer is 250 dollars.", "250 dollars"),
    ("Final answer: -4", "-4"),
    ("the answer is $1,200.", "1,200"),  # currency sign dropped with the markup
    ("The answer is 0.75. That is 3/4 of the cake.", "0.75"),
    ("So she has 5 + 3 = 8 apples left", "8"),
    ("It costs 0.75 dollars, or 3/4", "3/4"),
    ("Total: -5 degrees", "-5"),
    ("He earns 1,234,567 in a year", "1,234,567"),
    ("The rate is 45%", "45%"),
    ("version2 has no standalone number", None),
    ("no number here at all", None),
    ("", None),
    ("#### ", None),
    ("The answer is \\boxed{16}. Check: 16 - 4 = 12", "16"),
    ("Step 1: 2*3=6. Step 2: 6+4=10\n#### 10", "10"),
    ("I think it's 7.\n\nQuestion: next one has 99", "99"),  # no stop applied here: the last number wins
    ("Answer: 12 apples and 3 pears; the answer is 15", "15"),
    ("−3 is the answer is", "−3"),  # unicode minus
    ("x = 5 is the solution, #### x = 5", "x = 5"),
    ("the answer is **42**.", "42"),
]


@pytest.mark.parametrize("text,expected", TRICKY)
def test_answer_extraction(text, expected):
    assert extract(text) == expected


EQUIVALENT = [("1,200", "1200"), ("$18", "18"), ("18.00", "18"), ("\\frac{1}{2}", "0.5"), ("3/4", "0.75"), ("x = 5", "5"),
              ("−3", "-3"), ("\\text{5}", "5"), ("250 dollars", "250"), ("{1,2}", "{2,1}"), ("2\\sqrt{2}", "\\sqrt{8}")]
DIFFERENT = [("17", "71"), ("0.5", "5"), ("1,200", "120"), ("-3", "3"), ("\\frac{1}{3}", "0.33"), ("x^2", "x^3")]


@pytest.mark.parametrize("a,b", EQUIVALENT)
def test_equivalent_answers(a, b):
    assert equivalent(a, b)


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_different_answers(a, b):
    assert not equivalent(a, b) and not equivalent(None, b)


# --------------------------------------------------------------------------------------------------
# Metrics against independent computations


def test_wilson_matches_scipy_and_accuracy_counts():
    from scipy.stats import binomtest

    for k, n in [(0, 20), (7, 20), (20, 20), (412, 500)]:
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert metrics.wilson(k, n) == pytest.approx([ref.low, ref.high], abs=1e-9)
    got = metrics.score("accuracy", [{"correct": c} for c in [1, 0, 1, 1]])
    assert got["score"] == 0.75 and got["correct"] == 3


def test_balanced_accuracy_and_macro_f1_by_hand():
    gold = ["yes"] * 8 + ["no"] * 2
    pred = ["yes"] * 10  # majority guess: 80% accuracy, 50% balanced accuracy (LegalBench's point)
    assert metrics.balanced_accuracy(gold, pred) == 0.5
    # F1(yes) = 2*8/(10+8) = 0.888.., F1(no) = 0
    assert metrics.macro_f1(gold, pred) == pytest.approx((16 / 18 + 0) / 2)
    gold = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", "a"]
    assert metrics.balanced_accuracy(gold, pred) == pytest.approx((0.5 + 1 + 0) / 3)


def test_bootstrap_interval_covers_and_is_seeded():
    items = [{"gold": g, "pred": p} for g, p in zip("aabbccaabb", "abbbcaaabb")]
    a, b = metrics.score("balanced_accuracy", items), metrics.score("balanced_accuracy", items)
    assert a == b and a["ci95"][0] < a["score"] < a["ci95"][1]
    ppl = metrics.score("perplexity", [{"nll": 2.0, "tokens": 1}, {"nll": 6.0, "tokens": 3}])
    assert ppl["score"] == pytest.approx(math.exp(8 / 4))
    d = metrics.paired_delta_ci("accuracy", [{"correct": 0}] * 10, [{"correct": 1}] * 10)
    assert d == [1.0, 1.0]


# --------------------------------------------------------------------------------------------------
# Stand-in models: they read the gold answers from the raw files themselves, and answer through the same harness


class Oracle:
    """Knows `gold` (question text -> answer); `wrong=True` always picks something else. Finds the item in a prompt as the
    known question that occurs last in it (few-shot examples come before the item)."""

    def __init__(self, gold: dict[str, str], wrong: bool = False):
        self.gold, self.wrong, self.prompts = gold, wrong, []

    def _answer(self, prompt: str) -> str:
        best = max(self.gold, key=lambda q: prompt.rfind(q))
        assert prompt.rfind(best) >= 0, "the item's question is not in its prompt"
        return self.gold[best]

    def loglikelihood(self, requests):
        self.prompts += [p for p, _ in requests]
        out = []
        for prompt, cont in requests:
            hit = cont.strip().lower() == self._answer(prompt).strip().lower()
            out.append(0.0 if hit != self.wrong else -10.0)
        return out

    def generate(self, prompts, max_new_tokens, stop):
        self.prompts += prompts
        outs = []
        for p in prompts:
            ans = self._answer(p)
            outs.append(f"Let me think. The answer is \\boxed{{{int(ans.replace(',', '')) + 1 if self.wrong else ans}}}.")
        return outs


def _run(task: EvalTask, lm, base_dir: Path):
    items = load_items(task, base_dir)
    results = score_items(lm, task, items)
    return items, results, task_entry(task, results, None, task.source_label)


def _tsv_gold(path: Path) -> dict[str, str]:
    with open(path, encoding="utf-8", newline="") as f:
        return {r["text"]: r["label"] for r in csv.DictReader(f, delimiter="\t")}


@pytest.mark.parametrize("wrong", [False, True])
def test_stand_ins_score_100_and_0_on_gsm8k_test(shared_datasets, wrong):
    path = shared_datasets / "gsm8k" / "test.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    gold = {r["question"]: r["answer"].rsplit("####", 1)[1].strip() for r in rows}
    task = EvalTask(name="gsm8k", type="exact_match", path=str(path), gold_extract=["hash"])
    items, results, entry = _run(task, Oracle(gold, wrong), shared_datasets)
    assert entry["n"] == len(rows) == 1319 and len({r["id"] for r in results}) == 1319
    assert entry["base"]["score"] == (0.0 if wrong else 1.0)


@pytest.mark.parametrize("wrong", [False, True])
def test_stand_ins_score_100_and_0_on_pubmedqa_test_ids(shared_datasets, wrong):
    d = shared_datasets / "pubmedqa"
    truth = json.loads((d / "test_ground_truth.json").read_text())  # the labels, from a file the task never reads
    records = json.loads((d / "ori_pqal.json").read_text())
    gold = {records[pid]["QUESTION"]: label for pid, label in truth.items()}
    task = EvalTask(name="pubmedqa", type="classification", path=str(d / "ori_pqal.json"), include_ids=str(d / "test_ground_truth.json"),
                    fields={"question": "QUESTION", "context": "CONTEXTS", "label": "final_decision"},
                    prompt="Answer the research question with yes, no or maybe.", input="{{question}}\n\nContext:\n{{context}}",
                    labels=["yes", "no", "maybe"], metric="accuracy")
    items, results, entry = _run(task, Oracle(gold, wrong), shared_datasets)
    assert entry["n"] == 500 and {it.id for it in items} == set(truth)
    assert entry["base"]["score"] == (0.0 if wrong else 1.0)
    assert entry["base"]["metrics"]["macro_f1"] == (0.0 if wrong else 1.0)


@pytest.mark.parametrize("name,labels", [("hearsay", ["Yes", "No"]), ("abercrombie", ["generic", "descriptive", "suggestive", "arbitrary", "fanciful"])])
@pytest.mark.parametrize("wrong", [False, True])
def test_stand_ins_score_100_and_0_on_legalbench(shared_datasets, name, labels, wrong):
    d = shared_datasets / "legalbench_prerelease" / name
    gold = _tsv_gold(d / "test.tsv")
    task = EvalTask(name=name, type="classification", path=str(d / "test.tsv"), prompt_file=str(d / "base_prompt.txt"), labels=labels)
    lm = Oracle(gold, wrong)
    items, results, entry = _run(task, lm, shared_datasets)
    assert entry["n"] == 95 and entry["metric"] == "balanced_accuracy"
    assert entry["base"]["score"] == (0.0 if wrong else 1.0)
    # LegalBench's own few-shot prompt, the item in place of {{text}}, each label scored once per item
    assert all(it.prompt.endswith("A:") and "{{text}}" not in it.prompt for it in items)
    assert len(lm.prompts) == 95 * len(labels)


def test_fewshot_examples_never_include_the_item_and_are_the_same_each_time(tmp_path):
    rows = [{"id": i, "question": f"question number {i}?", "choices": ["x", "y"], "answer": i % 2} for i in range(6)]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = EvalTask(name="t", type="multiple_choice", path=str(f), num_fewshot=3, style="biomistral")
    a, b = load_items(task, tmp_path), load_items(task, tmp_path)
    assert [x.prompt for x in a] == [x.prompt for x in b]
    for it in a:
        own = f"question number {it.id}?"
        assert it.prompt.count("**Question:**") == 4 and it.prompt.count(own) == 1 and it.prompt.rstrip().endswith("**Answer:**(")
        assert it.prompt.startswith("The following are multiple choice questions (with answers) about medical knowledge.")
        assert it.choices == ["A", "B"]


# --------------------------------------------------------------------------------------------------
# Bad task files: one clear message


def _tasks(tmp_path, task: dict) -> Path:
    p = tmp_path / "tasks.yaml"
    p.write_text(json.dumps({"tasks": [task]}))
    return p


def test_missing_column_and_bad_label_are_clear_errors(shared_datasets, tmp_path):
    d = shared_datasets / "legalbench_prerelease" / "hearsay"
    tasks, base = load_task_file(_tasks(tmp_path, {"name": "h", "type": "classification", "path": str(d / "test.tsv"),
                                                   "fields": {"label": "lable"}, "labels": ["Yes", "No"]}))
    with pytest.raises(DataError, match="column 'lable'.*did you mean 'label'"):
        load_items(tasks[0], base)
    tasks, base = load_task_file(_tasks(tmp_path, {"name": "h", "type": "classification", "path": str(d / "test.tsv"), "labels": ["Yes", "Maybe"]}))
    with pytest.raises(DataError, match=r"row \d+: label 'No' is not in the task's labels"):
        load_items(tasks[0], base)
    tasks, base = load_task_file(_tasks(tmp_path, {"name": "h", "type": "classification", "path": str(d / "test.tsv"),
                                                   "prompt": "Q: {{txt}}", "labels": ["Yes", "No"]}))
    with pytest.raises(DataError, match=r"\{\{txt\}\}.*did you mean '\{\{text\}\}'"):
        load_items(tasks[0], base)
    with pytest.raises(DataError, match="type.*multiple_choice"):
        load_task_file(_tasks(tmp_path, {"name": "h", "type": "multiple_chioce", "path": "x.jsonl"}))


# --------------------------------------------------------------------------------------------------
# The tiny model: batching must not change what is computed, and every row of the real files is scored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_datasets):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.families import tiny_config
    from finetune.smoke import build_tokenizer

    texts = [l for l in (shared_datasets / "gsm8k" / "train.jsonl").read_text().splitlines()[:200]]
    texts += [(shared_datasets / "legalbench_prerelease" / n / "base_prompt.txt").read_text() for n in ("hearsay", "abercrombie")]
    tok = build_tokenizer(texts)
    cfg = tiny_config("llama", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model.eval(), tok, path


def test_batched_loglikelihood_and_generation_equal_one_at_a_time(tiny):
    import torch

    from finetune.lm import HFLM

    model, tok, _ = tiny
    reqs = [("Q: short?\nA:", " Yes"), ("Q: a much longer question about the contract and its clauses?\nA:", " No"),
            ("12 + 7 =", " 19"), ("The contract is", " void.")]
    batched = HFLM(model, tok, batch_size=4, progress=False).loglikelihood(reqs)
    for (ctx, cont), got in zip(reqs, batched):
        c = HFLM(model, tok).encode(ctx, bos=True)
        k = tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([c + k])).logits[0].float(), -1)
        ref = sum(float(logp[len(c) - 1 + i, t]) for i, t in enumerate(k))  # independent: one unpadded sequence
        assert got == pytest.approx(ref, abs=1e-4)
    prompts = [r[0] for r in reqs]
    one = [HFLM(model, tok, batch_size=1, progress=False).generate([p], 6, [])[0] for p in prompts]
    assert HFLM(model, tok, batch_size=4, progress=False).generate(prompts, 6, []) == one


def test_throughput_counts_the_real_tokens_each_request_processed(tiny):
    """The eval report's tokens/s counts every non-pad token the model processed: counted here independently."""
    from finetune.lm import HFLM

    model, tok, _ = tiny
    lm = HFLM(model, tok, batch_size=4, progress=False)
    reqs = [("Q: short?\nA:", " Yes"), ("Q: a longer question about the contract?\nA:", " No"), ("12 + 7 =", " 19")]
    lm.loglikelihood(reqs)
    want = sum(len(lm.encode(c, bos=True)) + len(tok(k, add_special_tokens=False)["input_ids"]) for c, k in reqs)
    assert lm.tokens == want and lm.seconds > 0
    shared = [("Is it hearsay?", " Yes"), ("Is it hearsay?", " No")]  # one context, run once from its KV cache
    lm.loglikelihood(shared)
    want += len(lm.encode("Is it hearsay?", bos=True)) + sum(len(tok(k, add_special_tokens=False)["input_ids"]) for _, k in shared)
    assert lm.tokens == want
    got = lm.throughput()
    # tokens/s from the unrounded time (the report rounds seconds to ms, which on a tiny model is most of it)
    assert got["tokens"] == want and got["tokens_per_s"] == pytest.approx(want / lm.seconds, abs=0.1)


@pytest.mark.slow
def test_tiny_model_scores_every_row_of_the_real_files(tiny, shared_datasets):
    from finetune.lm import HFLM

    model, tok, _ = tiny
    lm = HFLM(model, tok, batch_size=32, progress=False)
    g, lb, pq = shared_datasets / "gsm8k", shared_datasets / "legalbench_prerelease", shared_datasets / "pubmedqa"
    cases = [
        (EvalTask(name="gsm8k", type="exact_match", path=str(g / "test.jsonl"), gold_extract=["hash"], max_new_tokens=4), 1319),
        (EvalTask(name="hearsay", type="classification", path=str(lb / "hearsay/test.tsv"), prompt_file=str(lb / "hearsay/base_prompt.txt"),
                  labels=["Yes", "No"]), 95),
        (EvalTask(name="abercrombie", type="classification", path=str(lb / "abercrombie/test.tsv"), prompt_file=str(lb / "abercrombie/base_prompt.txt"),
                  labels=["generic", "descriptive", "suggestive", "arbitrary", "fanciful"]), 95),
        (EvalTask(name="pubmedqa", type="classification", path=str(pq / "ori_pqal.json"), include_ids=str(pq / "test_ground_truth.json"),
                  fields={"question": "QUESTION", "label": "final_decision"}, prompt="{{question}}", labels=["yes", "no", "maybe"],
                  metric="accuracy"), 500),
        (EvalTask(name="gsm8k-ppl", type="perplexity", path=str(g / "test.jsonl"), fields={"instruction": "question", "output": "answer"},
                  max_samples=200), 200),
    ]
    for task, n in cases:
        items = load_items(task, shared_datasets)
        results = score_items(lm, task, items)
        entry = task_entry(task, results, None, task.source_label)
        assert entry["n"] == len(results) == n, task.name
        assert len({(r["id"], r["row"]) for r in results}) == n
        s = entry["base"]["score"]
        assert math.isfinite(s) and entry["base"]["ci95"][0] <= s + 1e-9 <= entry["base"]["ci95"][1] + 2e-9
        if task.type == "classification":
            assert all(r["pred"] in {x.lower() for x in task.labels} for r in results)  # output constrained to the label set
        if task.type == "perplexity":
            assert all(r["tokens"] > 0 for r in results)


# --------------------------------------------------------------------------------------------------
# `finetune eval` on any model directory, with or without an adapter, tasks only in YAML


@pytest.mark.slow
def test_eval_command_on_a_model_dir_with_and_without_adapter(tiny, tmp_path, shared_datasets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, tok, model_dir = tiny
    adapter = tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))  # B != 0: it changes outputs
    peft.save_pretrained(adapter)
    d = shared_datasets / "legalbench_prerelease" / "hearsay"
    tasks = _tasks(tmp_path, {"name": "hearsay", "type": "classification", "path": str(d / "test.tsv"),
                              "prompt_file": str(d / "base_prompt.txt"), "labels": ["Yes", "No"], "max_samples": 20})
    cli = [sys.executable, "-m", "finetune.cli", "eval", str(model_dir), "--tasks", str(tasks)]
    plain = subprocess.run(cli + ["--out", str(tmp_path / "plain")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    rep = json.loads((tmp_path / "plain/report.json").read_text())
    assert rep["tasks"][0]["n"] == 20 and rep["tasks"][0]["tuned"] is None and rep["adapter"] is None
    both = subprocess.run(cli + ["--adapter", str(adapter), "--out", str(tmp_path / "both")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert both.returncode == 0, both.stderr[-2000:]
    rep2 = json.loads((tmp_path / "both/report.json").read_text())
    t = rep2["tasks"][0]
    assert t["n"] == 20 and t["tuned"] is not None and t["delta"] == pytest.approx(t["tuned"]["score"] - t["base"]["score"])
    assert rep2["tasks"][0]["base"] == rep["tasks"][0]["base"]  # the adapter switched off is the plain model
    items = [json.loads(l) for l in (tmp_path / "both/items/hearsay.jsonl").read_text().splitlines()]
    assert any(it["base"]["loglik"] != it["tuned"]["loglik"] for it in items)  # the adapter really changed the scores
    assert (tmp_path / "both/report.png").exists() and "| hearsay |" in both.stdout
    # the adapter folder alone: its base is found from adapter_config.json
    alone = subprocess.run([sys.executable, "-m", "finetune.cli", "eval", str(adapter), "--tasks", str(tasks), "--out", str(tmp_path / "alone")],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert alone.returncode == 0 and json.loads((tmp_path / "alone/report.json").read_text())["tasks"][0]["tuned"] == t["tuned"]


def test_eval_command_refuses_what_is_not_a_model(tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "notes.txt").write_text("hello")
    tasks = _tasks(tmp_path, {"name": "x", "type": "perplexity", "path": "x.jsonl"})
    out = subprocess.run([sys.executable, "-m", "finetune.cli", "eval", str(tmp_path / "notamodel"), "--tasks", str(tasks)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "not a model directory" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "finetune.cli", "eval", str(tmp_path / "notamodel")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "--tasks" in out.stderr
