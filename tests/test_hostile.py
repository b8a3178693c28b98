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
