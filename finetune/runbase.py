"""The base model as a run trains it: with the run's extended vocabulary (vocab.py: RUN/data/tokenizer/) and its
expanded blocks (expand.py: `training.method: block_expansion`). Every load of the base that an adapter of the run is
applied to goes through `load` (training, eval's tuned column, merge, chat, serve, data pairs), so the adapter always
meets the shapes it was trained on; the original base (eval's base column) is loaded plainly.

Both changes are deterministic functions of the base and of files in the run, so nothing but the tokenizer and the
adapter is saved: a 7B base is not copied into every run.
"""

from __future__ import annotations

import logging
from typing import Any

from .recipe import Recipe
from .run import RunDir

log = logging.getLogger("finetune")

IDENTITY_ATOL = 1e-5  # expanded vs original logits: the copies add exact zeros, so any real gap is a defect, not rounding


def extended(run: RunDir) -> bool:
    from .vocab import NEW_TOKENS

    return (run.tokenizer / NEW_TOKENS).is_file()


def tokenizer(recipe: Recipe, run: RunDir):
    """The run's tokenizer: the extended one when prepare extended the vocabulary, else the base's."""
    from .models import load_tokenizer

    return load_tokenizer(str(run.tokenizer) if extended(run) else recipe.base_model.id, recipe)


def reshape(model, recipe: Recipe, run: RunDir, probe=None) -> dict[str, Any]:
    """Apply the run's vocabulary and block expansion to a loaded base, in place. With `probe` (input ids, attention
    mask), the expansion is checked: the expanded model's logits must equal the original's, or the run stops here."""
    from .errors import StageFailed

    info: dict[str, Any] = {}
    if extended(run):
        from . import vocab

        entries = vocab.new_tokens(run.tokenizer)
        info["vocabulary"] = vocab.fit(model, entries, max(e["id"] for e in entries) + 1)  # new ids follow every old one
    if recipe.training.method == "block_expansion":
        from .expand import expand_blocks
        from .merge import logits, max_diff

        before = logits(model, *probe) if probe is not None else None
        layers = len(model.model.layers)
        new = expand_blocks(model, recipe.expand.blocks)
        info["expansion"] = {"layers": {"before": layers, "after": len(model.model.layers)}, "new_blocks": new}
        if probe is not None:
            diff = max_diff(logits(model, *probe), before, probe[1])
            info["expansion"]["identity_max_abs_diff"] = diff
            if not diff <= IDENTITY_ATOL:
                raise StageFailed(f"block expansion: the expanded model's logits differ from the original's by {diff:.3g} (> {IDENTITY_ATOL}) "
                                  "before any training, so the new blocks are not identities; refusing to train")
            log.info("block expansion: %d -> %d layers, new blocks %s; logits equal the original's (max diff %.1e)", layers,
                     len(model.model.layers), new, diff)
    return info


def load(recipe: Recipe, run: RunDir, quantized: bool, dtype=None, probe=None):
    """(model, what reshape did): the recipe's base loaded as `models.load_model` does, then reshaped for this run."""
    from .models import load_model

    model = load_model(recipe.base_model.id, recipe, quantized=quantized, dtype=dtype)
    return model, reshape(model, recipe, run, probe)


def new_block_names(model, new: list[int]) -> list[str]:
    """Module paths of the new blocks (peft `modules_to_save`), as `named_modules` spells them."""
    layers = model.model.layers
    wanted = {id(layers[i]): i for i in new}
    return [name for name, m in model.named_modules() if id(m) in wanted]
