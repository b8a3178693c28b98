"""The Hugging Face Hub, reachable or not: one message instead of minutes of retries.

Offline, huggingface_hub and datasets retry each request with backoff and print a warning per try: 10 to 22 lines
over 24 to 53 s before the real error. Before anything is loaded, finetune lists what the run needs from the Hub
(the base model, Hub data sources, eval tasks, decontamination sets) and, unless HF_HUB_OFFLINE is set, tries one TCP
connection to the endpoint. Unreachable and everything cached: it says so once and works offline (HF_HUB_OFFLINE=1).
Unreachable and something missing: one message naming what is missing and how to run offline. Importing this module
must not import torch.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from .errors import StageFailed

log = logging.getLogger("finetune")


class HubUnreachable(StageFailed):
    """The Hub cannot be reached and the run needs something that is not in the local cache (exit 1)."""


def hub_refs(recipe) -> list[tuple[str, str, str | None]]:
    """(kind, id, revision) of everything a recipe reads from the Hub: `model` or `dataset`."""
    out: list[tuple[str, str, str | None]] = []
    b = recipe.base_model
    if is_hub_id(b.id) and not Path(b.id).expanduser().exists():
        out.append(("model", b.id, b.revision))
    locations = [*recipe.data.sources, *recipe.data.quality.decontaminate.against, *recipe.eval.tasks,
                 *[t.fewshot for t in recipe.eval.tasks if t.fewshot is not None],
                 *(recipe.cpt.sources if recipe.cpt is not None and "cpt" in recipe.stages else [])]
    out += [("dataset", loc.hub, loc.revision) for loc in locations if getattr(loc, "hub", None)]
    return list(dict.fromkeys(out))


def is_hub_id(name: str) -> bool:
    """`org/name` or `name`, as the Hub spells repositories; a path (absolute, ./, ~, deeper) is a local folder."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def reachable(url: str, timeout: float = 5.0) -> bool:
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def cached(kind: str, repo: str, revision: str | None) -> bool:
    """Whether the local caches hold `repo` (a model's config.json; a dataset's files, in the Hub or datasets cache)."""
    if kind == "model":
        from huggingface_hub import try_to_load_from_cache

        try:
            got = try_to_load_from_cache(repo, "config.json", revision=revision if revision not in (None, "main") else None)
        except ValueError:  # not a valid repository name: huggingface_hub cannot have it either
            return False
        return isinstance(got, str)
    from huggingface_hub import constants

    hub_cache = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"
    ds_home = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return hub_cache.is_dir() or (ds_home / repo.replace("/", "___")).is_dir()


def go_offline() -> None:
    """HF_HUB_OFFLINE for this process, also where the libraries already read it at import."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"

    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as c

        c.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as dc

        dc.HF_HUB_OFFLINE = True


def check_hub(recipe, fail: bool = True) -> None:
    """Say once, before loading anything, that the Hub is unreachable: work from the cache, or stop (`fail`) naming
    what is missing. With `fail=False` (validate) it only warns."""
    refs = hub_refs(recipe)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not refs or (not offline and reachable(endpoint())):
        return
    missing = [f"{kind} {repo}" + (f"@{rev}" if rev and rev != "main" else "") for kind, repo, rev in refs if not cached(kind, repo, rev)]
    if not missing:
        if not offline:
            log.warning("the Hugging Face Hub (%s) cannot be reached; working from the local cache (HF_HUB_OFFLINE=1)", endpoint())
            go_offline()
        return
    why = "HF_HUB_OFFLINE is set" if offline else f"the Hugging Face Hub ({endpoint()}) cannot be reached"
    message = (f"{why}, and the run needs what is not in the local cache: {', '.join(missing[:5])}"
               f"{' and more' if len(missing) > 5 else ''}. Download it where there is a network (`hf download ID`, or run once "
               "online), point the recipe at local files (each Hub source in the shipped recipes has a local alternative in a "
               "comment), or try `--smoke`, which runs offline")
    if fail:
        raise HubUnreachable(message)
    log.warning(message)
