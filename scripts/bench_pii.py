"""Benchmark and measurement of the PII step (issue 17), on the real files beside the checkout:

1. speed: the whole `finetune data build` of GSM8K train (target: under 20 s on 2 cores), the scan alone, and the
   scan with one kind at a time (rows/s per kind);
2. precision: the share of real legal, medical and maths rows the scan alters, with the findings by kind;
3. recall: the values of tests/pii_planted.py planted into real rows, per kind.

Run from the project root, with the public datasets folder beside the checkout (docs/benchmarks.md and docs/pii.md
have the command and the measured tables):
    .venv/bin/python scripts/bench_pii.py [--repeat 3] [--shared DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.build import build  # noqa: E402
from data_prep.quality.pii import KINDS, Scanner  # noqa: E402
from data_prep.quality.pii.ner import load as load_ner  # noqa: E402
from data_prep.sources.load import load_source  # noqa: E402
from data_prep.spec import Source  # noqa: E402
from scripts.bench_data import gsm8k_build_spec  # noqa: E402
from tests.pii_planted import clean_rows, plant  # noqa: E402


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def real_files(shared: Path) -> dict[str, list[dict]]:
    """The real legal, medical and maths rows as finetune reads them (adapters as the recipes use them)."""
    lb = shared / "legalbench_prerelease"
    out = {}
    for task in ("hearsay", "abercrombie"):
        rows = []
        for split in ("train", "test"):
            src = Source.model_validate({"path": str(lb / task / f"{split}.tsv"), "adapter": "legalbench",
                                         "options": {"prompt_file": str(lb / task / "base_prompt.txt")}})
            rows += load_source(src, shared).rows
        out[f"LegalBench {task} (train + test)"] = rows
    out["PubMedQA ori_pqal (1,000 abstracts)"] = load_source(Source.model_validate(
        {"path": str(shared / "pubmedqa" / "ori_pqal.json"), "adapter": "pubmedqa"}), shared).rows
    out["GSM8K train"] = load_source(Source.model_validate({"path": str(shared / "gsm8k" / "train.jsonl"), "adapter": "gsm8k"}), shared).rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "datasets")
    args = ap.parse_args()
    g = args.shared / "gsm8k"
    if not g.is_dir():
        sys.exit(f"{g} not found: pass --shared PATH/TO/shared/datasets")
    ner, ner_line = load_ner("auto")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"names by NER: {ner_line}\n")

    spec = gsm8k_build_spec(g)
    with tempfile.TemporaryDirectory() as tmp:
        total, built = timed(lambda: build(spec, Path("."), Path(tmp) / "out"), args.repeat)
    rows = load_source(spec.sources[0], Path(".")).rows
    n = len(rows)
    t_all, _ = timed(lambda: list(Scanner(KINDS, ner=ner).scan_rows(rows)), args.repeat)
    print(f"## Speed: GSM8K train, {n:,} rows, median of {args.repeat}\n")
    print("| what | seconds | rows/s |\n|---|---|---|")
    print(f"| whole build (read, dedupe, decontamination, PII, split, write) | {total:.2f} | {built.rows_read / total:,.0f} |")
    print(f"| PII scan, all {len(KINDS)} kinds | {t_all:.2f} | {n / t_all:,.0f} |")
    for kind in KINDS:
        t, _ = timed(lambda kind=kind: list(Scanner({kind}, ner=ner).scan_rows(rows)), args.repeat)
        print(f"| PII scan, {kind} only | {t:.2f} | {n / t:,.0f} |")

    print("\n## Precision: real rows altered by the scan (redact)\n")
    print("| file | rows | rows altered | share | findings |\n|---|---|---|---|---|")
    for name, file_rows in real_files(args.shared).items():
        found = Counter()
        altered = 0
        for _, f in Scanner(KINDS, ner=ner).scan_rows(file_rows):
            found.update(f.counts)
            altered += bool(f)
        kinds = ", ".join(f"{k} {v}" for k, v in found.most_common()) or "none"
        print(f"| {name} | {len(file_rows):,} | {altered} | {altered / len(file_rows):.1%} | {kinds} |")

    print("\n## Recall: values planted into real rows (tests/pii_planted.py)\n")
    planted, truth = plant(args.shared)
    hit, total_k = Counter(), Counter()
    for (red, _), (kind, secrets) in zip(Scanner(KINDS, ner=ner).scan_rows(planted), truth):
        total_k[kind] += 1
        hit[kind] += not any(s in red["input"] for s in secrets)
    print("| kind | planted | removed | recall |\n|---|---|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {total_k[kind]} | {hit[kind]} | {hit[kind] / total_k[kind]:.0%} |")
    print(f"| all | {sum(total_k.values())} | {sum(hit.values())} | {sum(hit.values()) / sum(total_k.values()):.1%} |")
    clean = clean_rows(args.shared)
    altered = sum(bool(f) for _, f in Scanner(KINDS, ner=ner).scan_rows(clean))
    print(f"\nClean rows beside them (real rows and tricky non-identifiers): {altered} of {len(clean)} altered.")
    print("\nVersions: " + ", ".join(f"{p} {metadata.version(p)}" for p in ("datasketch", "pydantic")))


if __name__ == "__main__":
    main()
