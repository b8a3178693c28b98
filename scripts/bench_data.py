"""Benchmark: build GSM8K train (7,473 rows) with validation, exact and near dedupe, PII scan and 13-gram
decontamination against GSM8K test, as `finetune data build` does. Target (issue 3): under 20 s on 2 CPU cores.

Run from the project root, with the public datasets folder beside the checkout (docs/benchmarks.md has the command
and the measured table):
    .venv/bin/python scripts/bench_data.py [--repeat 3] [--shared DIR]
Prints one markdown table (whole build, then each step alone) with the machine and package versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.build import build, eval_texts  # noqa: E402
from data_prep.quality import decontam, dedupe  # noqa: E402
from data_prep.quality.pii import Scanner  # noqa: E402
from data_prep.sources.load import load_source  # noqa: E402
from data_prep.spec import BuildSpec  # noqa: E402


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def gsm8k_build_spec(g: Path) -> BuildSpec:
    """GSM8K train with every filter on, decontaminated against GSM8K test (scripts/bench_pii.py builds the same)."""
    return BuildSpec.model_validate({
        "name": "gsm8k-bench",
        "sources": [{"path": str(g / "train.jsonl"), "adapter": "gsm8k", "options": {"boxed": True}, "license": "mit"}],
        "quality": {"dedupe": "near", "pii": {"action": "redact"},
                    "decontaminate": {"against": [{"path": str(g / "test.jsonl"), "adapter": "gsm8k"}]}},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parent.parent.parent / "shared" / "datasets")
    args = ap.parse_args()
    g = args.shared / "gsm8k"
    if not g.is_dir():
        sys.exit(f"{g} not found: pass --shared PATH/TO/shared/datasets")
    spec = gsm8k_build_spec(g)
    with tempfile.TemporaryDirectory() as tmp:
        total, built = timed(lambda: build(spec, Path("."), Path(tmp) / "out"), args.repeat)
    src, against = spec.sources[0], spec.quality.decontaminate.against[0]
    t_read, loaded = timed(lambda: load_source(src, Path(".")), args.repeat)
    rows = loaded.rows
    t_exact, _ = timed(lambda: dedupe.exact(rows), args.repeat)
    q = spec.quality
    t_near, (_, near_removed) = timed(lambda: dedupe.near(rows, q.near.threshold, q.near.num_perm, q.near.ngram), args.repeat)

    def dc():
        index = decontam.EvalIndex(13, 8)
        index.add("gsm8k-test", eval_texts(against, Path(".")))
        return decontam.decontaminate(rows, index)

    t_dc, (_, hits) = timed(dc, args.repeat)
    t_pii, _ = timed(lambda: list(Scanner(q.pii.kinds).scan_rows(rows)), args.repeat)
    n = built.rows_read
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          + ", ".join(f"{p} {metadata.version(p)}" for p in ("datasketch", "rouge-score", "pyarrow")))
    print(f"Median of {args.repeat} runs. Rows: {n} read, {built.train} train, {built.val} val, {built.rejected} rejected "
          f"({len(hits)} contaminated, {len(near_removed)} near duplicates).\n")
    print("| step | seconds | rows/s |\n|---|---|---|")
    for name, t in (("whole build (write + data card + PNG)", total), ("read + adapter + validation", t_read), ("exact dedupe", t_exact),
                    ("near dedupe (MinHash LSH)", t_near), ("decontamination (13-gram, 1,319 test items)", t_dc), ("PII scan", t_pii)):
        print(f"| {name} | {t:.2f} | {n / t:,.0f} |")


if __name__ == "__main__":
    main()
