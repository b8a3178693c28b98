"""The local files a recipe names: made absolute once, at load (so a run's copy of its recipe works from anywhere and
no stage needs to know where the recipe was), and checked for existence before anything runs."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_prep.spec import resolve_path

if TYPE_CHECKING:
    from .recipe import Recipe


LOCATION_PATH_KEYS = ("path", "include_ids", "exclude_ids", "prompt_file")  # a location's keys that name local files


def _absolute(base: Path, value: Any) -> Any:
    return str(resolve_path(base, value).resolve()) if isinstance(value, str) and value and "://" not in value else value


def _absolute_location(loc: Any, base: Path) -> None:
    """A location's file keys made absolute, in place. Its `local:` alternative is left alone: those paths are relative
    to `--data-dir` (finetune/laptop.py resolves them), not to the recipe."""
    if not isinstance(loc, dict):
        return
    for key in LOCATION_PATH_KEYS:
        if key in loc:
            loc[key] = _absolute(base, loc[key])
    for key, v in (loc.get("options") or {}).items() if isinstance(loc.get("options"), dict) else ():
        if key.endswith("_file"):
            loc["options"][key] = _absolute(base, v)
    if isinstance(loc.get("fewshot"), dict):
        _absolute_location(loc["fewshot"], base)


def absolute_paths(data: dict[str, Any], recipe_dir: Path) -> dict[str, Any]:
    """Every local file a recipe names, made absolute against the recipe's folder: paths are resolved once, at load, so
    the run's copy (RUN/recipe.yaml) reruns from any directory and no stage needs to know where the recipe was."""
    def items(*keys: str) -> list[Any]:
        node: Any = data
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node if isinstance(node, list) else []

    for loc in [*items("data", "sources"), *items("data", "quality", "decontaminate", "against"), *items("eval", "tasks"),
                *items("cpt", "sources"), *items("samples", "tasks")]:
        _absolute_location(loc, recipe_dir)
    vocab = (data.get("cpt") or {}).get("vocabulary") if isinstance(data.get("cpt"), dict) else None
    if isinstance(vocab, dict) and "tokens_file" in vocab:
        vocab["tokens_file"] = _absolute(recipe_dir, vocab["tokens_file"])
    samples = data.get("samples")
    if isinstance(samples, dict):
        for key in ("data", "eval"):
            if key in samples:
                samples[key] = _absolute(recipe_dir, samples[key])
        if isinstance(samples.get("cpt"), list):
            samples["cpt"] = [_absolute(recipe_dir, p) for p in samples["cpt"]]
    return data


def missing_files(recipe: Recipe, recipe_dir: Path) -> list[str]:
    """Local files the recipe names that are not there, as `key.path: file` (so `validate` says so, not the run)."""
    out = []

    def check(where: str, value: str | None) -> None:
        if not value:
            return
        p = resolve_path(recipe_dir, value)
        if p.exists():
            return

        near = difflib.get_close_matches(p.name, [q.name for q in p.parent.iterdir()] if p.parent.is_dir() else [], n=1)
        shown = p.relative_to(recipe_dir.resolve()) if p.is_relative_to(recipe_dir.resolve()) else p  # as the recipe spells it
        out.append(f"{where}: {shown}" + (f" (did you mean '{near[0]}'?)" if near else ""))

    cpt_on = "cpt" in recipe.stages and recipe.cpt is not None
    groups = [("data.sources", recipe.data.sources), ("data.quality.decontaminate.against", recipe.data.quality.decontaminate.against),
              ("eval.tasks", recipe.eval.tasks), ("cpt.sources", recipe.cpt.sources if cpt_on else [])]
    for name, items in groups:
        for i, loc in enumerate(items):
            for key in LOCATION_PATH_KEYS:
                check(f"{name}.{i}.{key}", getattr(loc, key, None))
            for key, v in (getattr(loc, "options", None) or {}).items():
                if key.endswith("_file") and isinstance(v, str):
                    check(f"{name}.{i}.options.{key}", v)
            few = getattr(loc, "fewshot", None)
            if few is not None:
                for key in ("path", "include_ids", "exclude_ids"):
                    check(f"{name}.{i}.fewshot.{key}", getattr(few, key))
    if cpt_on and recipe.cpt.vocabulary is not None:
        check("cpt.vocabulary.tokens_file", recipe.cpt.vocabulary.tokens_file)
    return out
