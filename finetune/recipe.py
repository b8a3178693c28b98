"""The recipe schema: pydantic models that are the documentation of every field.

Unknown keys are forbidden at every depth, and errors name the dotted path, the bad value and, for a
misspelled key, the closest valid one. Field names follow transformers / peft where those libraries
already name the setting (`learning_rate`, `max_steps`, `r`, `lora_alpha` ...), so habits carry over.

Importing this module must not import torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_prep.schema import Section, explain
from data_prep.spec import DataSpec, Source, resolve_path  # noqa: F401  (the data section is data_prep's schema)

from .errors import UserError
from .recipe_paths import absolute_paths
from .tasks import EvalTask, unique_names

FAMILIES = ("llama", "mistral", "mixtral", "falcon", "gpt_oss", "qwen2")
Family = Literal["llama", "mistral", "mixtral", "falcon", "gpt_oss", "qwen2"]
Dtype = Literal["bfloat16", "float16", "float32"]


def check_steps(v: int) -> int:
    if v == 0 or v < -1:  # 0 once passed validation and failed at run time; transformers reads <= 0 as "use the epochs"
        raise ValueError("give a number of optimizer steps (1 or more), or -1 to derive it from the epochs")
    return v


Steps = Annotated[int, AfterValidator(check_steps)]  # a `max_steps` field: 1 or more, or -1 for "from the epochs"


class BaseModelSpec(Section):
    """The model the specialist starts from."""

    id: str = Field(description="Hugging Face model id (`mistralai/Mistral-7B-Instruct-v0.1`), a local folder, or a local `.gguf` file "
                    "(Ollama, LM Studio, llama.cpp), relative to the recipe file.")
    gguf_file: str | None = Field(
        None, description="The GGUF file inside the folder `id` (`{id: models/, gguf_file: model.Q4_K_M.gguf}`). A GGUF base is "
        "dequantized once into a plain model folder in the user cache (keyed by its sha256), then used like any base "
        "(QLoRA quantizes it to NF4 as usual); run.lock and the card record its name and sha256.",
    )
    revision: str = Field("main", description="Branch, tag or commit of the model repository; pin a commit for reproducible runs.")
    family: Family | None = Field(
        None,
        description="Architecture family (`config.model_type`). Inferred from `id` when absent; `--smoke` builds a tiny "
        "randomly initialised stand-in of this family instead of downloading the model.",
    )
    license: str | None = Field(None, description="Licence of the base model weights (SPDX-style id, e.g. `apache-2.0`); goes into the model card.")
    hub_id: str | None = Field(
        None, description="The base's Hub id (`org/name`) when `id` is a local folder: named as `base_model` in the model card and in the "
        "published adapter_config.json, so others can load the adapter (a local path never leaves this machine). Default: the "
        "folder's config.json `_name_or_path` when that is a Hub id, else the folder's name.",
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the model repository. Off by default: only turn it on "
                                    "for repositories you trust.")
    dtype: Dtype = Field("bfloat16", description="dtype of the weights that are not quantized (embeddings, norms, lm_head) and of the 16-bit base.")


class QuantizationSpec(Section):
    """How the frozen base is held in memory during training (QLoRA: 4-bit NF4 with double quantization)."""

    bits: Literal[4, 8, 16] = Field(4, description="4 = QLoRA (bitsandbytes NF4), 8 = LLM.int8, 16 = plain LoRA on a 16-bit base.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 is optimal for normally distributed weights (QLoRA paper).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too: ~0.37 bit/param saved (QLoRA paper).")
    compute_dtype: Dtype = Field("bfloat16", description="dtype the 4-bit weights are dequantized to for each matmul.")
    min_4bit_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Smallest share of the transformer blocks' matmul weights that must really be 4-bit after loading "
        "(embeddings and lm_head stay 16-bit by design and are not counted).",
    )
    on_low_share: Literal["error", "warn"] = Field(
        "error", description="What to do when fewer weights than `min_4bit_share` became 4-bit: refuse to train, or warn loudly and go on."
    )


class LoraSpec(Section):
    """LoRA adapter settings, under peft's own names."""

    r: int = Field(16, ge=1, description="Rank of the update matrices (QLoRA paper: rank barely matters when all linear layers are adapted).")
    lora_alpha: int = Field(16, ge=1, description="Scaling numerator: updates are scaled by lora_alpha / r.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input (QLoRA: 0.05 to 0.1).")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="`all-linear` (every linear layer but the output head: QLoRA's finding) or a list of module names."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train along with the adapter.")


