"""Stage 5, publish: gates, the card, then the artifacts to `file://DIR` or `hf://ORG/NAME`.

The published repository has a Hub repository's layout: the adapter and tokenizer at the root, the merged model
under merged/, the card as README.md, plus run.lock.json, eval_report.json and merge_check.json.

- Gates first (exit 3, nothing written anywhere): a tuned model that regresses past `publish.gate.max_regression`,
  licences in conflict, rows the PII scan flagged and kept. `--force` overrides them. A merged model whose merge
  check failed is never published, forced or not.
- `file://DIR` (on-premise, air-gapped): each publish is a new numbered revision `DIR/0001/`, `DIR/0002/` ... kept
  side by side, written to a staging folder and renamed; `DIR/refs/main` names the latest (as in the Hub's cache).
- `hf://ORG/NAME`: one commit (`upload_folder`) with everything, retried with exponential backoff on server and
  network errors; a failed push leaves the run's files as they were and the next `finetune publish` completes it.
  Only rank 0 pushes. The token comes from HF_TOKEN and is never logged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from data_prep.provenance import all_sources
from data_prep.provenance import read as read_provenance

from . import distributed
from .artifacts import EvalReport, MergeCheck
from .card import licence_conflicts
from .errors import PublishRefused, StageFailed, UserError
from .recipe import Recipe
from .run import RunDir, read_json, sha256_file

log = logging.getLogger("finetune")


class PushFailed(StageFailed):
    """The Hub kept failing after every retry; the run's files are intact and publishing can simply be rerun."""


def lay_out(dest: Path, what: list[str], adapter: Path, merged: Path, extras: list[tuple[Path, str]], base_name: str | None = None) -> list[str]:
    """A Hub repository's layout in `dest`: the adapter's files at the root, the merged model under merged/, and the
    `extras` (source, name) that exist; returns its files (relative). `base_name` replaces the adapter's
    `base_model_name_or_path` (a local path on this machine) in the published copy."""
    dest.mkdir(parents=True, exist_ok=True)
    if "adapter" in what:
        for f in adapter.iterdir():
            if f.is_file():
                shutil.copy2(f, dest / f.name)
        cfg = dest / "adapter_config.json"
        if base_name and cfg.is_file():
            data = json.loads(cfg.read_text(encoding="utf-8"))
            data["base_model_name_or_path"] = base_name
            cfg.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if "merged" in what:
        shutil.copytree(merged, dest / "merged")
    for src, name in extras:
        if src.exists():
            shutil.copy2(src, dest / name)
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


def assemble(recipe: Recipe, run: RunDir, what: list[str], dest: Path, base_name: str | None = None) -> list[str]:
    """Lay out a run's repository in `dest`; returns its files (relative)."""
    if "merged" in what and not run.merged.exists():
        raise UserError("publish.what includes `merged` but RUN/merged/ does not exist (merge.enabled: false?)")
    files = lay_out(dest, what, run.final_adapter(recipe.stages), run.merged, [(run.card / "README.md", "README.md"), (run.lock, "run.lock.json"),
                                                           (run.eval / "report.json", "eval_report.json"), (run.merge_check, "merge_check.json")],
                    base_name)
    if "gguf" in what:
        files += lay_out_gguf(run, dest)
    return files


def lay_out_gguf(run: RunDir, dest: Path) -> list[str]:
    """gguf/: each verified export, its Modelfile, `Modelfile` for the first, and export_check.json."""
    from .export import published_exports

    exports = published_exports(run)
    if not exports:
        raise UserError(f"publish.what includes `gguf` but {run.root / 'export'} has no GGUF that passed its check; run `finetune export {run.root}`")
    out = dest / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for path, check in exports:
        shutil.copy2(path, out / path.name)
        names.append(f"gguf/{path.name}")
        own = path.with_name(f"{path.stem}.Modelfile")
        if own.is_file():
            shutil.copy2(own, out / own.name)
            names.append(f"gguf/{own.name}")
    first = exports[0][0].with_name(f"{exports[0][0].stem}.Modelfile")
    if first.is_file():
        shutil.copy2(first, out / "Modelfile")
        names.append("gguf/Modelfile")
    (out / "export_check.json").write_text(json.dumps({"files": {p.name: c for p, c in exports}}, indent=2) + "\n")
    return names + ["gguf/export_check.json"]


# --------------------------------------------------------------------------------------------------
# Gates


def _published_columns(report: dict[str, Any], what: tuple[str, ...] | list[str]):
    """(task, column, its delta-CI key) for each artifact that is published: the adapter is judged by the `tuned`
    column, the merged model by its own `merged` column (tuned where it was not scored separately)."""
    for t in report.get("tasks", []):
        if not t.get("base"):
            continue
        if "adapter" in what and t.get("tuned"):
            yield t, "tuned", "delta_ci95"
        if "merged" in what:
            if t.get("merged"):
                yield t, "merged", "merged_delta_ci95"
            elif t.get("tuned") and "adapter" not in what:
                yield t, "tuned", "delta_ci95"


