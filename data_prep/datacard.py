"""Documentation of a built instruction set: provenance.json (machine-readable), datacard.md (for people) and
lengths.png (length histogram). Counts and hashes only: no row text, so the card is safe to publish even when
the data is not."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .licences import is_non_commercial
from .provenance import check


def lengths(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "values": []}
    v = sorted(values)

    def pct(p: float) -> int:
        return v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))]

    return {"n": len(v), "total": sum(v), "mean": round(sum(v) / len(v), 1), "min": v[0], "median": pct(0.5),
            "p95": pct(0.95), "max": v[-1], "values": values}


def source_name(s: dict[str, Any]) -> str:
    if s.get("hub"):
        return f"hf://{s['hub']}" + (f"@{s['revision']}" if s.get("revision") else "")
    return str(s.get("path"))


def provenance(name: str, collected, stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "sources": collected.sources,
        "quality": collected.quality,
        "rejected": len(collected.rejects),
        "splits": {k: {kk: vv for kk, vv in stats[k].items() if kk != "values"} for k in ("train", "val")},
        "length_unit": stats["unit"],
        "tokenizer": stats.get("tokenizer"),
        "max_length": stats.get("max_length"),
        "seconds": round(collected.seconds, 2),
    }


def histogram(path: Path, stats: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    data = [stats[k]["values"] for k in ("train", "val") if stats[k]["n"]]
    labels = [f"{k} (n={stats[k]['n']})" for k in ("train", "val") if stats[k]["n"]]
    if data:
        ax.hist(data, bins=40, stacked=True, label=labels)
        ax.legend()
    if stats.get("max_length"):
        ax.axvline(stats["max_length"], color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(f"length ({stats['unit']})")
    ax.set_ylabel("rows")
    ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def licence_warnings(sources: list[dict[str, Any]]) -> list[str]:
    """What the data card says about the sources' licences (data_prep/licences.py decides what each allows)."""
    nc = [source_name(s) for s in sources if is_non_commercial(s.get("license"))]
    unknown = [source_name(s) for s in sources if not s.get("license")]
    out = []
    if nc:
        out.append(f"**Warning: non-commercial data** ({', '.join(nc)}): a model trained on it inherits the restriction.")
    if unknown:
        out.append(f"Licence unknown for {', '.join(unknown)}: set `license:` on the source.")
    return out


def datacard(name: str, prov: dict[str, Any]) -> str:
    unit = prov["length_unit"]
    lines = [f"# Data card: {name}", ""]
    lines += ["## Sources", "",
              "| source | licence | sha256 | read | kept | not selected | invalid | overlong | duplicate | near duplicate | contaminated | PII rows |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in prov["sources"]:
        r = s["removed"]
        digest = (s.get("sha256") or s.get("fingerprint") or "")[:12]
        lines.append(f"| {source_name(s)} | {s.get('license') or 'unknown'} | `{digest}` | {s['rows_read']} | {s['rows_kept']} | {s['not_selected']} | "
                     f"{r['invalid']} | {r['overlong']} | {r['exact_duplicate']} | {r['near_duplicate']} | {r['contaminated']} | {s.get('pii_rows', 0)} |")
    for warning in licence_warnings(prov["sources"]):
        lines += ["", f"> {warning}"]
    lines += ["", "## Splits", "", f"Split by content hash (stable across runs and machines). Lengths in {unit}"
              + (f" of `{prov['tokenizer']}`" if prov.get("tokenizer") else "") + ".", "",
              "| split | rows | total | mean | min | median | p95 | max |", "|---|---|---|---|---|---|---|---|"]
    for k, s in prov["splits"].items():
        if s["n"]:
            lines.append(f"| {k} | {s['n']} | {s['total']} | {s['mean']} | {s['min']} | {s['median']} | {s['p95']} | {s['max']} |")
        else:
            lines.append(f"| {k} | 0 | | | | | | |")
    lines += ["", "![length histogram](lengths.png)", "", "## Quality", ""]
    q = prov["quality"]
    near = q.get("near")
    lines.append(f"- Deduplication: {q['dedupe']}" + (f" (MinHash LSH, {near['ngram']}-word shingles, Jaccard ≥ {near['threshold']}, "
                                                     f"{near['num_perm']} permutations)" if near else ""))
    d = q.get("decontamination")
    if d:
        sets = ", ".join(f"{k}: {v}" for k, v in d["by_eval_set"].items()) or "none"
        lines.append(f"- Decontamination: {d['ngram']}-gram overlap with {len(d['eval_sets'])} eval set(s) ({d['eval_items']} items); "
                     f"{d['overlapping_rows']} training rows overlapped ({sets}), action: {d['action']}")
    else:
        lines.append("- Decontamination: off")
    lines += pii_lines(q.get("pii"))
    lines += [f"- Rejected rows: {prov['rejected']} (each with source, row, filter and reason in rejects.jsonl)", ""]
    return "\n".join(lines)


_ACTIONS = {"redact": "each finding replaced by its kind ([NAME], [PHONE] ...)",
            "pseudonymize": "each finding replaced by a numbered placeholder, the same for the same value in every row ([NAME_1]); "
                            "the mapping was held in memory only and never written",
            "flag": "rows with findings kept as they are and listed (hashed) in provenance.json",
            "drop": "rows with findings removed (rejects.jsonl, filter pii)"}


def pii_lines(p: dict[str, Any] | None) -> list[str]:
    """The data card's personal-data lines: what was looked for, by which detectors, what was found and done (counts only)."""
    if not p or p["action"] == "off":
        return ["- Personal data: not scanned (quality.pii.action: off)"]
    found = ", ".join(f"{k} {v}" for k, v in sorted(p["findings"].items())) or "none"
    scanned = f" of {p['rows_scanned']}" if "rows_scanned" in p else ""
    lines = [f"- Personal data ({p['action']}): {p['rows']} rows{scanned} with findings; findings by kind: {found}. "
             f"{_ACTIONS.get(p['action'], '')}. Hashed row ids in provenance.json; no found value is written anywhere."]
    if "detectors" in p:
        lines.append(f"  - Looked for: {', '.join(p['kinds'])} ({p['detectors']} detectors: the HIPAA Safe Harbor identifiers and European ids, "
                     "checksums where an id has one; docs/pii.md in finetune lists them with what each leaves alone).")
        lines.append(f"  - Names: {p['names']}.")
        lines.append("  - rejects.jsonl records each removed row by source, row number, filter and reason; it copies no row text. "
                     + ("Its reasons were scanned and redacted too (quality.pii.rejects: redacted)." if p.get("rejects") == "redacted" else
                        "A reason can quote a value of the row it rejects (a duplicate id, an unknown label): build with "
                        "`--rejects redacted` (quality.pii.rejects) to scan them too."))
    else:  # a build from before the detectors table
        lines.append("  - Names: by title or label only.")
    return lines


def write_docs(out: Path, name: str, collected, stats: dict[str, Any]) -> dict[str, Any]:
    prov = check(provenance(name, collected, stats))
    (out / "provenance.json").write_text(json.dumps(prov, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "datacard.md").write_text(datacard(name, prov), encoding="utf-8")
    histogram(out / "lengths.png", stats, f"{name}: example lengths")
    return prov