class TrainingSpec(Section):
    """Optimisation settings, named as in transformers' TrainingArguments."""

    method: Literal["lora", "block_expansion"] = Field(
        "lora", description="`lora`: an adapter on the base's linear layers (QLoRA when `quantization.bits` is 4). `block_expansion`: "
        "Llama Pro (Wu et al., ACL 2024): copies of every (L/N)-th decoder block inserted as identities (`expand:`), and only "
        "those trained, the original blocks frozen; needs `quantization.bits: 16`.",
    )

    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training set (ignored when `max_steps` > 0).")
    max_steps: Steps = Field(-1, description="Total optimizer steps; -1 means derive from `num_train_epochs`.")

    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: Union[int, float] = Field(
        0.03, ge=0, description="Linear warmup: an integer is a number of steps, a float below 1 a share of all steps "
        "(transformers 5 folded `warmup_ratio` into this field; Alpaca and Guanaco warm up for 0.03)."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    per_device_train_batch_size: int = Field(4, ge=1, description="Rows per micro-batch on each device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (Guanaco: 0.3).")
    optim: str = Field("adamw_torch", description="transformers optimizer name, e.g. `paged_adamw_32bit` (QLoRA) or `adamw_torch`.")
    packing: bool = Field(False, description="Pack several rows into each `max_length` sequence (padding-free; attention stays per row).")
    group_by_length: bool = Field(
        False, description="Batch rows of similar length together (transformers' length-grouped sampler): less padding when "
        "rows vary in length and packing is off; 2.2x training tokens/s on a CPU with a log-normal length mix (scripts/bench_cpu.py).",
    )
    activation_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: less memory, ~30% more compute (transformers 5's name for gradient checkpointing)."
    )
    seed: int = Field(42, description="Seed for initialisation, dropout and data order.")
    logging_steps: int = Field(10, ge=1, description="Steps between metric lines in logs/metrics.jsonl.")
    save_steps: int = Field(500, ge=1, description="Steps between checkpoints.")
    save_total_limit: int | None = Field(
        2, ge=1, description="Complete checkpoints kept on disk (oldest deleted first, only once a newer one is complete; "
        "never fewer than one); null keeps all."
    )
    eval_steps: int | None = Field(None, ge=1, description="Steps between validation-loss evaluations during training; null = only at the end.")
    nonfinite_patience: int = Field(
        0, ge=0, description="Optimizer steps with a NaN/inf loss or gradient norm that are skipped (no update, counted in "
        "metrics.jsonl) before training stops naming the step; 0 stops at the first. A checkpoint is never written with "
        "non-finite weights either way."
    )
    preflight_samples: int = Field(
        64, ge=0, description="Training rows rendered and checked before the first step (one BOS, EOS supervised, prompt "
        "masked, response marker, no EOS lost to truncation, prompt equal to the generation prompt); 0 turns it off."
    )


class EvalSpec(Section):
    """Evaluation of base vs tuned on identical prompts: the held-out split and the recipe's tasks."""

    heldout: bool = Field(True, description="Score loss and perplexity on the validation split too.")
    tasks: list[EvalTask] = Field(
        default_factory=list,
        description="Domain tasks (and a general-knowledge one, to see what was lost), scored for base and tuned; see finetune/tasks.py.",
    )
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass (and per generation batch) during evaluation.")

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[EvalTask]) -> list[EvalTask]:
        return unique_names(tasks)


class ExportSpec(Section):
    """GGUF files for llama.cpp and Ollama, written after the merge and verified against the merged model (finetune/export.py)."""

    gguf: list[Literal["f16", "bf16", "q8_0"]] = Field(
        default_factory=list,
        description="GGUF types the `export` stage writes into RUN/export/ after the merge (each with its Ollama Modelfile and its check in "
        "export_check.json); empty: no export stage (`finetune export RUN` does it by hand). q8_0 is about half the size of f16.",
    )


class MergeSpec(Section):
    """Merging the adapter into a 16-bit copy of the base, verified against the adapter."""

    enabled: bool = Field(True, description="Produce RUN/merged/ (needed to publish the merged model).")
    base: Literal["original_16bit", "dequantized_4bit"] = Field(
        "original_16bit",
        description="`original_16bit`: merge into the original weights (LLaMA-Factory's and unsloth's advice); the adapter was "
        "trained against their 4-bit rounding, and that gap is measured and recorded. `dequantized_4bit`: merge into the "
        "dequantized 4-bit weights the adapter saw in training (axolotl's default), saved in `dtype`.",
    )
    dtype: Dtype = Field("bfloat16", description="dtype of the saved merged model.")
    verify: bool = Field(True, description="Compare merged and adapter logits on probe prompts; fail when they differ by more than `atol`.")
    atol: float | None = Field(
        None, gt=0, description="Largest allowed |merged - adapter| logit difference, computed in float32. Default (null): derived "
        "from float32's rounding, the model's width and depth and the size of its logits, and capped at 1% of how far the "
        "adapter moved the logits (finetune/merge.py, derived_atol); merge_check.json records it and its margin.",
    )
    probes: int = Field(8, ge=1, description="Validation rows used as probe prompts.")