def regressions(report: dict[str, Any], max_regression: float, what: tuple[str, ...] | list[str] = ("adapter", "merged")) -> list[str]:
    """Tasks where the tuned model is worse than the base by more than `max_regression`, beyond doubt: the whole 95%
    interval of the paired delta must lie past the threshold (one item of 20 wrong is noise, not a regression). The
    threshold is an absolute drop for scores where higher is better (accuracy 0.62 -> 0.58 is 0.04) and a relative rise
    for perplexity-like metrics (10.0 -> 10.5 is 0.05), so one number reads the same on both. A report without an
    interval falls back to the point estimate."""
    out = []
    for t, who, delta_ci in _published_columns(report, what):
        base, tuned = float(t["base"]["score"]), float(t[who]["score"])
        higher = t.get("higher_is_better", True)
        ci = t.get(delta_ci) or [tuned - base, tuned - base]
        scale = 1.0 if higher else max(abs(base), 1e-12)
        # the smallest worsening the interval allows: for higher-is-better the delta's upper end, negated
        surely_worse = (-float(ci[1]) if higher else float(ci[0])) / scale
        if surely_worse > max_regression:
            worse = (base - tuned) if higher else (tuned - base) / scale
            who_name = "merged model" if who == "merged" else "adapter"
            out.append(f"{t['name']} ({who_name}): {t['metric']} {base:.4g} -> {tuned:.4g} (worse by {worse:.3g}, and by at least "
                       f"{surely_worse:.3g} > {max_regression} at 95% confidence; delta CI [{ci[0]:.3g}, {ci[1]:.3g}], n={t.get('n')})")
    return out


def gate_failures(recipe: Recipe, run: RunDir) -> list[str]:
    g = recipe.publish.gate
    out = []
    if g.max_regression is not None:
        out += [f"regression on {r}" for r in regressions(EvalReport.read_checked(run.eval / "report.json"), g.max_regression, recipe.publish.what)]
    prov = read_provenance(run.data / "provenance.json")
    if g.licence_conflicts:
        out += [f"licence: {c}" for c in licence_conflicts(recipe, all_sources(prov))]
    pii = prov.get("quality", {}).get("pii") or {}
    if g.pii_flagged and pii.get("action") == "flag" and pii.get("rows"):
        out.append(f"personal data: the PII scan flagged {pii['rows']} training rows and kept them as they are "
                   "(data.quality.pii.action: flag); redact or drop them")
    return out


def check_gates(recipe: Recipe, run: RunDir, force: bool) -> list[str]:
    """Refuse (exit 3) on a failed gate unless forced; a merged model that failed its check is refused always."""
    if "merged" in recipe.publish.what:
        check = MergeCheck.read_if_present(run.merge_check)
        if check is not None and not check.passed:
            raise PublishRefused(f"{run.merge_check}: the merged model failed its check against the adapter; it is never published")
    failed = gate_failures(recipe, run)
    if failed and not force:
        raise PublishRefused("publish refused:\n- " + "\n- ".join(failed) + f"\nInspect, then `finetune publish {run.root} --force` to publish anyway")
    for f in failed:
        log.warning("publish: gate overridden by --force: %s", f)
    return failed


# --------------------------------------------------------------------------------------------------
# Targets


def publish(recipe: Recipe, run: RunDir, base_model_name: str, smoke: bool, force: bool = False) -> dict[str, Any]:
    overridden = check_gates(recipe, run, force)
    if not (run.card / "README.md").is_file():
        raise StageFailed(f"{run.card / 'README.md'}: missing; the card stage writes it (`finetune card RECIPE`)")
    target = recipe.publish.to
    if target is None:
        log.info("publish: no publish.to; the card is %s", run.card / "README.md")
        return {"target": None}
    if distributed.rank() != 0:  # defence in depth: the pipeline runs publish on rank 0 only (alignment-handbook#198)
        return {"target": target, "skipped": f"rank {distributed.rank()}"}
    what = list(recipe.publish.what)

    def write(dest: Path) -> list[str]:
        return assemble(recipe, run, what, dest, base_model_name)

    p = recipe.publish
    out = (publish_file(recipe.name, write, target) if target.startswith("file://") else
           push_hub(recipe.name, write, target.removeprefix("hf://"), run.root, p.private, p.retries, p.backoff_s))
    return {**out, "gates_overridden": len(overridden)}


