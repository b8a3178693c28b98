"""Stage 2, train: trl's SFTTrainer + peft LoRA on all linear layers over a (really) 4-bit base.

The data arrives tokenised, with labels (prompt masked, EOS supervised) built by prepare; trl only packs and
batches it. We wrap what the trainer does not do: metrics.jsonl whatever the tracker, checkpoints named
step-NNNNNN with a COMPLETE marker, a stop on non-finite loss, and the 4-bit check before the first step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .models import check_quantization, device, load_model, lora_targets
from .recipe import Recipe
from .run import RunDir, write_json

log = logging.getLogger("finetune")


def _callbacks(run: RunDir, keep: int | None, ckpt_dir: Path, metrics: Path):
    from transformers import TrainerCallback

    class Metrics(TrainerCallback):
        """Append every logged metric line to RUN/logs/metrics.jsonl; stop on a non-finite loss."""

        def __init__(self):
            self.t0 = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            run.logs.mkdir(parents=True, exist_ok=True)
            line = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "elapsed_s": round(time.time() - self.t0, 3), **logs}
            with open(metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss} at step {state.global_step}")

    class Checkpoints(TrainerCallback):
        """Rename checkpoint-N to step-NNNNNN (sortable), mark it COMPLETE last, keep the newest `keep`."""

        def on_save(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not src.exists():
                return
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            dst = ckpt_dir / f"step-{state.global_step:06d}"
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(src, dst)
            (dst / "COMPLETE").write_text(json.dumps({"step": state.global_step}) + "\n")
            done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "COMPLETE").exists())
            for old in done[: -keep] if keep else []:
                shutil.rmtree(old, ignore_errors=True)

    return [Metrics(), Checkpoints()]


def _dataset(path: Path):
    """Tokenised rows; CPT blocks have no labels: every token is supervised."""
    from datasets import Dataset

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []
    return Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r.get("labels", r["input_ids"]) for r in rows]})


def stage_settings(recipe: Recipe, stage: str):
    """The training settings of a stage: SFT's are `training:`; CPT takes its own learning rate, length and decay from `cpt:`
    and the rest (batch, schedule, optimizer, checkpoints) from `training:`."""
    if stage == "sft":
        return recipe.training, recipe.data.max_length, recipe.training.packing
    c = recipe.cpt
    t = recipe.training.model_copy(update={"learning_rate": c.learning_rate, "num_train_epochs": c.num_train_epochs,
                                           "max_steps": c.max_steps, "weight_decay": c.weight_decay})
    return t, c.block_size, False  # blocks are already packed to block_size


def sft_config(recipe: Recipe, output_dir: Path, has_val: bool, stage: str = "sft"):
    from trl import SFTConfig

    t, max_length, packing = stage_settings(recipe, stage)
    on_gpu = device() == "cuda"
    bf16 = on_gpu and recipe.quantization.compute_dtype == "bfloat16"
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=recipe.eval.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation is ours (Checkpoints callback), over COMPLETE checkpoints only
        eval_strategy="steps" if (t.eval_steps and has_val) else "no",
        eval_steps=t.eval_steps,
        max_length=max_length,
        packing=packing,
        gradient_checkpointing=t.activation_checkpointing,
        bf16=bf16,
        fp16=on_gpu and recipe.quantization.compute_dtype == "float16",
        use_cpu=not on_gpu,
        report_to=list(recipe.tracking.report_to) or "none",
        run_name=f"{recipe.name}-{stage}" if stage != "sft" else recipe.name,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_only_model=False,
    )


def embedding_modules(model) -> list[str]:
    """Names of the input embedding and output head (peft's modules_to_save), whatever the family calls them."""
    wanted = {id(model.get_input_embeddings()): None, id(model.get_output_embeddings()): None}
    names = [name.rsplit(".", 1)[-1] for name, m in model.named_modules() if id(m) in wanted]
    return list(dict.fromkeys(names))


def with_adapter(model, recipe: Recipe, run: RunDir, stage: str):
    """The trainable adapter of a stage: a fresh LoRA, or for SFT after CPT the CPT adapter itself (and its trained
    embeddings, if any), so one adapter carries both stages."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if stage == "sft" and "cpt" in recipe.stages:
        return PeftModel.from_pretrained(model, str(run.root / "cpt"), is_trainable=True)
    extra = embedding_modules(model) if stage == "cpt" and recipe.cpt.train_embeddings else None
    lcfg = LoraConfig(
        r=recipe.lora.r, lora_alpha=recipe.lora.lora_alpha, lora_dropout=recipe.lora.lora_dropout,
        target_modules=lora_targets(model, recipe.lora.target_modules), bias=recipe.lora.bias, task_type="CAUSAL_LM",
        modules_to_save=extra,
    )
    return get_peft_model(model, lcfg)


def train(recipe: Recipe, run: RunDir, stage: str = "sft") -> dict[str, Any]:
    """Train one stage. `cpt` writes RUN/cpt/ (continued pretraining on packed blocks); `sft` writes RUN/adapter/, starting
    from RUN/cpt/ when the recipe's stages are [cpt, sft]."""
    import torch
    from peft import prepare_model_for_kbit_training
    from trl import SFTTrainer

    from .models import load_tokenizer

    torch.manual_seed(recipe.training.seed)
    base = recipe.base_model.id
    tok = load_tokenizer(base, recipe)
    model = load_model(base, recipe, quantized=recipe.quantization.bits != 16)
    qreport = check_quantization(model, recipe) if recipe.quantization.bits != 16 else None
    if recipe.quantization.bits != 16:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.training.activation_checkpointing)
    model = with_adapter(model, recipe, run, stage)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s: LoRA, %d trainable parameters (%.3f%% of %d)", stage, trainable, 100 * trainable / total, total)

    prefix = "cpt_" if stage == "cpt" else ""
    train_ds = _dataset(run.data / f"{prefix}train.jsonl")
    val_ds = _dataset(run.data / f"{prefix}val.jsonl")
    has_val = len(val_ds) > 0
    if recipe.tracking.report_to and "wandb" in recipe.tracking.report_to:
        os.environ.setdefault("WANDB_PROJECT", recipe.tracking.project)
        os.environ.setdefault("WANDB_DIR", str(run.logs))
    # Metrics are appended per run of this stage; a rerun starts a fresh file.
    run.logs.mkdir(parents=True, exist_ok=True)
    metrics = run.metrics if stage == "sft" else run.logs / f"metrics-{stage}.jsonl"
    metrics.unlink(missing_ok=True)
    ckpts = run.checkpoints if stage == "sft" else run.root / f"checkpoints-{stage}"
    shutil.rmtree(ckpts, ignore_errors=True)
    ckpts.mkdir(parents=True)
    work = run.root / f".trainer-{stage}"
    shutil.rmtree(work, ignore_errors=True)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, work, has_val, stage),
        train_dataset=train_ds,
        eval_dataset=val_ds if has_val else None,
        processing_class=tok,
        callbacks=_callbacks(run, recipe.training.save_total_limit, ckpts, metrics),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # metrics go to logs/metrics.jsonl, not raw dicts on stdout
    t0 = time.time()
    result = trainer.train()
    wall = time.time() - t0
    if "wandb" in recipe.tracking.report_to:
        import wandb

        wandb.finish()  # the Trainer never calls it; offline runs stay empty until it is called
    with run.staged("adapter" if stage == "sft" else stage) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        summary = {
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "train_runtime_s": round(wall, 3),
            "train_rows": len(train_ds),
            "trainable_params": trainable,
            "total_params": total,
            "quantization": qreport.as_dict() if qreport else {"bits": 16},
            "device": device(),
            "stage": stage,
            **({"continued_from": "cpt"} if stage == "sft" and "cpt" in recipe.stages else {}),
        }
        write_json(tmp / "training_summary.json", summary)
    shutil.rmtree(work, ignore_errors=True)
    log.info("%s: %d steps in %.1f s, loss %.4f", stage, summary["global_step"], wall, summary["train_loss"])
    return summary