class GateSpec(Section):
    """What stops a publish (exit 3, nothing uploaded) unless `finetune publish RUN --force`."""

    max_regression: float | None = Field(
        None, ge=0, description="Refuse when a task of the eval got worse than the base by more than this at 95% confidence (the "
        "whole interval of the paired delta past it): an absolute drop of the score where higher is better (0.02 = two accuracy "
        "points), a relative rise of perplexity (0.02 = 2%). null: no check.",
    )
    licence_conflicts: bool = Field(
        True, description="Refuse when `publish.license` claims more than the licences of the base model and the data allow "
        "(a permissive licence over non-commercial data, say).",
    )
    pii_flagged: bool = Field(
        True, description="Refuse when the PII scan flagged training rows and kept them unredacted (data.quality.pii.action: flag).",
    )


class PublishSpec(Section):
    """Where the specialist goes and what travels with it."""

    to: str | None = Field(None, description="`hf://ORG/NAME` (Hugging Face Hub) or `file://DIR` (on-premise); null = publish nothing.")
    what: list[Literal["adapter", "merged", "gguf"]] = Field(
        ["adapter"], min_length=1,
        description="Artifacts to publish: `adapter`, `merged` (under merged/), `gguf` (the verified exports of `finetune export RUN`, with "
        "their Ollama Modelfiles, under gguf/; an export of an earlier merge is refused).")
    private: bool = Field(True, description="Create the Hub repository private.")
    license: str | None = Field(None, description="Licence of the published model; default derived from the base model's and the data's licences.")
    tags: list[str] = Field(default_factory=list, description="Extra tags for the model card.")
    gate: GateSpec = Field(default_factory=GateSpec, description="Checks that refuse a publish.")
    retries: int = Field(5, ge=0, description="Hub pushes retried this many times on server or network errors.")
    backoff_s: float = Field(2.0, ge=0, description="Wait before the first retry; doubled for each next one.")

    @field_validator("to")
    @classmethod
    def _scheme(cls, to: str | None) -> str | None:
        if to is not None and not re.match(r"^(hf://[\w.-]+/[\w.-]+|file://.+)$", to):
            raise ValueError("must look like hf://ORG/NAME or file://DIR")
        return to