def latest_revision(root: Path) -> Path | None:
    """The revision `refs/main` names in a file:// repository, if it is there."""
    try:
        rev = (root / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return root / rev if rev and (root / rev).is_dir() else None


def publish_file(name: str, write, target: str) -> dict[str, Any]:
    """A new numbered revision of the file:// repository; `write(folder)` writes the files and lists them."""
    root = Path(target.removeprefix("file://")).expanduser()
    from .runlock import waiting

    with waiting(root):  # one writer at a time: concurrent publishes get consecutive revisions, both complete
        numbers = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
        rev = f"{max(numbers, default=0) + 1:04d}"
        staging = root / f".{rev}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            files = write(staging)
            require_weights(files, target)
            (staging / ".revision.json").write_text(json.dumps({
                "revision": rev, "run": name, "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {f: sha256_file(staging / f) for f in files}}, indent=2) + "\n", encoding="utf-8")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.replace(staging, root / rev)
        (root / "refs").mkdir(exist_ok=True)
        tmp = root / "refs" / ".main.tmp"
        tmp.write_text(rev + "\n", encoding="utf-8")
        os.replace(tmp, root / "refs" / "main")
    log.info("publish: revision %s, %d files, in %s", rev, len(files), root)
    return {"target": target, "revision": rev, "files": files}


WEIGHTS = (".safetensors",)


def require_weights(files: list[str], target: str) -> None:
    """A revision without model weights must never become `main` (or a Hub commit)."""
    if not any(f.endswith(WEIGHTS) for f in files):
        raise StageFailed(f"publish to {target}: nothing to publish holds weights ({', '.join(files[:6])}); refused, "
                          "so the target's main revision still names the last one with weights")


def _retryable(e: Exception) -> bool:
    """Server errors, rate limits, timeouts and dropped connections are worth another try; a 401/403/404 is not."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return isinstance(e, (OSError, TimeoutError)) or "Timeout" in type(e).__name__ or "Connect" in type(e).__name__


def push_hub(name: str, write, repo_id: str, local: Path, private: bool, retries: int, backoff_s: float) -> dict[str, Any]:
    """One commit of what `write(folder)` writes, staged under `local` (the run directory)."""
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UserError("publish.to is hf://...: set HF_TOKEN in the environment (tokens are never read from recipes)")
    staging = local / ".publish"
    shutil.rmtree(staging, ignore_errors=True)
    files = write(staging)
    require_weights(files, f"hf://{repo_id}")
    api = HfApi(token=token, endpoint=os.environ.get("HF_ENDPOINT") or None)
    for attempt in range(1, retries + 2):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(staging), repo_id=repo_id, commit_message=f"finetune: {name}")
            break
        except Exception as e:  # noqa: BLE001  (huggingface_hub raises HTTP, network and its own errors)
            if not _retryable(e) or attempt > retries:
                raise PushFailed(f"push to hf://{repo_id} failed after {attempt} attempt(s): {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}. "
                                 f"The run's files are intact; run `finetune publish {local}` again to complete it") from None
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("publish: attempt %d of %d failed (%s); retrying in %.1f s", attempt, retries + 1, type(e).__name__, delay)
            time.sleep(delay)
    shutil.rmtree(staging, ignore_errors=True)
    log.info("publish: %d files to hf://%s in one commit", len(files), repo_id)
    return {"target": f"hf://{repo_id}", "files": files, "commit": getattr(info, "oid", None), "attempts": attempt}


def publish_combination(folder: Path, to: str, what: list[str], private: bool, retries: int = 5, backoff_s: float = 2.0) -> dict[str, Any]:
    """Publish the output of `finetune merge --adapters ...` (adapter/, merge_check.json, merged/ with --fold, and an
    eval/report.json if it was evaluated there) with a card of its own."""
    from .card import combination_card

    check = read_json(folder / "merge_check.json", {})
    if check.get("kind") != "adapter_combination":
        raise UserError(f"{folder}: neither a run directory (recipe.yaml) nor the output of `finetune merge --adapters`")
    if "merged" in what and not (folder / "merged").is_dir():
        raise UserError(f"{folder}: no merged/ (combine with --fold to publish a merged model)")
    if "gguf" in what:
        raise UserError(f"{folder}: --what gguf publishes a run's verified GGUF exports; a combination folder has none")
    if distributed.rank() != 0:
        return {"target": to, "skipped": "not rank 0"}
    card = combination_card(folder, check, to)
    from .card import shown_base

    def write(dest: Path) -> list[str]:
        lay_out(dest, what, folder / "adapter", folder / "merged",
                [(folder / "merge_check.json", "merge_check.json"), (folder / "eval" / "report.json", "eval_report.json")],
                shown_base(check["base"]))
        (dest / "README.md").write_text(card, encoding="utf-8")  # last: replaces the stub card peft saves with an adapter
        return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())

    name = folder.resolve().name
    if to.startswith("file://"):
        return publish_file(name, write, to)
    return push_hub(name, write, to.removeprefix("hf://"), folder, private, retries, backoff_s)
