"""Stage 5, publish: the card, then the artifacts to `file://DIR` or `hf://ORG/NAME`.

The published folder has a Hub repository's layout: the adapter and tokenizer at the root, the merged model under
merged/, the card as README.md, plus run.lock.json, eval_report.json and merge_check.json. A `file://` target is
written to a staging folder and renamed into place, so a failed publish leaves the previous copy as it was.
The Hub token comes from HF_TOKEN in the environment only.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .card import write_card
from .errors import UserError
from .recipe import Recipe
from .run import RunDir

log = logging.getLogger("finetune")


def assemble(recipe: Recipe, run: RunDir, what: list[str], dest: Path) -> list[str]:
    """Lay out the repository in `dest`; returns its files (relative)."""
    dest.mkdir(parents=True, exist_ok=True)
    if "adapter" in what:
        for f in run.adapter.iterdir():
            if f.is_file():
                shutil.copy2(f, dest / f.name)
    if "merged" in what:
        if not run.merged.exists():
            raise UserError("publish.what includes `merged` but RUN/merged/ does not exist (merge.enabled: false?)")
        shutil.copytree(run.merged, dest / "merged")
    for src, name in ((run.card / "README.md", "README.md"), (run.lock, "run.lock.json"),
                      (run.eval / "report.json", "eval_report.json"), (run.merge_check, "merge_check.json")):
        if src.exists():
            shutil.copy2(src, dest / name)
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


def publish(recipe: Recipe, run: RunDir, base_model_name: str, smoke: bool) -> dict[str, Any]:
    write_card(recipe, run, base_model_name, smoke)
    target = recipe.publish.to
    if target is None:
        log.info("publish: no publish.to; card written to %s", run.card / "README.md")
        return {"target": None}
    what = list(recipe.publish.what)
    if target.startswith("file://"):
        dest = Path(target.removeprefix("file://")).expanduser()
        staging = dest.with_name(f".{dest.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        files = assemble(recipe, run, what, staging)
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
        log.info("publish: %d files to %s", len(files), dest)
        return {"target": target, "files": files}
    return _push_hub(recipe, run, what, target.removeprefix("hf://"))


def _push_hub(recipe: Recipe, run: RunDir, what: list[str], repo_id: str) -> dict[str, Any]:
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UserError("publish.to is hf://...: set HF_TOKEN in the environment (tokens are never read from recipes)")
    staging = run.root / ".publish"
    shutil.rmtree(staging, ignore_errors=True)
    files = assemble(recipe, run, what, staging)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=recipe.publish.private, exist_ok=True)
    info = api.upload_folder(folder_path=str(staging), repo_id=repo_id, commit_message=f"finetune: {recipe.name}")
    shutil.rmtree(staging, ignore_errors=True)
    log.info("publish: %d files to hf://%s", len(files), repo_id)
    return {"target": f"hf://{repo_id}", "files": files, "commit": getattr(info, "oid", None)}