class TrackingSpec(Section):
    """Experiment tracking; RUN/logs/metrics.jsonl is always written whatever is chosen here."""

    report_to: list[Literal["wandb", "tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Trackers to send metrics to. wandb runs online when WANDB_API_KEY is set, offline under RUN/logs/wandb "
        "otherwise; tensorboard writes RUN/logs/tensorboard; mlflow uses MLFLOW_TRACKING_URI or a file store in RUN/logs/mlruns. "
        "Keys come from the environment only.",
    )
    project: str = Field("finetune", description="Tracker project name.")


class DistributedSpec(Section):
    """Training on several GPUs or machines; `finetune run --gpus N` (and --nodes ...) override the counts here."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="`ddp`: a full 4-bit copy of the base per GPU (QLoRA's default; fits when the 4-bit base fits one GPU). "
        "`fsdp`: the base sharded across GPUs (FSDP-QLoRA: 4-bit weights stored in the compute dtype so FSDP can shard them). "
        "`deepspeed`: ZeRO-3 sharding. fsdp and deepspeed need CUDA GPUs.",
    )
    gpus: int = Field(1, ge=1, description="Processes (GPUs) per machine. Without CUDA, that many CPU processes over gloo (for testing).")
    nodes: int = Field(1, ge=1, description="Machines.")
    main_port: int = Field(29500, ge=1, le=65535, description="Port of the rendezvous on node rank 0 (multi-node runs).")


class LaptopSpec(Section):
    """`finetune run --laptop`: the recipe's data pipeline, template and eval tasks with a real small model
    (SmolLM2-135M-Instruct) in place of the base, sized to finish in about 15 minutes on a 2-core CPU (finetune/laptop.py).
    Hub sources and tasks use their `local:` alternatives found under `--data-dir`; where none is there, `samples:`."""

    max_rows: int = Field(400, ge=8, description="Rows read from each training source (its `limit`).")
    max_steps: int = Field(50, ge=1, description="Optimizer steps. 50 x 8 GSM8K rows is about 6 minutes at ~250 tokens/s on 2 cores.")
    learning_rate: float = Field(
        1e-3, gt=0, description="Peak learning rate. A 135M model with alpha/r = 0.25 (Guanaco's 16/64) needs a larger step than a "
        "7B one to move in 60 steps; what was tried is in docs/laptop.md.",
    )
    batch_size: int = Field(8, ge=1, description="Rows per optimizer step (one micro-batch: no accumulation on a CPU).")
    max_length: int = Field(512, ge=64, description="Cap on tokens per row (longer rows are handled as `data.overlong` says).")
    eval_max_samples: int = Field(120, ge=1, description="Items scored per log-likelihood task (a seeded, stratified sample when the task has more).")
    generate_max_samples: int = Field(24, ge=1, description="Items per exact_match task: each is a greedy generation, the slowest thing on a CPU.")
    max_new_tokens: int = Field(160, ge=1, description="Cap on generated tokens per exact_match item (a tuned GSM8K solution takes 60 to 150).")
    val_rows: int = Field(48, ge=4, description="Held-out rows (the held-out response perplexity, with its bootstrap CI).")
    data: str | None = Field(
        None, description="Training rows written for this recipe (relative to the recipe file), used when none of its sources is "
        "on disk; default `samples.data`.",
    )
    tasks: list[EvalTask] = Field(
        default_factory=list, description="Eval tasks over files written for this recipe, used when none of its tasks is on disk "
        "(default `samples.tasks`); a task of the same name also stands in for one of the recipe's that is not on disk.",
    )


class SamplesSpec(Section):
    """Small data written for this recipe, used by `--smoke` in place of the real sources and eval sets."""

    data: str = Field(description="Sample training rows (Alpaca or messages JSONL), relative to the recipe file.")
    eval: str | None = Field(None, description="Sample held-out rows scored as a perplexity task under `--smoke`.")
    tasks: list[EvalTask] = Field(
        default_factory=list, description="Small eval tasks over sample files, standing in for `eval.tasks` under `--smoke` (same schema)."
    )
    cpt: list[str] = Field(default_factory=list, description="Sample documents (JSONL with `text`) standing in for `cpt.sources` under `--smoke`, in order.")
    pairs: str | None = Field(
        None, description="Sample preference pairs ({prompt, chosen, rejected} JSONL) standing in for `preference.sources` under `--smoke`.")
    tokenizer: Literal["byte_level", "sentencepiece"] = Field(
        "byte_level", description="The kind of tokenizer the smoke stand-in gets, to match the real base's: `byte_level` (GPT-2 style byte-level "
        "BPE: Llama 3, Qwen2, SmolLM) or `sentencepiece` (a SentencePiece-style BPE with `▁` for spaces, byte fallback and `<0xNN>` byte "
        "tokens: Llama 2, Mistral-7B v0.1, BioMistral, SaulLM). Only llama, mistral and mixtral stand-ins take `sentencepiece`; other "
        "families are byte-level.",
    )


class CptSource(Source):
    """A source of raw text for continued pretraining, with its share of the token stream."""

    weight: float = Field(
        1.0, gt=0, description="Relative share of the token stream. The first source (the domain corpus) is used whole; the others are "
        "sampled (repeated if short) to their share: domain 0.98 + general 0.02 replays 2% general text, as SaulLM did.",
    )


class CptSpec(Section):
    """Continued pretraining (BioMistral's and SaulLM's first step): raw domain text packed into fixed-length blocks, every
    token supervised, LoRA on the same layers as SFT (optionally embeddings and lm_head too). Runs when `stages` has `cpt`."""

    sources: list[CptSource] = Field(min_length=1, description="Documents (`format: text`: JSONL/Parquet with `text`, or a folder of "
                                     ".txt/.md), domain corpus first.")
    block_size: int = Field(2048, ge=16, description="Tokens per packed block (BioMistral: 2,048-token packed blocks).")
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0, description="Share of blocks held out to report CPT validation loss.")
    train_embeddings: bool = Field(
        False, description="Also train the input embeddings and lm_head (full copies saved with the adapter): helps when the domain's "
        "vocabulary is far from the base's, and costs 2 x vocab x hidden parameters.",
    )
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (BioMistral CPT: 2e-5, cosine).")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the packed stream (CPT corpora are usually seen once).")
    max_steps: Steps = Field(-1, description="Total optimizer steps; -1 means derive from `num_train_epochs`.")

    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (BioMistral CPT: 0.01).")
    vocabulary: VocabularySpec | None = Field(
        None, description="Extend the base tokenizer before CPT (new tokens learned from the corpus or listed), for a language or notation "
        "the base splits badly; turns `train_embeddings` on. null: the base tokenizer as it is.",
    )


class VocabularySpec(Section):
    """Vocabulary extension before continued pretraining (ELYZA's Japanese Llama 2, Chinese-LLaMA): new tokens added to the base
    tokenizer (no existing id changes), embeddings and lm_head resized, each new row initialised as the mean of the rows of the
    pieces the old tokenizer split the token into, and both trained in the CPT stage (SFT keeps them as CPT left them). Give `add`
    (tokens learned from the corpus with the tokenizers library) or `tokens_file` (your list). See finetune/vocab.py."""

    model_config = ConfigDict(**Section.model_config, populate_by_name=True)  # `from` is a Python keyword: the field is `from_`

    add: int | None = Field(
        None, ge=1, le=200_000, description="Tokens to learn from the corpus: the base's BPE is continued on it (merges over the base's own "
        "tokens, most frequent first, appended after the base's merges; characters spelled in bytes first), up to this many new "
        "tokens, fewer when the corpus has no more that occur `min_frequency` times. ELYZA added ~13k Japanese tokens to Llama 2's "
        "32k; a few hundred to a few thousand suit a small corpus.",
    )
    tokens_file: str | None = Field(
        None, description="A UTF-8 text file, one token per line (relative to the recipe file), added as given, in order; lines that "
        "are empty or already one token are skipped.")
    from_: Literal["corpus", "mix"] = Field(
        "corpus", alias="from", description="What `add` learns from: `corpus`, the first of `cpt.sources` (the domain corpus), or "
        "`mix`, every CPT source as mixed.",
    )
    min_frequency: int = Field(2, ge=1, description="A learned token must occur at least this often in the corpus.")
    held_out: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of the corpus documents (by content hash) kept out of token learning and used to measure "
        "tokens per byte before and after (data/provenance.json, the card): the gain on text the new tokens were not learned from.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> VocabularySpec:
        if (self.add is None) == (self.tokens_file is None):
            raise ValueError("give exactly one of `add` (tokens learned from the corpus) and `tokens_file` (a list of tokens)")
        return self


class ExpandSpec(Section):
    """Llama Pro block expansion (`training.method: block_expansion`): after every (L/N)-th decoder block a copy of it is inserted
    with its attention output projection and MLP down projection zeroed, so the expanded model computes exactly what the original
    did (checked before training: the run refuses to train otherwise). Only the new blocks train. LLaMA Pro-8B added 8
    blocks to LLaMA2-7B's 32 (the paper; TencentARC/LLaMA-Pro's scripts/block_expansion.py). `--smoke` and `--laptop` add the
    divisor of their small model's layer count nearest a quarter of it."""

    blocks: int = Field(ge=1, description="N, the blocks to add; must divide the base's layer count L (Llama Pro: 8 for 32 layers).")
    train: Literal["full", "lora"] = Field(
        "full", description="`full`: every weight of the new blocks trains (Llama Pro); `lora`: a LoRA (the `lora:` settings) on the new "
        "blocks' linear layers only.",
    )


def _cpt_source(src: Source) -> Source:
    if src.format not in ("auto", "text"):
        raise ValueError("cpt.sources hold raw documents: use `format: text` (or leave `auto` for rows with `text`)")
    return src


PREFERENCE_STAGES = ("dpo", "orpo", "kto")  # trained on pairs {prompt, chosen, rejected}
AFTER_SFT = PREFERENCE_STAGES + ("grpo",)  # the stages that continue the SFT adapter


class PreferenceSpec(Section):
    """Preference tuning after SFT (`stages: [sft, dpo]`, `[sft, orpo]` or `[sft, kto]`): the SFT adapter trained further on
    pairs {prompt, chosen, rejected}. DPO and KTO measure the policy against a frozen reference, which is the SFT policy
    (the SFT adapter loaded a second time, frozen), never the bare base. ORPO needs no reference.

    Defaults follow the QLoRA DPO recipe of Hugging Face's alignment-handbook (zephyr-7b-beta, config_qlora.yaml: one
    epoch, learning rate 5e-6, cosine, 10% warm-up) with the DPO paper's beta of 0.1; see docs/preference.md."""

    sources: list[Source] = Field(
        min_length=1, description="Preference pairs: rows {prompt, chosen, rejected} (prompt as text or messages, answers as text), or a "
        "public layout through an adapter: `ultrafeedback` (chosen/rejected message lists), `hh_rlhf` (full-text pairs split at the "
        "last assistant turn), `argilla` (instruction or input, chosen/rejected or chosen_response/rejected_response).",
    )
    beta: float = Field(
        0.1, gt=0, description="DPO and KTO: strength of the pull towards the reference (DPO paper and TRL: 0.1; lower lets the policy "
        "move further). ORPO: lambda, the weight of the odds-ratio term next to the SFT loss (ORPO paper: 0.1).",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "sigmoid_norm"] = Field(
        "sigmoid", description="DPO only: `sigmoid` is the DPO paper's loss; `ipo` (IPO), `hinge` (SLiC), `robust` (noisy labels), "
        "`apo_zero`, `sigmoid_norm` (length-normalised) are trl's variants.",
    )
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate (alignment-handbook QLoRA DPO: 5e-6).")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the pairs (alignment-handbook: 1).")
    max_steps: Steps = Field(-1, description="Total optimizer steps; -1 means derive from `num_train_epochs`.")

    warmup_steps: Union[int, float] = Field(0.1, ge=0, description="Warm-up: steps, or a fraction of the total below 1 (alignment-handbook: 0.1).")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of pairs held out (by content hash) for the report's reward accuracy and margin.")
    val_max: int = Field(200, ge=0, description="Cap on held-out pairs.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO only: weight of the chosen (desirable) answers' loss (KTO paper, eq. 8).")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO only: weight of the rejected (undesirable) answers' loss.")


