"""Experiment trackers through transformers' own integrations, configured so a run is never lost or left open.

RUN/logs/metrics.jsonl is written whatever is chosen (train.py). On top of it, `tracking.report_to`:
- wandb: online when WANDB_API_KEY is set, offline (files under RUN/logs/wandb, `wandb sync` later) otherwise, so a
  machine without a key never fails at step 0; `finish()` always closes the run, which the Trainer never does
  (an offline run stays an 8-byte file until it is called);
- tensorboard: event files under RUN/logs/tensorboard;
- mlflow: the tracking server in MLFLOW_TRACKING_URI, or a file store under RUN/logs/mlruns.
Keys come from the environment only; what the Trainer sends as config is TrainingArguments.to_dict(), which masks
`*_token` fields, plus the model config, neither of which holds a secret.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("finetune")

_ours: dict[str, str] = {}  # variables we set (not the user): ours to change for the next run in the same process


def _default(name: str, value: str) -> None:
    if name not in os.environ or _ours.get(name) == os.environ[name]:
        os.environ[name] = _ours[name] = value


def configure(report_to: list[str], project: str, logs: Path, stage: str) -> list[str]:
    """Set the environment the integrations read; returns `report_to` for the TrainingArguments."""
    if "wandb" in report_to:
        _default("WANDB_PROJECT", project)
        _default("WANDB_DIR", str(logs))
        _default("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
        if os.environ["WANDB_MODE"] == "offline":
            log.info("wandb: offline (no WANDB_API_KEY, or WANDB_MODE=offline), files in %s; upload later with `wandb sync`",
                     Path(os.environ["WANDB_DIR"]) / "wandb")
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logs / "tensorboard" / stage)
    if "mlflow" in report_to:
        _default("MLFLOW_TRACKING_URI", (logs / "mlruns").resolve().as_uri())
        if _ours.get("MLFLOW_TRACKING_URI") == os.environ["MLFLOW_TRACKING_URI"]:
            # mlflow 3 refuses its file store unless asked; it is the one backend the client alone (mlflow-skinny)
            # can write, with no server or database: fine for a run-local record (`mlflow ui --backend-store-uri` reads it).
            _default("MLFLOW_ALLOW_FILE_STORE", "true")
        _default("MLFLOW_EXPERIMENT_NAME", project)
    return list(report_to)


def finish(report_to: list[str], ok: bool) -> None:
    """Close what the Trainer leaves open: the wandb run (always), an mlflow run after a failure or a preemption."""
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=0 if ok else 1)
    if "mlflow" in report_to:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run(status="FINISHED" if ok else "KILLED")
