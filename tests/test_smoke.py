"""`finetune run recipes/<domain>.yaml --smoke` for every shipped recipe: the README's demo and CI's end-to-end test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finetune.card import front_matter
from finetune.recipe import AFTER_SFT, load_recipe
from finetune.stages import NAMES as STAGES

from .conftest import RECIPES, ROOT

SFT_STAGES = tuple(s for s in STAGES if s not in ("cpt", "export", *AFTER_SFT))  # the shipped recipes' stages are [sft], no GGUF export


@pytest.mark.slow
@pytest.mark.parametrize("name", ["legal", "medical", "math"])
def test_smoke_run_leaves_every_artifact(smoke_runs, name):
    run, outcome = smoke_runs[name]
    assert outcome == {s: "ran" for s in SFT_STAGES}
    for rel in ("recipe.yaml", "run.lock.json", "manifest.json", "data/train.jsonl", "data/val.jsonl", "data/provenance.json",
                "data/datacard.md", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged/config.json",
                "merge_check.json", "eval/report.json", "eval/report.md", "card/README.md", "logs/metrics.jsonl"):
        assert (run / rel).is_file(), rel
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000010", "step-000020"]
    assert all((p / "COMPLETE").exists() for p in (run / "checkpoints").iterdir())
    report = json.loads((run / "eval/report.json").read_text())
    recipe = load_recipe(RECIPES / f"{name}.yaml")[0]
    sample_tasks = [t.name for t in recipe.samples.tasks]
    assert [t["name"] for t in report["tasks"]] == ["heldout", *sample_tasks, f"{name}-samples"]
    val_rows = len((run / "data/val.jsonl").read_text().splitlines())
    for task in report["tasks"]:
        assert {"name", "type", "metric", "n", "base", "tuned", "delta", "delta_ci95"} <= task.keys()
        for who in ("base", "tuned"):
            lo, hi = task[who]["ci95"]
            assert lo <= task[who]["score"] + 1e-9 and task[who]["score"] <= hi + 1e-9
        assert task["delta"] == pytest.approx(task["tuned"]["score"] - task["base"]["score"])
        # every item scored, for both models: n is the number of rows of the task's file
        spec = next((t for t in recipe.samples.tasks if t.name == task["name"]), None)
        rows = val_rows if task["name"] == "heldout" else len((RECIPES / (spec.path if spec else recipe.samples.eval)).read_text().splitlines())
        items = [json.loads(l) for l in (run / "eval/items" / f"{task['name']}.jsonl").read_text().splitlines()]
        assert task["n"] == rows == len(items) and all({"base", "tuned"} <= it.keys() for it in items)
    assert {t["type"] for t in report["tasks"]} >= {"perplexity", "multiple_choice"}
    assert (run / "eval/report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| general-knowledge |" in (run / "eval/report.md").read_text()
    card = (run / "card/README.md").read_text()
    fm = front_matter(card)
    assert fm["library_name"] == "peft" and fm["base_model"].startswith("finetune-smoke/") and fm["license"]
    assert "| heldout |" in card and str(run) not in card  # eval table in, no absolute local paths
    index = {r["task"]["name"]: r for r in fm["model-index"][0]["results"]}
    assert index.keys() == {t["name"] for t in report["tasks"]}
    for task in report["tasks"]:
        got = {m["name"]: m for m in index[task["name"]]["metrics"]}
        tuned = got[f"{task['metric']} (tuned)"]
        assert tuned["value"] == pytest.approx(task["tuned"]["score"], abs=1e-4) and tuned["args"]["n"] == task["n"]
        assert got[f"{task['metric']} (base)"]["args"]["ci95"] == pytest.approx(task["base"]["ci95"], abs=1e-4)
    hub = run / "hub" / (run / "hub/refs/main").read_text().strip()
    assert hub.name == "0001" and (hub / "README.md").read_text() == card
    assert (hub / "adapter_model.safetensors").is_file() and (hub / "merged" / "model.safetensors").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in SFT_STAGES) and "cpt" not in manifest["stages"]
    lock = json.loads((run / "run.lock.json").read_text())
    assert lock["versions"]["torch"] and lock["data"]["train.jsonl"]
    # prepare went through data_prep: every quality filter ran and every row read is accounted for
    prov = json.loads((run / "data/provenance.json").read_text())
    assert {"dedupe", "near", "decontamination", "pii"} <= prov["quality"].keys()
    assert prov["quality"]["decontamination"]["eval_sets"] == [*sample_tasks, f"{name}-samples"]
    src = prov["sources"][0]
    rejected = sum(1 for _ in (run / "data/rejects.jsonl").read_text().splitlines())
    assert src["rows_read"] == src["rows_kept"] + sum(src["removed"].values()) == prov["splits"]["train"]["n"] + prov["splits"]["val"]["n"] + rejected
    assert (run / "data/lengths.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_demo_command_twice_from_the_command_line(tmp_path):
    """The README's demo, as a user types it; the second run skips every stage."""
    cmd = [sys.executable, "-m", "finetune.cli", "run", "recipes/legal.yaml", "--smoke", "--run-dir", str(tmp_path / "run")]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0
    assert [l.split()[1] for l in second.stderr.splitlines() if l.split()[:1] and l.split()[0] in STAGES] == ["skipped"] * len(SFT_STAGES)


@pytest.mark.slow
def test_math_recipe_prepares_real_gsm8k_through_data_prep(shared_datasets, tmp_path):
    """The shipped math recipe's prepare stage, pointed at the local GSM8K files instead of the Hub: adapter with
    \\boxed{} answers, decontamination against the test split, then the recipe's template and tokenizer."""
    from finetune.prepare import prepare
    from finetune.recipe import load_recipe
    from finetune.run import RunDir
    from finetune.smoke import build_tokenizer

    g = shared_datasets / "gsm8k"
    local = lambda key, f: [f"{key}.path={g / f}", f"{key}.hub=null", f"{key}.config=null"]  # noqa: E731
    r, _ = load_recipe(RECIPES / "math.yaml", local("data.sources.0", "train.jsonl") + local("data.quality.decontaminate.against.0", "test.jsonl")
                       + ["eval.tasks=[]"])  # the recipe's eval tasks are on the Hub; GSM8K test is the `against` set here
    tok = build_tokenizer([l for l in (g / "train.jsonl").read_text().splitlines()[:300]])
    stats = prepare(r, tmp_path, RunDir(tmp_path / "run"), tok)
    prov = json.loads((tmp_path / "run/data/provenance.json").read_text())
    assert stats["rows_read"] == 7473 and prov["sources"][0]["removed"]["contaminated"] == 11
    assert stats["train"]["n"] + stats["val"]["n"] + stats["rejected"] == 7473 and stats["val"]["n"] == 373
    row = json.loads((tmp_path / "run/data/train.jsonl").read_text().splitlines()[0])
    assert row["completion"].endswith("\\boxed{72}") and row["labels"][-1] == tok.eos_token_id
    assert (tmp_path / "run/data/lengths.png").exists() and "tokens" in (tmp_path / "run/data/datacard.md").read_text()