class GrpoSpec(Section):
    """Reinforcement learning with verifiable rewards after SFT (`stages: [sft, grpo]`): trl's GRPOTrainer samples
    `num_generations` answers per prompt from the policy, scores each with the reward functions, and moves the policy
    towards the answers that beat their group's mean. The prompts are the SFT training prompts whose reference answer
    the eval harness can extract (answers.py), so `correctness` means what the eval's exact match means.

    Defaults follow DeepSeekMath's GRPO (group of several samples per question, temperature 1) scaled to one GPU, and
    trl's defaults (KL coefficient 0, as in DAPO and Dr. GRPO); see docs/preference.md."""

    rewards: list[str] = Field(
        ["correctness", "boxed_format"], min_length=1, description="Reward functions by name (finetune/rewards.py: `correctness`, "
        "`boxed_format`), or `module:function` for your own; see finetune/rewards.py for the signature.",
    )
    reward_weights: list[float] | None = Field(None, description="One weight per reward (default: all 1.0).")

    @field_validator("rewards")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from .rewards import REWARDS, resolve

        for name in v:
            if ":" not in name and name not in REWARDS:  # a user's module:function is imported when the stage runs
                try:
                    resolve(name)
                except UserError as e:
                    raise ValueError(str(e)) from None
        return v
    num_generations: int = Field(8, ge=2, description="Answers sampled per prompt: the group whose mean is the baseline (trl default 8).")
    max_completion_length: int = Field(256, ge=8, description="Cap on generated tokens per answer.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (DeepSeekMath: 1.0; lower gives less diverse groups).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    beta: float = Field(
        0.0, ge=0, description="KL coefficient towards the reference, the SFT policy (DeepSeekMath: 0.04; trl, DAPO, Dr. GRPO: 0, no "
        "reference pass).",
    )
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the prompts.")
    max_steps: Steps = Field(-1, description="Total optimizer steps; -1 means derive from `num_train_epochs`.")

    max_prompts: int | None = Field(None, ge=1, description="Use at most this many training prompts (a seeded sample).")
    val_prompts: int = Field(32, ge=0, description="Held-out prompts (from the validation split) scored for the report's mean reward.")

    @model_validator(mode="after")
    def _weights(self) -> GrpoSpec:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} rewards")
        return self


