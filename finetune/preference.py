"""Stages dpo, orpo, kto and grpo: the SFT adapter trained further with trl's preference and reward trainers, under
the same guards as SFT (train.py: 4-bit check, atomic checkpoints, exact resume, SIGTERM, non-finite guard).

The reference model is the SFT policy. The trainable adapter starts as RUN/adapter (the SFT adapter, "default"), and
trl's DPO, KTO and GRPO trainers, given a PeftModel and no `ref_model`, add a frozen copy of it named "ref" and compute
the reference log-probabilities through that copy. (LLaMA-Factory instead disables the adapter, so its reference is the
bare base: LlamaFactory#8974, DPO loss 0 and accuracy 1.0.) `check_reference` refuses to train when the reference is
not a frozen copy of the SFT adapter, and tests/test_preference.py compares the reference log-probabilities with the
SFT model's and the base's.

The data arrives tokenised by prepare (pairs.py): prompt tokens shared by both answers, each answer ending with EOS.
Our trainers take those ids as they are instead of re-tokenising text (trl's `_prepare_dataset`), so every stage
trains on the tokens SFT trained on and inference sends.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .recipe import Recipe
from .run import RunDir, read_jsonl

log = logging.getLogger("finetune")


def stage_settings(recipe: Recipe, stage: str):
    """The TrainingSpec of a stage after SFT: learning rate, length of training and warm-up from its own section, the
    rest (batch, optimizer, checkpoints, seed) from `training:`."""
    own = recipe.grpo if stage == "grpo" else recipe.preference
    update = {"learning_rate": own.learning_rate, "num_train_epochs": own.num_train_epochs, "max_steps": own.max_steps}
    if stage != "grpo":
        update["warmup_steps"] = own.warmup_steps
    return recipe.training.model_copy(update=update)


# --------------------------------------------------------------------------------------------------
# Datasets


def pair_rows(run: RunDir, split: str) -> list[dict[str, Any]]:
    return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in read_jsonl(run.rows("dpo", split))]


def unpaired(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KTO's layout: each pair as two rows, the chosen answer desirable, the rejected one not (the KTO paper's use of
    paired data), interleaved so every batch holds both labels."""
    out = []
    for p in pairs:
        out.append({"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids"], "label": True})
        out.append({"prompt_ids": p["prompt_ids"], "completion_ids": p["rejected_ids"], "label": False})
    return out


def orpo_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ORPO's layout (trl's experimental ORPOTrainer reads prompt/chosen/rejected and tokenises them in `tokenize_row`,
    which we replace): the ids, with the text keys it looks for."""
    return [{"prompt": "", "chosen": "", "rejected": "", **p} for p in pairs]


def stage_datasets(run: RunDir, stage: str):
    from datasets import Dataset

    if stage == "grpo":
        rows = {s: [{"prompt": r["prompt"], "answer": r["answer"]} for r in read_jsonl(run.rows("grpo", s))] for s in ("train", "val")}
    else:
        rows = {s: pair_rows(run, s) for s in ("train", "val")}
        if stage == "kto":
            rows = {s: unpaired(v) for s, v in rows.items()}
        elif stage == "orpo":
            rows = {s: orpo_rows(v) for s, v in rows.items()}
    return Dataset.from_list(rows["train"]), Dataset.from_list(rows["val"]) if rows["val"] else None


# --------------------------------------------------------------------------------------------------
# The reference: a frozen copy of the SFT adapter


def _saved_pairs(model, sft_dir: Path):
    """(live parameter name, adapter name, saved SFT tensor, live parameter or None) for every tensor of RUN/adapter, for
    the trainable adapter ("default") and the reference copy ("ref")."""
    from safetensors.torch import load_file

    from .errors import StageFailed

    saved = load_file(str(sft_dir / "adapter_model.safetensors"))
    if not saved:
        raise StageFailed(f"{sft_dir} holds no adapter weights")
    params = dict(model.named_parameters())
    for key, value in saved.items():
        # saved keys: base_model.model.<path>.lora_A.weight; live: base_model.model.<path>.lora_A.<adapter>.weight
        head, _, leaf = key.rpartition(".")
        for adapter in ("default", "ref"):
            live = params.get(f"{head}.{adapter}.{leaf}")
            if live is None and adapter == "default":
                raise StageFailed(f"{head}.{adapter}.{leaf} of the SFT adapter is not in the model")
            yield f"{head}.{adapter}.{leaf}", adapter, value, live


def load_sft_weights(model, sft_dir: Path) -> None:
    """Put the SFT adapter's saved weights back into the trainable adapter and its reference copy, in each one's dtype.
    trl rounds a QLoRA adapter to bfloat16 when the trainer is built (right for training on a bf16 GPU, train.guarded
    casts it back elsewhere); for a fresh SFT adapter that rounding is harmless, for a trained one it would move the
    starting policy off the SFT model the reference stands for."""
    import torch

    with torch.no_grad():
        for _, _, value, live in _saved_pairs(model, sft_dir):
            if live is not None:
                live.data.copy_(value.to(device=live.device, dtype=live.dtype))


def check_reference(model, sft_dir: Path) -> dict[str, Any]:
    """The reference adapter trl made ("ref") is frozen and equal, tensor for tensor, to RUN/adapter as saved by SFT; the
    trainable adapter ("default") starts equal to it too. Raises otherwise: training against the wrong reference
    gives a loss that looks fine and a model that is not what was asked for."""
    import torch

    from .errors import StageFailed

    if "ref" not in model.peft_config:
        raise StageFailed("the reference adapter is missing: trl would compute the reference with the adapter disabled (the base, "
                          "not the SFT policy)")
    checked = 0
    for name, adapter, value, live in _saved_pairs(model, sft_dir):
        if live is None:
            raise StageFailed(f"reference check: {name} not in the model")
        if live.requires_grad != (adapter == "default"):
            raise StageFailed(f"reference check: {name} is {'not ' if adapter == 'default' else ''}trainable")
        if not torch.equal(live.detach().cpu(), value.to(live.dtype)):
            raise StageFailed(f"reference check: {name} differs from the SFT adapter")
        checked += adapter == "ref"
    return {"reference": "sft_adapter", "tensors_checked": checked}


# --------------------------------------------------------------------------------------------------
# Trainers


def _orpo():
    """trl's ORPO lives in trl.experimental, which warns at import; the stage is ours to keep working (tests cover it)."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental import orpo

    return orpo


