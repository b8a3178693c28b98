"""The run directory: paths, the manifest, fingerprints and resume-by-stage.

A stage is skipped when the manifest says it is done with the same input fingerprint (its recipe sections plus the
hashes of its inputs) and its outputs are still on disk unchanged; otherwise it reruns, and the stages after it
too. Every stage writes its outputs into a staging folder and moves them into place only on success, so a
failed or interrupted stage never leaves a half-written `adapter/` or `data/` behind.

Importing this module must not import torch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import yaml

from data_prep.jsonl import read_jsonl  # noqa: F401  (the one JSONL reader, re-exported for the stages)
from data_prep.sources.readers import sha256_file  # noqa: F401  (the one file hash, re-exported for the stages)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


class RunDir:
    """Paths of one run (README.md, "Run directory") and its manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.recipe = self.root / "recipe.yaml"
        self.lock = self.root / "run.lock.json"
        self.manifest_path = self.root / "manifest.json"
        self.data = self.root / "data"
        self.checkpoints = self.root / "checkpoints"
        self.cpt = self.root / "cpt"  # the continued-pretraining adapter SFT starts from
        self.cpt_checkpoints = self.root / "checkpoints-cpt"
        self.adapter = self.root / "adapter"
        self.merged = self.root / "merged"
        self.merge_check = self.root / "merge_check.json"
        self.eval = self.root / "eval"
        self.card = self.root / "card"
        self.logs = self.root / "logs"
        self.metrics = self.logs / "metrics.jsonl"
        self.base = self.root / "base"  # --smoke: the tiny stand-in model and tokenizer
        self.tokenizer = self.data / "tokenizer"  # an extended vocabulary (vocab.py), when the recipe has cpt.vocabulary

    # ---- the files one stage hands to the next

    def rows(self, stage: str, split: str) -> Path:
        """The tokenised rows a training stage reads: data/{train,val}.jsonl for sft, data/cpt_{train,val}.jsonl for cpt,
        data/pairs_{train,val}.jsonl for the preference stages, data/grpo_{train,val}.jsonl (prompts and answers) for grpo."""
        prefix = {"sft": "", "cpt": "cpt_", "grpo": "grpo_"}.get(stage, "pairs_")
        return self.data / f"{prefix}{split}.jsonl"

    def stage_checkpoints(self, stage: str) -> Path:
        return self.checkpoints if stage == "sft" else self.root / f"checkpoints-{stage}"

    def stage_metrics(self, stage: str) -> Path:
        return self.metrics if stage == "sft" else self.logs / f"metrics-{stage}.jsonl"

    def stage_adapter(self, stage: str) -> Path:
        """What a training stage writes: RUN/cpt/, RUN/adapter/ (sft), RUN/dpo/, RUN/orpo/, RUN/kto/, RUN/grpo/."""
        return self.adapter if stage == "sft" else self.root / stage

    def final_adapter(self, stages: list[str]) -> Path:
        """The adapter the run ships: the last training stage's (merge, eval's tuned column, publish, serve, chat)."""
        return self.stage_adapter(stages[-1])

    # ---- ownership: a run directory is absent, empty, or one finetune made (data_prep/outputs.py)

    def check_ours(self, what: str = "--run-dir") -> None:
        """Refuse (exit 2, nothing written) a folder holding anything but a finetune run."""
        from data_prep.outputs import check_output

        from .errors import UserError

        check_output(self.root, "run", what, legacy=lambda p: isinstance(read_json(p / "manifest.json", None), dict)
                     and "stages" in read_json(p / "manifest.json", {}), error=UserError)

    def load_recipe(self, overrides: list[str] | None = None):
        """The run's resolved recipe (with `$RUN` pointing here, wherever the run now is), and the folder of the original
        recipe, recorded in the manifest. Its paths are absolute (resolved when the run started); a run written before
        that has its relative paths resolved against that folder."""
        from .recipe import load_recipe

        where = self.manifest().get("recipe_dir")
        base = Path(where) if where and Path(where).is_dir() else self.root.resolve()
        recipe, _ = load_recipe(self.recipe, overrides, localise=lambda d: localise(d, self.root), base_dir=base)
        return recipe, base

    def require(self) -> None:
        """A finished or started run of ours, or one clear message (exit 2; cheap: no torch)."""
        from .errors import UserError

        if not self.recipe.exists() or not self.manifest_path.exists():
            raise UserError(f"{self.root}: not a run directory (no recipe.yaml and manifest.json); give the folder `finetune run` made")
        self.check_ours("run directory")

    def claim(self) -> None:
        from data_prep.outputs import mark

        self.check_ours()
        mark(self.root, "run")

    # ---- manifest

    def manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_path, {"stages": {}})

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self.manifest()["stages"].get(stage)

    def update_stage(self, stage: str, **fields: Any) -> None:
        m = self.manifest()
        m["stages"].setdefault(stage, {}).update(fields)
        write_json(self.manifest_path, m)

    def outputs_intact(self, record: dict[str, Any]) -> bool:
        """True when every recorded output still exists with its recorded hash. Size and mtime are checked first so
        an unchanged multi-GB merged model is not re-hashed on every run."""
        for rel, meta in record.get("outputs", {}).items():
            p = self.root / rel
            try:
                st = p.stat()
            except FileNotFoundError:
                return False
            if st.st_size != meta["size"]:
                return False
            if st.st_mtime_ns != meta.get("mtime_ns") and sha256_file(p) != meta["sha256"]:
                return False
        return True

    def describe_outputs(self, paths: list[Path]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in paths:
            files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
            for q in files:
                st = q.stat()
                out[str(q.relative_to(self.root))] = {"sha256": sha256_file(q), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return out

    # ---- atomic outputs

    @contextlib.contextmanager
    def staged(self, name: str) -> Iterator[Path]:
        """Yield an empty staging folder; on success it replaces RUN/<name>, on failure it is removed and the
        previous RUN/<name> (if any) is left exactly as it was."""
        final = self.root / name
        tmp = self.root / f".staging-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = self.root / f".old-{name}"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


def fingerprint(stage: str, sections: dict[str, Any], inputs: dict[str, str]) -> str:
    """Hash of what a stage depends on: its recipe sections and the hashes of the files it reads."""
    return sha256_json({"stage": stage, "sections": sections, "inputs": inputs})


RUN_TOKEN = "$RUN"  # RUN/recipe.yaml names the run's own files ($RUN/base, file://$RUN/hub) so a moved run still works


def swap_prefix(obj: Any, old: str, new: str, sep: str) -> Any:
    """Every string (or file:// URL) of a recipe document that is `old` or starts with `old` + `sep`, with `new` instead."""
    if isinstance(obj, dict):
        return {k: swap_prefix(v, old, new, sep) for k, v in obj.items()}
    if isinstance(obj, list):
        return [swap_prefix(v, old, new, sep) for v in obj]
    if isinstance(obj, str):
        scheme = "file://" if obj.startswith("file://") else ""
        rest = obj[len(scheme):]
        if rest == old or rest.startswith(old + sep):
            return scheme + new + rest[len(old):]
    return obj


def portable(obj: Any, root: Path) -> Any:
    """Absolute paths inside the run folder (the --smoke stand-in, its hub) written as `$RUN/...`."""
    return swap_prefix(obj, str(Path(root).resolve()), RUN_TOKEN, os.sep)


def localise(obj: Any, root: Path) -> Any:
    """The inverse of `portable` for the run's current location."""
    return swap_prefix(obj, RUN_TOKEN, str(Path(root).resolve()), "/")


def write_recipe(run: RunDir, data: dict[str, Any], header: str) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    tmp = run.recipe.with_name(".recipe.yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, run.recipe)