STAGE_ORDERS = (["sft"], ["cpt", "sft"]) + tuple(pre + ["sft", s] for pre in ([], ["cpt"]) for s in AFTER_SFT)


class Recipe(Section):
    """A domain specialist, from data to published model."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="Run and repository name (letters, digits, `.`, `_`, `-`).")
    domain: str = Field("general", description="Domain the specialist serves (medical, legal, math ...); shown in the card with its disclaimer.")
    base_model: BaseModelSpec = Field(description="The model to specialise.")
    data: DataSpec = Field(description="Training data.")
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec, description="How the frozen base is held in memory.")
    lora: LoraSpec | None = Field(default_factory=LoraSpec, description="Adapter settings; null asks for full fine-tuning, which this version does not offer.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation of base vs tuned.")
    merge: MergeSpec = Field(default_factory=MergeSpec, description="Verified merge into a 16-bit base.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="Verified GGUF export of the merged model (llama.cpp, Ollama).")
    publish: PublishSpec = Field(default_factory=PublishSpec, description="Publishing.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking.")
    distributed: DistributedSpec = Field(default_factory=DistributedSpec, description="Several GPUs or machines (see finetune/distributed.py).")
    samples: SamplesSpec | None = Field(None, description="Sample data for `--smoke` (and for `--laptop` where no local file is found).")
    laptop: LaptopSpec = Field(default_factory=LaptopSpec, description="Sizes of `--laptop` runs (real small model on a CPU).")
    stages: list[Literal["cpt", "sft", "dpo", "orpo", "kto", "grpo"]] = Field(
        ["sft"], description="Training stages in order: `[sft]`; `[cpt, sft]` to continue pretraining on raw domain text first (SFT then "
        "continues the CPT adapter); and after `sft` one of `dpo`, `orpo`, `kto` (preference pairs, `preference:`) or `grpo` "
        "(verifiable rewards, `grpo:`), which continue the SFT adapter. Each stage is resumable on its own.",
    )
    cpt: CptSpec | None = Field(None, description="Continued pretraining settings (used when `stages` has `cpt`).")
    expand: ExpandSpec | None = Field(None, description="Block expansion settings (used when `training.method` is `block_expansion`).")
    preference: PreferenceSpec | None = Field(None, description="Preference tuning settings (used when `stages` has dpo, orpo or kto).")
    grpo: GrpoSpec | None = Field(None, description="GRPO settings (used when `stages` has `grpo`).")

    @model_validator(mode="after")
    def _cross_field(self) -> Recipe:
        if self.lora is None:
            if self.quantization.bits != 16:
                raise ValueError(
                    f"quantization.bits={self.quantization.bits} needs an adapter: a quantized base cannot be trained directly "
                    "(set `lora:` or use quantization.bits: 16)"
                )
            raise ValueError("lora: null asks for full fine-tuning, which finetune does not offer; set `lora:` (QLoRA/LoRA)")
        if self.merge.base == "dequantized_4bit" and self.quantization.bits != 4:
            raise ValueError("merge.base dequantized_4bit needs quantization.bits: 4 (there are no 4-bit weights to dequantize)")
        if "merged" in self.publish.what and not self.merge.enabled:
            raise ValueError("publish.what includes `merged` but merge.enabled is false")
        if self.data.template == "alpaca" and any(s.format == "messages" or s.adapter == "sharegpt" for s in self.data.sources):
            raise ValueError("data.template `alpaca` cannot render `messages` sources; use data.template: chat")
        if self.stages not in STAGE_ORDERS:
            raise ValueError(f"stages {self.stages}: use [sft] or [cpt, sft], optionally followed by one of {', '.join(AFTER_SFT)} "
                             "(continued pretraining comes before instruction tuning; preference and reward tuning after it)")
        if "cpt" in self.stages and self.cpt is None:
            raise ValueError("stages has `cpt` but there is no `cpt:` section (its sources, block_size ...)")
        if set(self.stages) & set(PREFERENCE_STAGES) and self.preference is None:
            raise ValueError(f"stages has `{self.stages[-1]}` but there is no `preference:` section (its sources of pairs ...)")
        if "grpo" in self.stages and self.grpo is None:
            raise ValueError("stages has `grpo` but there is no `grpo:` section (rewards: [correctness, boxed_format] ...)")

        if self.training.method == "block_expansion":
            if self.expand is None:
                raise ValueError("training.method block_expansion needs an `expand:` section (blocks: N, N dividing the layer count)")
            if self.quantization.bits != 16:
                raise ValueError(f"training.method block_expansion trains 16-bit blocks beside frozen 16-bit ones: set quantization.bits: 16 "
                                 f"(it is {self.quantization.bits})")
            if self.publish.to and "merged" not in self.publish.what:
                raise ValueError("publish.what: with training.method block_expansion publish `merged` (a plain model with the new "
                                 "blocks); the adapter alone loads only on a base expanded the same way")
        elif self.expand is not None:
            raise ValueError("`expand:` is used only with training.method: block_expansion; set it, or remove `expand:`")
        if self.cpt and self.cpt.vocabulary and "cpt" not in self.stages:
            raise ValueError("cpt.vocabulary extends the tokenizer for continued pretraining: add `cpt` to stages ([cpt, sft])")
        for s in self.cpt.sources if self.cpt else []:
            _cpt_source(s)
        if any(s.format == "text" for s in self.data.sources):
            raise ValueError("data.sources: `text` sources (raw documents) cannot be trained on as instructions; turn them into "
                             "instructions with `finetune data synth grounded`")
        return self


# --------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: let PyYAML say what is wrong with it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice, on lines {first} and {key_node.start_mark.line + 1}: keep one",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _recursive(obj: Any, seen: frozenset[int] = frozenset()) -> bool:
    if isinstance(obj, (dict, list)):
        if id(obj) in seen:
            return True
        inner = seen | {id(obj)}
        return any(_recursive(v, inner) for v in (obj.values() if isinstance(obj, dict) else obj))
    return False


def _yaml_load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read recipe ({e})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if _recursive(data):
        raise UserError(f"{path}: a YAML alias refers to a mapping or list that contains it (a recursive `*alias`); "
                        "a recipe must be a finite tree")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping (name:, base_model:, data: ...), got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b.c=value` overrides. Values are parsed as YAML (so `1e-4`, `true`, `[a, b]` get their types),
    then pydantic coerces them to the field's type. List items are addressed by index (`eval.tasks.0.name=x`)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.learning_rate=1e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError(f"--set {item!r}: empty key segment in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, part, where, item)
                continue
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise UserError(f"--set {item!r}: {where} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            idx = _index(last, key, item)
            if idx >= len(node):
                raise UserError(f"--set {item!r}: {key} is past the end of a list of {len(node)}")
            node[idx] = value
        else:
            node[last] = value
    return data


def _index(part: str, where: str, item: str) -> int:
    if not part.isdigit():
        raise UserError(f"--set {item!r}: {where} is a list; address its items by number (…{where.rsplit('.', 1)[0]}.0…)")
    return int(part)


def _list_item(node: list, part: str, where: str, item: str) -> Any:
    idx = _index(part, where, item)
    if idx >= len(node):
        raise UserError(f"--set {item!r}: {where} is past the end of a list of {len(node)}")
    return node[idx]


# Names other tools (and older transformers/trl) use for our fields: a typo close to one of these is pointed at ours.
ALIASES = {
    "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "lr": "learning_rate", "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size", "micro_batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps", "max_seq_length": "max_length", "sequence_len": "max_length",
    "warmup_ratio": "warmup_steps", "scheduler": "lr_scheduler_type", "model": "base_model", "datasets": "sources",
    "load_in_4bit": "bits", "gradient_checkpointing": "activation_checkpointing", "target_modules": "target_modules", "lora_r": "r",
}


def parse_recipe(data: dict[str, Any], source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(blame_overrides(explain(e, source, Recipe, "recipe", ALIASES), overrides or [])) from None


def blame_overrides(message: str, overrides: list[str]) -> str:
    """Point each problem that a `--set KEY=VALUE` caused at that option, not at the recipe file: the file is fine."""
    head, *lines = message.split("\n")
    keys = [(o.split("=", 1)[0].strip(), o) for o in overrides if "=" in o]
    out, blamed = [], 0
    for line in lines:
        path = line.strip().split(":", 1)[0]
        hit = next((o for k, o in keys if path == k or path.startswith(k + ".")), None)
        blamed += hit is not None
        out.append(f"{line} [from --set {hit}]" if hit else line)
    if lines and blamed == len(lines):
        head = f"--set: invalid value{'s' if blamed > 1 else ''} for the recipe ({head.split(': invalid recipe', 1)[0]})"
    return "\n".join([head, *out])


def load_recipe(path: str | Path, overrides: list[str] | None = None, localise=None, base_dir: Path | None = None) -> tuple[Recipe, Path]:
    """Read, override and validate a recipe, its local paths made absolute. Returns it with the folder its relative
    paths were resolved against: the recipe's own, or `base_dir` (a run's copy written before paths were absolute).
    `localise` rewrites the document before the overrides (a run's copy: `$RUN/...` back to the run's own folder)."""
    path = Path(path)
    data = _yaml_load(path)
    if localise is not None:
        data = localise(data)
    recipe_dir = Path(base_dir).resolve() if base_dir else path.resolve().parent
    data = absolute_paths(apply_overrides(data, overrides or []), recipe_dir)
    leaks = secret_paths(data)
    if leaks:
        raise UserError(f"{path}: {leaks[0]} holds what looks like an access token. Secrets are read from the environment "
                        f"only (HF_TOKEN, WANDB_API_KEY ...), never from a recipe, which is copied into the run directory, "
                        f"logs and model cards: remove it and export the variable instead"
                        + (f" (also at: {', '.join(leaks[1:4])})" if len(leaks) > 1 else ""))
    recipe = parse_recipe(data, str(path), overrides)
    to = recipe.publish.to
    if to and to.startswith("file://") and not Path(to.removeprefix("file://")).expanduser().is_absolute():
        # README: paths in a recipe are relative to the recipe file, publish targets too (not to the working directory)
        recipe.publish.to = "file://" + str((recipe_dir / to.removeprefix("file://")).resolve())
    return recipe, recipe_dir


def json_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()


# A key that names a secret (`token`, `hf_token`, `api_key`), not one that merely contains the word (`max_new_tokens`).
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_key|apikey)$", re.I)
_SECRET_VALUE = re.compile(r"(hf_[A-Za-z0-9]{8,}|wandb_[A-Za-z0-9]{8,}|sk-[A-Za-z0-9]{16,})")


# What a recipe may never contain: token formats (Hugging Face `hf_` + 34 letters and digits, OpenAI-style `sk-`,
# W&B's `wandb_v1_` keys). Stricter than _SECRET_VALUE (which redacts) so paths like `hf_datasets_cache/` pass.
_TOKEN_IN_RECIPE = re.compile(r"(?<![A-Za-z0-9])(hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|wandb_v1_[A-Za-z0-9_]{20,})")
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")


def secret_paths(obj: Any, where: str = "") -> list[str]:
    """Dotted paths of recipe values that look like a token, or equal the value of a secret environment variable."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in secret_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in secret_paths(v, f"{where}.{i}")]
    if isinstance(obj, str):
        env = [os.environ[n] for n in SECRET_ENV if len(os.environ.get(n, "")) >= 8]
        if _TOKEN_IN_RECIPE.search(obj) or any(v in obj for v in env):
            return [where or "(top level)"]
    return []


def redact(obj: Any) -> Any:
    """Copy of a recipe dict with anything secret-looking replaced: secrets come from the environment only and
    must never reach the resolved recipe, logs or cards."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _SECRET_VALUE.sub("***", obj)
    return obj
