"""scripts/bench_train.py keeps working: the tiny shape on CPU, baseline and ours in their own processes, one table.
(Its numbers mean something only on a GPU; here the test checks the script, not the speed.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_bench_train_runs_both_configs_and_prints_one_table(tmp_path):
    out = subprocess.run([sys.executable, "scripts/bench_train.py", "--shape", "tiny", "--steps", "2", "--warmup", "1", "--rows", "32",
                          "--max-len", "128", "--context", "--context-start", "64", "--context-cap", "256", "--merge", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| config | tokens/s (non-pad)") and [r.split("|")[1].strip() for r in table[1:3]] == ["baseline", "ours"]
    base, ours = (json.loads((tmp_path / f"{c}.json").read_text()) for c in ("baseline", "ours"))
    # Same rows, so the same real tokens per step on average; ours packs them instead of padding.
    assert base["real_tokens"] > 0 and ours["real_tokens"] > 0 and ours["mean_seq_len"] > base["mean_seq_len"]
    assert base["tokens_per_s"] > 0 and base["peak_memory_gb"] > 0
    for config in ("baseline", "ours"):  # no memory budget on CPU: the search doubles up to the cap
        assert json.loads((tmp_path / f"{config}-context.json").read_text()) == {"config": config, "longest_context": 256, "capped": True}
    merge = json.loads((tmp_path / "ours-merge.json").read_text())
    assert merge["merge_s"] > 0 and merge["disk_floor_s"] > 0 and merge["dequant_pass_s"] > 0
    assert "| merge + save (s) | disk floor (s)" in out.stdout
    from importlib import util

    spec = util.spec_from_file_location("bench_train", ROOT / "scripts/bench_train.py")
    bench = util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # Llama-3-8B (its config.json shape) has 7.505B matmul parameters and 33.2 GFLOP/token at s=2048 (LoRA rule).
    assert round(bench.matmul_params(bench.SHAPES["llama3-8b"]) / 1e9, 3) == 7.505
    assert round(bench.flops_per_token(bench.SHAPES["llama3-8b"], 2048) / 1e9, 1) == 33.2
