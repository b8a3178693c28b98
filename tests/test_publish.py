"""Publishing: one commit to a loopback Hub (with a failure in the middle and a retry), file:// revisions, the gates,
and the model card field by field."""

from __future__ import annotations

import json
import logging
import shutil
import time
import types
from pathlib import Path

import pytest

from finetune.card import front_matter
from finetune.errors import PublishRefused
from finetune.publish import PushFailed, latest_revision, publish
from finetune.run import RunDir

from .mock_hub import MockHub

HF_FAKE = "hf_" + "PublishFake0123456789abcdefghijklmn"[:34]


@pytest.fixture(scope="module")
def legal(smoke_runs):
    return smoke_runs["legal"][0]


def fresh(legal, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(legal, d, ignore=shutil.ignore_patterns("hub"))
    return RunDir(d)


def recipe_of(run: RunDir, *sets):
    """The run's recipe, publishing into the copy (the resolved recipe names the original run's hub folder)."""
    return run.load_recipe([f"publish.to=file://{run.root / 'hub'}", *sets])[0]


def local_files(run: RunDir, base_name: str = "m") -> dict[str, bytes]:
    """What the repository must hold, read from the run's own folders: every file byte for byte, except that the
    published adapter_config.json names the base by its public name instead of this machine's path."""
    out = {p.name: p.read_bytes() for p in run.adapter.iterdir() if p.is_file()}
    cfg = json.loads(out["adapter_config.json"])
    assert Path(cfg["base_model_name_or_path"]).is_absolute()  # the run's own copy points at the local stand-in
    out["adapter_config.json"] = (json.dumps({**cfg, "base_model_name_or_path": base_name}, indent=2) + "\n").encode()
    out.update({f"merged/{p.relative_to(run.merged)}": p.read_bytes() for p in run.merged.rglob("*") if p.is_file()})
    out.update({"README.md": (run.card / "README.md").read_bytes(), "run.lock.json": run.lock.read_bytes(),
                "eval_report.json": (run.eval / "report.json").read_bytes(), "merge_check.json": run.merge_check.read_bytes()})
    return out


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import; the mock is loopback
    # huggingface_hub retries a failed commit itself (6 tries, 1-8 s apart) before ours retries the whole push: no waiting here.
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=lambda s: None, time=time.time, monotonic=time.monotonic))
    with MockHub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_TOKEN", HF_FAKE)
        yield h


def test_push_fails_midway_then_retries_into_one_commit_byte_for_byte(legal, tmp_path, hub, caplog):
    run = fresh(legal, tmp_path)
    r = recipe_of(run, "publish.to=hf://acme/legal-saul", "publish.backoff_s=0.01", "publish.retries=1")
    before = {p: p.read_bytes() for p in run.adapter.iterdir()}
    hub.fail_commits = 100  # the Hub answers 500 to every commit, after reading the whole upload
    with caplog.at_level(logging.INFO, logger="finetune"), pytest.raises(PushFailed, match="failed after 2 attempt.*run .finetune publish"):
        publish(r, run, "finetune-smoke/tiny-mistral", smoke=True)
    assert hub.failed == 12 and hub.repos["acme/legal-saul"].commits == []  # 2 pushes x 6 tries of huggingface_hub
    assert {p: p.read_bytes() for p in run.adapter.iterdir()} == before  # the run's artifacts untouched
    hub.fail_commits, hub.failed = 8, 0  # the outage outlasts huggingface_hub's own retries once, then the Hub recovers
    r = recipe_of(run, "publish.to=hf://acme/legal-saul", "publish.backoff_s=0.01", "publish.retries=3")
    with caplog.at_level(logging.INFO, logger="finetune"):
        out = publish(r, run, "finetune-smoke/tiny-mistral", smoke=True)
    repo = hub.repos["acme/legal-saul"]
    assert hub.failed == 8 and out["attempts"] == 2 and len(repo.commits) == 1 and repo.private
    want = local_files(run, "finetune-smoke/tiny-mistral")
    assert repo.files.keys() == want.keys() and all(repo.files[k] == want[k] for k in want)
    assert {"adapter_model.safetensors", "tokenizer.json", "README.md", "run.lock.json", "merged/model.safetensors"} <= repo.files.keys()
    assert hub.tokens and all(t == f"Bearer {HF_FAKE}" for t in hub.tokens)  # the token went to the Hub only
    assert HF_FAKE not in caplog.text and not (run.root / ".publish").exists()


