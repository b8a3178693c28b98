"""Stage 2, train: trl's SFTTrainer + peft LoRA on all linear layers over a (really) 4-bit base.

The data arrives tokenised, with labels (prompt masked, EOS supervised) built by prepare; trl only packs and
batches it. We wrap what the trainer does not do: the 4-bit check and the preflight (preflight.py) before the first
step; metrics.jsonl whatever the tracker; atomic checkpoints (checkpoints.py) and exact resume from the newest
complete one; a clean stop on SIGTERM/SIGINT (preempt.py); a stop on non-finite loss or gradients.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import checkpoints, distributed, preempt, tracking
from .artifacts import TrainingSummary
from .errors import StageFailed
from .models import check_quantization, device, lora_targets
from .recipe import AFTER_SFT, Recipe
from .rows import read_rows, token_dataset
from .run import RunDir, read_jsonl, write_json

log = logging.getLogger("finetune")


PAIRED = ("dpo", "orpo", "kto")  # the stages whose batches hold a prompt with its answers


class NonFinite(StageFailed):
    """Training produced a NaN/inf loss or gradient norm more often than `training.nonfinite_patience` allows."""


@dataclass
class GuardState:
    """What the trainer's guards share during one training: the trainer records a non-finite micro-batch loss and
    batches without a supervised token; the Guard callback reads the loss flag before each optimizer step."""

    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    masked_batches: int = 0  # micro-batches with no supervised token
    streak: int = 0  # non-finite steps in a row (training stops past `nonfinite_patience`)
    finite_loss: bool = True  # every micro-batch loss since the last optimizer step was finite

    def take_finite_loss(self) -> bool:
        """The flag for the step about to be taken, reset for the next one."""
        ok, self.finite_loss = self.finite_loss, True
        return ok


class MetricsFile(TrainerCallback):
    """Append every logged metric line to RUN/logs/metrics.jsonl, with the guards' counters."""

    def __init__(self, path: Path, guard: GuardState):
        self.path, self.guard, self.t0 = path, guard, time.time()

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        line = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "elapsed_s": round(time.time() - self.t0, 3), **logs}
        if self.guard.skipped_steps or self.guard.masked_batches:
            line.update(skipped_steps=self.guard.skipped_steps, masked_batches=self.guard.masked_batches)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