def make_config(recipe: Recipe, stage: str, output_dir: Path, has_val: bool, report_to):
    """The stage's trl config: SFT's TrainingArguments (train.training_args, with this stage's learning settings) and its
    own; the pair stages cut sequences at data.max_length as SFT does (prepare already dropped longer pairs)."""
    from .train import training_args

    args = training_args(recipe, output_dir, has_val, stage, report_to)
    if stage != "grpo":
        args["max_length"] = recipe.data.max_length
    if stage == "dpo":
        from trl import DPOConfig

        p = recipe.preference
        return DPOConfig(**args, beta=p.beta, loss_type=[p.loss_type], remove_unused_columns=False)
    if stage == "kto":
        from trl import KTOConfig

        p = recipe.preference
        return KTOConfig(**args, beta=p.beta, desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight,
                         remove_unused_columns=False)
    if stage == "orpo":
        return _orpo().ORPOConfig(**args, beta=recipe.preference.beta, remove_unused_columns=False)
    from trl import GRPOConfig

    g = recipe.grpo
    # trl's batch counts answers, not prompts, and a generation batch must hold whole groups: the recipe's batch is
    # rounded up to a multiple of num_generations (batch 4 with 8 answers per prompt trains on one prompt's 8).
    b = args["per_device_train_batch_size"]
    args["per_device_train_batch_size"] = -(-b // g.num_generations) * g.num_generations
    return GRPOConfig(**args, num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                      temperature=g.temperature, top_p=g.top_p, beta=g.beta, reward_weights=g.reward_weights,
                      remove_unused_columns=False, log_completions=False)


def trainer_class(stage: str):
    """trl's trainer for the stage, taking our tokenised data as it is, with SFT's guards (train.guarded)."""
    from .train import guarded

    if stage == "dpo":
        from trl import DPOTrainer

        class Ours(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # prompt_ids / chosen_ids / rejected_ids from prepare (pairs.py)

    elif stage == "kto":
        from trl import KTOTrainer

        class Ours(KTOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                # KTO's KL term pairs each prompt with another row's answer: trl's rotation by one within each batch
                if not self.calculate_KL:
                    return dataset

                def rotate(batch):
                    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                    return batch

                return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

    elif stage == "orpo":
        class Ours(_orpo().ORPOTrainer):
            def tokenize_row(self, feature, model=None):
                prompt, out = feature["prompt_ids"], {}
                out["prompt_input_ids"], out["prompt_attention_mask"] = prompt, [1] * len(prompt)
                for side in ("chosen", "rejected"):
                    ids = prompt + feature[f"{side}_ids"]
                    out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = ids, [1] * len(ids)
                    out[f"{side}_labels"] = [-100] * len(prompt) + feature[f"{side}_ids"]
                return out

    else:
        from trl import GRPOTrainer

        from .templates import token_ids

        class Ours(GRPOTrainer):
            def _tokenize_prompts(self, prompts):
                # the prompt text as the template rendered it, tokenised as at inference (one BOS), not re-tokenised
                # with the tokenizer's own special-token rule
                return [token_ids(self.processing_class, p) for p in prompts], None, {}

    return guarded(Ours)


def make_trainer(recipe: Recipe, stage: str, model, tok, train_ds, val_ds, work: Path, callbacks, report_to):
    args = make_config(recipe, stage, work, val_ds is not None, report_to)
    kw: dict[str, Any] = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tok, callbacks=callbacks)
    if stage == "grpo":
        from .rewards import resolve

        kw["reward_funcs"] = [named(resolve(n), n) for n in recipe.grpo.rewards]
    return trainer_class(stage)(**kw)


def named(fn, name: str):
    """trl logs each reward under its function's __name__; a user's module:function keeps its recipe name."""
    if getattr(fn, "__name__", None) == name:
        return fn

    def reward(*args, **kw):
        return fn(*args, **kw)

    reward.__name__ = name.replace(":", ".")
    return reward