# Only rank 0 publishes: the pipeline runs publish on rank 0 alone, tested with two real processes in
# test_distributed.py (test_rank_1_trains_and_runs_no_other_stage). A test that set RANK and called publish() directly
# was removed: no code path calls publish off rank 0, so it exercised a guard nothing reaches.


def test_file_target_keeps_numbered_revisions(legal, tmp_path):
    run = fresh(legal, tmp_path)
    target = tmp_path / "onprem"
    r = recipe_of(run, f"publish.to=file://{target}")
    publish(r, run, "m", smoke=True)
    publish(recipe_of(run, f"publish.to=file://{target}", "publish.what=[adapter]"), run, "m", smoke=True)
    assert sorted(p.name for p in target.iterdir()) == [".lock", "0001", "0002", "refs"] and latest_revision(target).name == "0002"
    first, second = target / "0001", target / "0002"
    want = local_files(run)
    got = {str(p.relative_to(first)): p.read_bytes() for p in first.rglob("*") if p.is_file() and p.name != ".revision.json"}
    # the card was rewritten by the second publish (its "How to load" names what that one ships): compare it there
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want if k != "README.md")
    assert (second / "README.md").read_bytes() == want["README.md"] and b'subfolder="merged"' in got["README.md"]
    assert not (second / "merged").exists() and (second / "adapter_model.safetensors").read_bytes() == want["adapter_model.safetensors"]
    meta = json.loads((first / ".revision.json").read_text())
    assert meta["revision"] == "0001" and len(meta["files"]["adapter_model.safetensors"]) == 64


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_gates_refuse_with_exit_3_unless_forced(legal, tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    run = fresh(legal, tmp_path)
    task = json.loads((run.eval / "report.json").read_text())["tasks"][1]
    assert task["higher_is_better"]

    def regress(report):
        t = report["tasks"][1]
        t["base"]["score"], t["tuned"]["score"], t["delta_ci95"] = 0.60, 0.55, [-0.08, -0.03]

    edit_json(run.eval / "report.json", regress)
    r = recipe_of(run, "publish.gate.max_regression=0.02")
    with pytest.raises(PublishRefused, match=rf"regression on {task['name']} \(adapter\): .* 0.6 -> 0.55 \(worse by 0.05, and by at least 0.03 > 0.02"):
        publish(r, run, "m", smoke=True)
    assert publish(recipe_of(run, "publish.gate.max_regression=0.06"), run, "m", smoke=True)["files"]  # within the allowance
    # Perplexity: lower is better, compared relatively.
    edit_json(run.eval / "report.json", lambda rep: rep["tasks"][0].update(base={"score": 10.0, "ci95": [9, 11]},
                                                                        tuned={"score": 10.5, "ci95": [9, 12]}, delta_ci95=[0.45, 0.55]))
    with pytest.raises(PublishRefused, match=r"heldout \(adapter\): perplexity 10 -> 10.5 \(worse by 0.05"):
        publish(recipe_of(run, "publish.gate.max_regression=0.06", "publish.gate.max_regression=0.04"), run, "m", smoke=True)
    edit_json(run.eval / "report.json", lambda rep: rep["tasks"][0].update(tuned={"score": 9.0, "ci95": [8, 10]}, delta_ci95=[-1.2, -0.8]))

    # Licences: a commercial licence claimed over non-commercial data.
    edit_json(run.data / "provenance.json", lambda p: p["sources"][0].update(license="cc-by-nc-4.0"))
    with pytest.raises(PublishRefused, match=r"licence: publish.license 'apache-2.0' allows commercial use, but legal.jsonl \(cc-by-nc-4.0\) does not"):
        publish(recipe_of(run, "publish.license=apache-2.0"), run, "m", smoke=True)
    publish(recipe_of(run, "publish.license=cc-by-nc-4.0"), run, "m", smoke=True)  # the honest licence passes
    edit_json(run.data / "provenance.json", lambda p: p["sources"][0].update(license="apache-2.0"))

    # PII flagged and kept.
    edit_json(run.data / "provenance.json", lambda p: p["quality"].update(pii={"action": "flag", "rows": 2, "findings": {"email": 2}}))
    # as if prepare had written it: an edited output is refused as stale otherwise (test_hostile.py)
    run.update_stage("prepare", outputs=run.describe_outputs([run.data]))
    run.update_stage("eval", outputs=run.describe_outputs([run.eval]))
    runner = CliRunner()
    out = runner.invoke(app, ["publish", str(run.root), "--to", f"file://{tmp_path / 'pub'}"])
    assert out.exit_code == 3 and "personal data: the PII scan flagged 2 training rows" in out.output and "--force" in out.output, out.output
    assert latest_revision(tmp_path / "pub") is None  # nothing written
    out = runner.invoke(app, ["publish", str(run.root), "--to", f"file://{tmp_path / 'pub'}", "--force"])
    assert out.exit_code == 0, out.output
    assert latest_revision(tmp_path / "pub").name == "0001"
    # A merged model that failed its check: never, not even forced.
    # (publish itself is called: through the CLI, the edited merge_check.json makes the eval that read it stale first)
    edit_json(run.merge_check, lambda c: c.update(passed=False))
    with pytest.raises(PublishRefused, match="never published"):
        publish(recipe_of(run, f"publish.to=file://{tmp_path / 'pub'}"), run, "m", smoke=True, force=True)
    out = runner.invoke(app, ["publish", str(run.root), "--to", f"file://{tmp_path / 'pub'}", "--force"])
    stale = "out of date: merge (its outputs were modified or removed); eval (changed since it ran: file merge_check.json"
    assert out.exit_code == 2 and stale in out.output, out.output
    assert latest_revision(tmp_path / "pub").name == "0001"


def test_card_fields(legal, tmp_path):
    from finetune.card import render_card

    run = fresh(legal, tmp_path)
    edit_json(run.data / "provenance.json", lambda p: p["sources"].append(
        {"hub": "isaacus/open-australian-legal-qa", "license": "cc-by-nc-4.0", "rows_read": 10, "rows_kept": 9, "not_selected": 0,
         "removed": {"invalid": 1},
         "sha256": "ab" * 32}))
    r = recipe_of(run, "publish.tags=[australia]")
    card = render_card(r, run, "Equall/Saul-7B-Instruct-v1", smoke=False)
    front = front_matter(card)
    report = json.loads((run.eval / "report.json").read_text())
    assert front["base_model"] == "Equall/Saul-7B-Instruct-v1" and front["library_name"] == "peft"
    assert front["license"] == "other"  # apache-2.0 sample data + cc-by-nc-4.0 hub data: no single licence
    assert front["datasets"] == ["isaacus/open-australian-legal-qa"]
    assert front["tags"] == ["finetune", "legal", "lora", "qlora", "4-bit", "australia"]
    (index,) = front["model-index"]
    assert [res["task"]["name"] for res in index["results"]] == [t["name"] for t in report["tasks"]]
    body = card.split("---\n", 2)[2]
    assert "> Some training data is licensed for non-commercial use only: so is this model." in body
    for heading in ("## Evaluation (base, adapter as trained, and the published merged model, on identical prompts)", "## Training",
                    "## Data provenance", "## Merge check",
                    "## Intended use", "## How to load"):
        assert heading in body, heading
    assert "does not give legal advice" in body
    assert "| isaacus/open-australian-legal-qa | cc-by-nc-4.0 | `abababababab` | 10 | 9 | invalid 1 |" in body
    check = json.loads(run.merge_check.read_text())
    assert f"{check['merged_vs_adapter_max_abs_diff']:.2e}" in body
    summary = json.loads((run.adapter / "training_summary.json").read_text())
    assert f"{summary['global_step']} steps" in body
    # No local paths, no secrets.
    assert str(run.root) not in card and "/tmp/" not in card and str(tmp_path) not in card and "hf_" not in card


def test_gguf_goes_to_the_hub_in_the_same_commit_byte_for_byte(legal, tmp_path, hub):
    from finetune.export import export

    run = fresh(legal, tmp_path)
    export(run.root, "gguf", "q8_0")
    r = recipe_of(run, "publish.to=hf://acme/legal-gguf", "publish.what=[adapter,gguf]", "publish.backoff_s=0.01")
    out = publish(r, run, "finetune-smoke/tiny-mistral", smoke=True)
    repo = hub.repos["acme/legal-gguf"]
    assert out["attempts"] == 1 and len(repo.commits) == 1
    name = "legal-saul-7b-q8_0"
    assert repo.files[f"gguf/{name}.gguf"] == (run.root / "export" / f"{name}.gguf").read_bytes()
    assert repo.files["gguf/Modelfile"] == (run.root / "export" / f"{name}.Modelfile").read_bytes()
    assert json.loads(repo.files["gguf/export_check.json"])["files"][f"{name}.gguf"]["passed"] is True
    assert "merged/model.safetensors" not in repo.files  # only what publish.what names