class StepProgress(TrainerCallback):
    """Step, loss, tokens/s and ETA: redrawn on a terminal, a log line every logging_steps otherwise (progress.py)."""

    def on_train_begin(self, args, state, control, **kw):
        from .progress import Progress

        # off a terminal: a line at logging steps, at most ~100 in a run (a 7B run's log stays readable)
        every = args.logging_steps * max(1, -(-(state.max_steps // 100) // args.logging_steps))
        self.bar = Progress("train", state.max_steps, "step", every=every, start=state.global_step)
        self.shown: dict[str, str] = {}
        self.tokens0: tuple[float, float] | None = None

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        self.shown["loss"] = f"{logs['loss']:.4f}"
        if "num_tokens" in logs:
            now = (time.time(), float(logs["num_tokens"]))
            if self.tokens0 is None:
                self.tokens0 = now
            elif now[0] > self.tokens0[0]:
                self.shown["tokens/s"] = f"{(now[1] - self.tokens0[1]) / (now[0] - self.tokens0[0]):,.0f}"
        self.bar.update(state.global_step, **self.shown)

    def on_step_end(self, args, state, control, **kw):
        if state.is_world_process_zero and self.bar.tty:
            self.bar.update(state.global_step, **self.shown)

    def on_train_end(self, args, state, control, **kw):
        self.bar.close()


class NonFiniteGuard(TrainerCallback):
    """Before each optimizer step: a non-finite loss or gradient norm skips the update (grads dropped, so AdamW leaves
    the weights alone) up to `patience` times in a row, then stops training naming the step. HF's
    `logging_nan_inf_filter` would only hide it from the log."""

    def __init__(self, guard: GuardState, patience: int, ckpt_dir: Path):
        self.guard, self.patience, self.ckpt_dir = guard, patience, ckpt_dir

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        import torch

        guard, patience = self.guard, self.patience
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else torch.tensor(0.0)
        step = state.global_step + 1
        bad = [what for what, ok in (("loss", guard.take_finite_loss()), ("gradient norm", bool(torch.isfinite(norm)))) if not ok]
        if not bad:
            guard.streak = 0
            return
        guard.streak += 1
        if guard.streak > patience:
            raise NonFinite(f"non-finite {' and '.join(bad)} at optimizer step {step} (epoch {state.epoch or 0:.2f}); training "
                            f"stopped{' after ' + str(guard.streak) + ' such steps in a row' if patience else ''}. No checkpoint "
                            f"was written from it; the last complete one is in {self.ckpt_dir}. Lower training.learning_rate, check "
                            "the data of this step, or allow skips with training.nonfinite_patience")
        for p in model.parameters():
            p.grad = None
        guard.skipped_steps += 1
        log.warning("non-finite %s at step %d: update skipped (%d of %d allowed in a row)", " and ".join(bad), step, guard.streak, patience)


class Preemption(TrainerCallback):
    """A SIGTERM/SIGINT during the loop: save a checkpoint at the end of this step and stop (preempt.py)."""

    def _check(self, control):
        # Agreed across ranks: a SIGTERM to any one of them stops all of them at the same step.
        if distributed.any_rank(preempt.requested() is not None):
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kw):
        return self._check(control)

    def on_prediction_step(self, args, state, control, **kw):  # a signal during in-training evaluation
        return self._check(control)


class AtomicCheckpoints(TrainerCallback):
    """Move checkpoint-N to RUN/checkpoints/step-NNNNNN atomically (checkpoints.py), refusing non-finite weights."""

    def __init__(self, ckpt_dir: Path, keep: int | None):
        self.ckpt_dir, self.keep = ckpt_dir, keep

    def on_save(self, args, state, control, **kw):
        distributed.barrier()  # every rank has written its part (its RNG state) before rank 0 seals the folder
        src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and src.exists():
            checkpoints.finalize(src, self.ckpt_dir, state.global_step, check=_finite_weights)
            checkpoints.rotate(self.ckpt_dir, self.keep)  # single writer (transformers#20988)
        distributed.barrier()


def trainer_callbacks(recipe: Recipe, ckpt_dir: Path, metrics: Path, guard: GuardState) -> list[TrainerCallback]:
    return [MetricsFile(metrics, guard), StepProgress(), NonFiniteGuard(guard, recipe.training.nonfinite_patience, ckpt_dir),
            Preemption(), AtomicCheckpoints(ckpt_dir, recipe.training.save_total_limit)]


def _finite_weights(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    for f in folder.glob("*.safetensors"):
        bad = [k for k, v in load_file(f).items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFinite(f"{f.name}: non-finite values in {bad[0]} (and {len(bad) - 1} more); checkpoint not written")


def guarded(base):
    """A trl trainer class (SFTTrainer; DPO, KTO, ORPO, GRPO in preference.py) with two guards: the loss of every
    micro-batch is checked (read by the Guard callback before the optimizer step), and a micro-batch without a
    supervised token is counted and reported. trl already turns such a batch into a finite, graph-connected zero loss
    (its token count is clamped to 1)."""
    import torch

    class GuardedTrainer(base):
        guard: GuardState
        adapter_dtype: torch.dtype

        def cast_adapter(self) -> None:
            """trl casts a QLoRA adapter to bfloat16 at init (the QLoRA paper's choice, right for bf16 GPUs), but peft's
            `load_adapter`, which the Trainer calls on resume, casts it back to float32: a resumed run then trains other
            weights than the uninterrupted one. One dtype for both, the recipe's: bfloat16 with bf16 compute on a GPU,
            float32 otherwise (fp16 mixed precision needs float32 master weights)."""
            for p in self.model.parameters():
                if p.requires_grad and p.dtype != self.adapter_dtype:
                    p.data = p.data.to(self.adapter_dtype)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            self.cast_adapter()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.get("labels")
            if self.model.training and labels is not None and int((labels[..., 1:] != -100).sum()) == 0:
                self.guard.masked_batches += 1
                log.warning("a micro-batch at step %d has no supervised token: it adds nothing to the update (%d so far)",
                            self.state.global_step + 1, self.guard.masked_batches)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not bool(torch.isfinite(loss.detach()).all()):
                self.guard.finite_loss = False
            return loss

    return GuardedTrainer


def stage_settings(recipe: Recipe, stage: str):
    """The training settings of a stage: SFT's are `training:`; CPT takes its own learning rate, length and decay from `cpt:`
    and the rest (batch, schedule, optimizer, checkpoints) from `training:`."""
    if stage == "sft":
        return recipe.training, recipe.data.max_length, recipe.training.packing
    if stage in AFTER_SFT:
        from .preference import stage_settings as own

        return own(recipe, stage), recipe.data.max_length, False
    c = recipe.cpt
    t = recipe.training.model_copy(update={"learning_rate": c.learning_rate, "num_train_epochs": c.num_train_epochs,
                                           "max_steps": c.max_steps, "weight_decay": c.weight_decay})
    return t, c.block_size, False  # blocks are already packed to block_size


def sft_config(recipe: Recipe, output_dir: Path, has_val: bool, stage: str = "sft", report_to: list[str] | None = None):
    from trl import SFTConfig

    t, max_length, packing = stage_settings(recipe, stage)
    return SFTConfig(
        **training_args(recipe, output_dir, has_val, stage, report_to),
        max_length=max_length,
        packing=packing,
        train_sampling_strategy="group_by_length" if t.group_by_length and not packing else "random",
    )


def training_args(recipe: Recipe, output_dir: Path, has_val: bool, stage: str, report_to: list[str] | None = None) -> dict[str, Any]:
    """The TrainingArguments every stage's trl config takes (SFT's here, the stages after it in preference.py): the
    stage's learning settings, checkpoints, precision, logging, the distributed strategy."""
    t = stage_settings(recipe, stage)[0]
    on_gpu = device() == "cuda"
    bf16 = on_gpu and recipe.quantization.compute_dtype == "bfloat16"
    return dict(
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
        gradient_checkpointing=t.activation_checkpointing,
        bf16=bf16,
        fp16=on_gpu and recipe.quantization.compute_dtype == "float16",
        use_cpu=not on_gpu,
        report_to=(report_to if report_to is not None else list(recipe.tracking.report_to)) or "none",
        logging_nan_inf_filter=False,  # a NaN must show in the log (and stops training: the Guard callback)
        run_name=f"{recipe.name}-{stage}" if stage != "sft" else recipe.name,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_only_model=False,
        ddp_find_unused_parameters=False,  # LoRA: every trainable parameter is used; the search costs a pass per step
        **strategy_args(recipe),
    )


def strategy_args(recipe: Recipe) -> dict[str, Any]:
    """TrainingArguments for the recipe's distributed.strategy. DDP needs nothing (torchrun's environment is enough).
    FSDP follows the FSDP-QLoRA recipe of Answer.AI and the PEFT docs: full sharding wrapped per decoder layer, the
    frozen 4-bit base loaded on rank 0 only and broadcast, `use_orig_params` off for the mixed frozen/trainable
    parameters, sharded state dicts. DeepSpeed is ZeRO-3 with the 16-bit weights gathered on save."""
    s = recipe.distributed.strategy
    if s == "fsdp":
        return {"fsdp": "full_shard auto_wrap", "fsdp_config": {
            "cpu_ram_efficient_loading": True, "use_orig_params": False, "sync_module_states": True,
            "state_dict_type": "SHARDED_STATE_DICT", "backward_prefetch": "backward_pre", "activation_checkpointing": False}}
    if s == "deepspeed":
        return {"deepspeed": {
            "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                  "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "gradient_clipping": "auto",
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}}
    return {}


def embedding_modules(model) -> list[str]:
    """Names of the input embedding and output head (peft's modules_to_save), whatever the family calls them."""
    wanted = {id(model.get_input_embeddings()): None, id(model.get_output_embeddings()): None}
    names = [name.rsplit(".", 1)[-1] for name, m in model.named_modules() if id(m) in wanted]
    return list(dict.fromkeys(names))


def with_adapter(model, recipe: Recipe, run: RunDir, stage: str, new_blocks: list[int] | None = None):
    """The trainable adapter of a stage: a fresh LoRA, or for SFT after CPT the CPT adapter itself (and its trained
    embeddings, if any), so one adapter carries both stages. Under block expansion the adapter holds the new blocks
    (`adapter_config`)."""
    from peft import PeftModel, get_peft_model

    if stage == "sft" and "cpt" in recipe.stages:
        model = PeftModel.from_pretrained(model, str(run.cpt), is_trainable=True)
        if recipe.cpt.vocabulary is not None:
            freeze_embeddings(model)
    elif stage in AFTER_SFT:  # preference and reward stages continue the SFT adapter (preference.py: the reference is a copy)
        model = PeftModel.from_pretrained(model, str(run.adapter), is_trainable=True)
    else:
        model = get_peft_model(model, adapter_config(model, recipe, stage, new_blocks))
    if recipe.training.method == "block_expansion" and recipe.expand.train == "full":
        freeze_anchor(model)
    return model


def adapter_config(model, recipe: Recipe, stage: str, new_blocks: list[int] | None):
    from peft import LoraConfig

    vocab = stage == "cpt" and recipe.cpt.vocabulary is not None  # new rows must learn: vocab.py
    extra = embedding_modules(model) if stage == "cpt" and (recipe.cpt.train_embeddings or vocab) else []
    lora = recipe.lora
    common = dict(lora_dropout=lora.lora_dropout, bias=lora.bias, task_type="CAUSAL_LM",
                  # tied input and output embeddings stay one matrix in the adapter, so the merged model (which ties
                  # them again on load) computes what was trained
                  ensure_weight_tying=bool(extra) and tied_embeddings(model))
    if recipe.training.method != "block_expansion":
        return LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, target_modules=lora_targets(model, lora.target_modules),
                          modules_to_save=extra or None, **common)
    from .runbase import new_block_names

    blocks = new_block_names(model, new_blocks or [])
    if recipe.expand.train == "lora":  # LoRA on the new blocks' linear layers only; the original blocks get none
        targets = [n for n in lora_targets(model, "all-linear") if n.startswith(tuple(b + "." for b in blocks))]
        return LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, target_modules=targets, modules_to_save=extra or None, **common)
    # Full weights of the new blocks: peft's modules_to_save holds a trainable copy of each. peft refuses an adapter with
    # no LoRA module at all, so a rank-1 LoRA on the first block's down projection anchors it: its B starts at zero and
    # stays frozen (freeze_anchor), so it adds exactly nothing, in training and in the merge.
    return LoraConfig(r=1, lora_alpha=1, target_modules=[anchor_module(model, blocks)], modules_to_save=blocks + extra, **common)


def freeze_embeddings(model) -> int:
    """SFT after a grown vocabulary: the embeddings and lm_head stay as CPT trained them. Trained whole at an adapter's
    learning rate on a few instruction rows they drift: on held-out Japanese, SmolLM2 with 695 new tokens scored 3.08
    bits per byte after CPT and SFT with them trainable, 2.68 with them frozen in SFT (docs/laptop.md)."""
    names = tuple(f"{m}.modules_to_save." for m in embedding_modules(model))
    n = 0
    for name, p in model.named_parameters():
        if p.requires_grad and any(k in name for k in names):
            p.requires_grad_(False)
            n += 1
    return n




def anchor_module(model, blocks: list[str]) -> str:
    names = [n for n in lora_targets(model, "all-linear") if not n.startswith(tuple(b + "." for b in blocks))]
    return next(n for n in names if n.endswith("down_proj"))


def freeze_anchor(model) -> int:
    """Keep the block-expansion anchor LoRA (adapter_config) frozen at zero: peft marks every LoRA weight trainable on load."""
    cfg = getattr(model, "peft_config", {}).get("default")
    if cfg is None or len(cfg.target_modules or ()) != 1:
        return 0
    target = next(iter(cfg.target_modules))
    n = 0
    for name, p in model.named_parameters():
        if "lora_" in name and f"{target}.lora_" in name:
            p.requires_grad_(False)
            n += 1
    return n


def tied_embeddings(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _keep_metrics_until(path: Path, step: int) -> None:
    """On resume: keep the metric lines up to the checkpoint's step; later ones were logged by steps being redone."""
    if not path.exists():
        return
    keep = [row for row in read_jsonl(path) if row.get("step", 0) <= step]
    path.write_text("".join(json.dumps(row) + "\n" for row in keep), encoding="utf-8")


def _model_with_adapter(recipe: Recipe, run: RunDir, stage: str):
    """The base as the recipe holds it (4-bit under QLoRA, checked), prepared for k-bit training, with this stage's adapter."""
    from peft import prepare_model_for_kbit_training

    from . import runbase

    tok = runbase.tokenizer(recipe, run)
    probe = identity_probe(run, stage, tok) if recipe.training.method == "block_expansion" else None
    model, shaped = runbase.load(recipe, run, quantized=recipe.quantization.bits != 16, probe=probe)
    qreport = check_quantization(model, recipe) if recipe.quantization.bits != 16 else None
    if recipe.quantization.bits != 16:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.training.activation_checkpointing)
    model = with_adapter(model, recipe, run, stage, shaped.get("expansion", {}).get("new_blocks"))
    trainable, total = model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # peft's count includes the frozen anchor
    how = "LoRA" if recipe.training.method == "lora" else f"block expansion ({recipe.expand.train} new blocks)"
    log.info("%s: %s, %d trainable parameters (%.3f%% of %d)", stage, how, trainable, 100 * trainable / total, total)
    return tok, model, qreport, trainable, total, shaped


def identity_probe(run: RunDir, stage: str, tok, n: int = 4, width: int = 64):
    """A few of the stage's own training rows (cut to `width` tokens): what the expanded model must compute as the original did."""
    from itertools import islice

    from .merge import rows_batch

    with open(run.rows("cpt" if stage == "cpt" else "sft", "train"), encoding="utf-8") as f:  # the first rows, not the whole file
        rows = [json.loads(line) for line in islice(f, n)]
    return rows_batch([{"input_ids": r["input_ids"][:width]} for r in rows], tok.pad_token_id)[:2]


def _clear_or_resume(run: RunDir, stage: str, resume_from: Path | None, work: Path) -> None:
    """Rank 0: on resume keep the complete checkpoints and the metrics up to the checkpoint's step; otherwise start
    this stage's checkpoints and metrics afresh."""
    ckpts, metrics = run.stage_checkpoints(stage), run.stage_metrics(stage)
    if resume_from is not None:
        checkpoints.sweep(ckpts)  # leftovers of the interrupted write; complete checkpoints stay
        _keep_metrics_until(metrics, checkpoints.step_of(resume_from))
        log.info("%s: resuming from %s", stage, resume_from)
    else:
        metrics.unlink(missing_ok=True)
        shutil.rmtree(ckpts, ignore_errors=True)
    ckpts.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)


def _trainer(recipe: Recipe, run: RunDir, stage: str, model, tok, train_ds, val_ds, work: Path, guard: GuardState):
    import torch
    from transformers.trainer_callback import PrinterCallback

    report_to = tracking.configure(recipe.tracking.report_to, recipe.tracking.project, run.logs, stage)
    callbacks = trainer_callbacks(recipe, run.stage_checkpoints(stage), run.stage_metrics(stage), guard)
    if stage in AFTER_SFT:
        from .preference import make_trainer

        trainer = make_trainer(recipe, stage, model, tok, train_ds, val_ds, work, callbacks, report_to)
    else:
        from trl import SFTTrainer

        has_val = len(val_ds) > 0
        trainer = guarded(SFTTrainer)(model=model, args=sft_config(recipe, work, has_val, stage, report_to), train_dataset=train_ds,
                                      eval_dataset=val_ds if has_val else None, processing_class=tok, callbacks=callbacks)
    trainer.guard = guard
    bf16_gpu = device() == "cuda" and recipe.quantization.compute_dtype == "bfloat16" and recipe.quantization.bits != 16
    trainer.adapter_dtype = torch.bfloat16 if bf16_gpu else torch.float32
    trainer.cast_adapter()
    if stage in AFTER_SFT:
        from .preference import load_sft_weights

        load_sft_weights(trainer.model, run.adapter)
    trainer.remove_callback(PrinterCallback)  # metrics go to logs/metrics.jsonl, not raw dicts on stdout
    return trainer, report_to


def train(recipe: Recipe, run: RunDir, stage: str = "sft", resume_from: Path | None = None, show_example: bool = False) -> dict[str, Any]:
    """Train one stage. `cpt` writes RUN/cpt/ (continued pretraining on packed blocks); `sft` writes RUN/adapter/, starting
    from RUN/cpt/ when the recipe's stages are [cpt, sft]. `resume_from`: a complete checkpoint of this stage to continue
    from (optimizer, scheduler, RNG and data position restored, so the result equals an uninterrupted run)."""
    import torch

    torch.manual_seed(recipe.training.seed)
    tok, model, qreport, trainable, total, shaped = _model_with_adapter(recipe, run, stage)
    if stage in AFTER_SFT:
        from .preference import stage_datasets

        rows, (train_ds, val_ds) = None, stage_datasets(run, stage)
    else:
        rows = read_rows(run.rows(stage, "train"))
        train_ds, val_ds = token_dataset(rows), token_dataset(read_rows(run.rows(stage, "val")))
    run.logs.mkdir(parents=True, exist_ok=True)
    ckpts, work, main = run.stage_checkpoints(stage), run.root / f".trainer-{stage}", distributed.is_main()
    if main:
        _clear_or_resume(run, stage, resume_from, work)
    distributed.barrier()
    guard = GuardState()
    trainer, report_to = _trainer(recipe, run, stage, model, tok, train_ds, val_ds, work, guard)
    checks = None
    if stage == "sft" and recipe.training.preflight_samples and main:
        from .preflight import preflight

        checks = preflight(tok, rows, recipe.data.template, recipe.data.system_prompt, recipe.data.max_length, show_example,
                           recipe.training.preflight_samples, trainer.data_collator, trainer.train_dataset)
        write_json(run.logs / "preflight.json", checks)
    reference = None
    if stage in ("dpo", "kto") or (stage == "grpo" and recipe.grpo.beta > 0):
        from .preference import check_reference

        reference = check_reference(trainer.model, run.adapter)
    if stage in PAIRED and recipe.training.preflight_samples and main:
        from .preflight import preflight_pairs

        checks = preflight_pairs(tok, trainer.train_dataset, trainer.data_collator, recipe.training.preflight_samples, stage)
        write_json(run.logs / f"preflight-{stage}.json", checks)
    t0 = time.time()
    ok = False
    try:
        with preempt.deferred():
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        ok = True
    finally:
        tracking.finish(report_to, ok and not preempt.requested())
    wall = time.time() - t0
    if distributed.any_rank(preempt.requested() is not None):  # a signal, to this rank or another
        last = checkpoints.latest(ckpts)
        distributed.barrier()
        if main:
            shutil.rmtree(work, ignore_errors=True)
        raise preempt.Preempted(f"{stage}: stopped by {preempt.requested() or 'a signal to another rank'} after step {trainer.state.global_step}; "
                                f"complete checkpoint {last}. Continue with the same `finetune run` command")
    if trainer.state.global_step != trainer.state.max_steps:  # verl#7401: a resume that skipped an epoch and exited 0
        raise StageFailed(f"{stage}: ran {trainer.state.global_step} optimizer steps of {trainer.state.max_steps} planned")
    if not main:  # rank 0 writes the adapter; the others are done
        distributed.barrier()
        return {"global_step": trainer.state.global_step, "rank": distributed.rank()}
    summary = TrainingSummary(
        stage=stage, global_step=trainer.state.global_step, planned_steps=trainer.state.max_steps, train_loss=result.training_loss,
        train_runtime_s=round(wall, 3), train_rows=len(train_ds), trainable_params=trainable, total_params=total,
        quantization=qreport.as_dict() if qreport else {"bits": 16}, device=device(), processes=distributed.world_size(),
        resumed_from_step=checkpoints.step_of(resume_from) if resume_from else None, skipped_nonfinite_steps=guard.skipped_steps,
        masked_batches=guard.masked_batches, preflight=checks, reference=reference, method=recipe.training.method, **shaped,
        continued_from="cpt" if stage == "sft" and "cpt" in recipe.stages else ("sft" if stage in AFTER_SFT else None))
    with run.staged(run.stage_adapter(stage).name) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"])  # not the frozen reference
        tok.save_pretrained(tmp)
        summary.write(tmp / "training_summary.json")
    shutil.rmtree(work, ignore_errors=True)
    distributed.barrier()
    log.info("%s: %d steps in %.1f s, loss %.4f", stage, summary.global_step, wall, summary.train_loss)
    return summary.model_dump(mode="json")
