"""Issue 14: what a hostile afternoon of real use broke (data loss, two runs at once, stale publishes, errors a person
can act on). Each test failed before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import RECIPES, ROOT

CLI = [sys.executable, "-m", "finetune.cli"]


def cli(*args, cwd=None, env=None, timeout=600):
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=e, timeout=timeout)


# ---- 16: JSONL is split on "\n" only


def test_jsonl_rows_holding_line_separators_read_back_whole(tmp_path):
    from data_prep.jsonl import read_jsonl

    rows = [{"instruction": "a\u2028b", "output": "c\u2029d"}, {"instruction": "plain", "output": "e\x85f"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) > len(rows)  # the trap is really there: splitlines() breaks these rows
    assert read_jsonl(path) == rows


@pytest.mark.slow
def test_real_rows_with_u2028_and_u2029_train_end_to_end(shared_datasets, tmp_path):
    """GSM8K train row 2382 holds U+2028 and PubMedQA 28177278 holds U+2029: prepared, trained, evaluated, merged."""
    gsm = (shared_datasets / "gsm8k/train.jsonl").read_text(encoding="utf-8").split("\n")
    (tmp_path / "gsm.jsonl").write_text("\n".join(gsm[2370:2400]) + "\n", encoding="utf-8")
    assert "\\u2028" in gsm[2381]
    pqa = json.loads((shared_datasets / "pubmedqa/ori_pqal.json").read_text(encoding="utf-8"))
    keys = ["28177278", *[k for k in pqa if k != "28177278"][:20]]
    (tmp_path / "pqa.json").write_text(json.dumps({k: pqa[k] for k in keys}, ensure_ascii=False), encoding="utf-8")
    assert "\u2029" in json.dumps(pqa["28177278"], ensure_ascii=False)
    sources = (f"[{{path: {tmp_path / 'gsm.jsonl'}, adapter: gsm8k, license: mit}}, "
               f"{{path: {tmp_path / 'pqa.json'}, adapter: pubmedqa, license: mit}}]")
    run = tmp_path / "run"
    r = cli("run", RECIPES / "math.yaml", "--smoke", "--run-dir", run, "--set", f"data.sources={sources}",
            "--set", "data.max_length=4096", "--set", "data.quality.pii.action=flag", "--set", "publish.gate.pii_flagged=false",
            "--set", "training.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    text = (run / "data/train.jsonl").read_text(encoding="utf-8") + (run / "data/val.jsonl").read_text(encoding="utf-8")
    assert "\u2028" in text or "\u2029" in text  # the characters reached the prepared rows and were read back
    assert json.loads((run / "manifest.json").read_text())["status"] == "done"


# ---- 1, 2: no command replaces a folder it did not make


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_data_build_never_replaces_a_users_folder_or_file(tmp_path):
    rows = [{"instruction": f"Question {i} about rule {i * 7}?", "output": f"Answer {i}: rule {i * 7} applies."} for i in range(40)]
    project = tmp_path / "project"
    project.mkdir()
    (project / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (project / "spec.yaml").write_text("name: mine\nsources: [{path: raw.jsonl}]\nmin_rows: 1\n")
    (project / "out.tmp").mkdir()  # a sibling the old build deleted as its staging folder
    (project / "out.tmp" / "keep.txt").write_text("mine")
    before = _snapshot(project)
    r = cli("data", "build", project / "spec.yaml", "--out", project, "--no-progress")
    assert r.returncode == 2 and "holds files finetune did not write (out.tmp, raw.jsonl, spec.yaml)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and _snapshot(project) == before
    (tmp_path / "afile").write_text("x")
    r = cli("data", "build", project / "spec.yaml", "--out", tmp_path / "afile", "--no-progress")
    assert r.returncode == 2 and "is a file" in r.stderr and (tmp_path / "afile").read_text() == "x"
    assert not (tmp_path / "afile.old").exists()
    # a new folder, then the same folder again (ours), both fine; the user's sibling survives
    out = project / "out"
    for _ in range(2):
        r = cli("data", "build", project / "spec.yaml", "--out", out, "--no-progress")
        assert r.returncode == 0, r.stderr
    assert (out / "train.jsonl").is_file() and (project / "out.tmp" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in project.iterdir()) == ["out", "out.tmp", "raw.jsonl", "spec.yaml"]


def test_run_dir_holding_a_users_files_is_refused_before_a_byte_is_written(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "recipe.yaml").write_text((RECIPES / "legal.yaml").read_text())
    (project / "data" / "notes.md").write_text("my notes")
    before = _snapshot(project)
    for args in (["run", project / "recipe.yaml", "--smoke", "--run-dir", "."], ["prepare", project / "recipe.yaml", "--smoke", "--run-dir", "."]):
        r = cli(*args, cwd=project)
        assert r.returncode == 2 and "holds files finetune did not write" in r.stderr, r.stderr[-2000:]
        assert _snapshot(project) == before and sorted(p.name for p in project.iterdir()) == ["data", "recipe.yaml"]
    r = cli("publish", project, cwd=project)
    assert r.returncode == 2 and "not a run directory" in r.stderr and _snapshot(project) == before
    r = cli("merge", "--base", "m", "--adapters", "a,b", "--out", project, cwd=project)
    assert r.returncode == 2 and "--out" in r.stderr and "holds files finetune did not write" in r.stderr and _snapshot(project) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = cli("validate", RECIPES / "legal.yaml", "--smoke")
    assert r.returncode == 0
    r = cli("prepare", RECIPES / "legal.yaml", "--smoke", "--run-dir", afile)
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr and afile.read_text() == "x"
