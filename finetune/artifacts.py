"""The files one stage hands to another, typed: one model per file, one writer, one reader.

A stage that writes one of these builds the model (a missing or misspelt field fails there, in the stage that got
it wrong); a stage that reads one gets the model back or one clear error naming the file and the field, never a
"?" in a published card. Fields are documented where they are declared, so this module is also their reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import StageFailed
from .run import read_json, write_json

A = TypeVar("A", bound="Artifact")


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def write(self, path: Path) -> None:
        write_json(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls: type[A], path: Path) -> A:
        """The file as this model; StageFailed (exit 1) naming the file and field when it is missing or not one."""
        return cls.model_validate(cls.read_checked(path))

    @classmethod
    def read_checked(cls, path: Path) -> dict[str, Any]:
        """The file's JSON as written, after checking it against this model (for readers that walk it as a dict)."""
        data = read_json(path, None)
        if data is None:
            raise StageFailed(f"{path}: missing (the stage that writes it has not run, or it was removed)")
        try:
            cls.model_validate(data)
            return data
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            raise StageFailed(f"{path}: {where}: {err['msg']} (written by another finetune version, or edited; rerun the "
                              f"stage that writes it with --force)") from None

    @classmethod
    def read_if_present(cls: type[A], path: Path) -> A | None:
        return cls.read(path) if path.exists() else None


class QuantizationReport(BaseModel):
    model_config = ConfigDict(extra="allow")  # models.QuantReport's fields; bits is the one every reader needs

    bits: int = Field(description="4 (NF4 through bitsandbytes), 8, or 16 (no quantization).")
    quantized_modules: int | None = Field(None, description="4-bit: linear layers stored in 4 bits.")
    share_of_block_matmul_weights: float | None = Field(None, description="4-bit: share of the transformer blocks' matmul weights in 4 bits.")


class TrainingSummary(Artifact):
    """RUN/adapter/training_summary.json (RUN/cpt/, RUN/dpo/ ... for the other stages): written by train.py, read by the
    card and the tests."""

    stage: Literal["cpt", "sft", "dpo", "orpo", "kto", "grpo"]
    global_step: int = Field(description="Optimizer steps taken, in all (resumed runs included).")
    planned_steps: int = Field(description="Steps the schedule planned.")
    train_loss: float = Field(description="Mean training loss over the steps of this process (the trainer's).")
    train_runtime_s: float = Field(description="Wall time of the training loop in this invocation, seconds.")
    train_rows: int = Field(description="Rows (CPT blocks, preference pairs (two rows each for kto), GRPO prompts) in the training split.")
    trainable_params: int
    total_params: int
    quantization: QuantizationReport
    device: str = Field(description="cuda, mps or cpu.")
    processes: int = Field(description="Processes that trained (world size).")
    resumed_from_step: int | None = Field(description="The checkpoint's step this invocation continued from; None if it started fresh.")
    skipped_nonfinite_steps: int = Field(description="Optimizer steps skipped for a non-finite loss or gradient norm.")
    masked_batches: int = Field(description="Micro-batches with no supervised token (their loss is not counted).")
    preflight: dict[str, Any] | None = Field(None, description="What the preflight checked on the real batches (sft only).")
    continued_from: Literal["cpt", "sft"] | None = Field(None, description="cpt when SFT started from the CPT adapter; sft for the stages after it.")
    reference: dict[str, Any] | None = Field(None, description="dpo, kto (and grpo with a KL term): the reference check (preference.check_reference).")
    method: Literal["lora", "block_expansion"] = Field("lora", description="training.method.")
    expansion: dict[str, Any] | None = Field(None, description="block_expansion: layers before and after, the new blocks' indices, and the "
                                             "identity check (max |expanded - original| logit before training).")
    vocabulary: dict[str, Any] | None = Field(None, description="An extended vocabulary: embedding rows, how many new rows were "
                                              "initialised by subword mean and how many by mean_resizing, tied or not (vocab.fit).")


class MergeCheck(Artifact):
    """RUN/merge_check.json: written by merge.py; read by eval (is the merged model usable), publish (its gate), chat
    and the card. A failed check is written too (passed false) so the user can see why."""

    base: Literal["original_16bit", "dequantized_4bit"] = Field(description="The base the adapter was merged into (merge.base).")
    base_weights: dict[str, Any] = Field(description="What the merge was built on: a local base's weight files and their sha256, or "
                                         "the Hub id and the commit resolved from the cache (merge.base_fingerprint).")
    probes: int = Field(description="Probe rows (validation rows) the logits were compared on.")
    probe_tokens: int
    adapter_vs_base_max_abs_diff: float = Field(description="How far the adapter moved the base's logits (float32).")
    merged_vs_adapter_max_abs_diff: float = Field(description="The merge's error: merged vs adapter logits (float32).")
    perplexity: dict[str, float] = Field(description="Probe perplexity of base, adapter, merged (and as_trained under QLoRA).")
    merged_vs_trained_max_abs_diff: float | None = Field(description="Merged vs the model as trained (4-bit base + adapter).")
    atol: float = Field(description="The tolerance merged vs adapter had to meet.")
    atol_source: Literal["derived", "merge.atol"]
    atol_rounding: float
    atol_adapter_share: float
    logits_absmax: float
    hidden_size: int
    layers: int
    atol_margin: float | None = Field(description="atol / the merge's error: how many times the error fits under it.")
    compared_in: Literal["float32"]
    saved_dtype: str
    lora_params_left: int
    device: str
    passed: bool
    reloaded_tensors_differing: int | None = None
    reloaded_differing_examples: list[str] | None = None
    saved_vs_adapter_max_abs_diff: float | None = None
    saved_weight_dtypes: list[str] | None = None


class Scores(BaseModel):
    model_config = ConfigDict(extra="allow")  # the metric's own details (counts, items scored per label ...)

    score: float | None = Field(description="The task's metric (a share in [0, 1], or a perplexity); None when nothing was scored.")
    ci95: list[float | None] | None = Field(None, description="Bootstrap 95% interval of the score.")
    ci95_note: str | None = Field(None, description="Why the interval has zero width, shown instead of it.")
    metrics: dict[str, float | None] | None = Field(None, description="The other metrics of the task type (tasks.METRICS).")


class TaskResult(BaseModel):
    model_config = ConfigDict(extra="allow")  # sampling details, per-task notes

    name: str
    type: Literal["multiple_choice", "classification", "exact_match", "perplexity"]
    metric: str
    higher_is_better: bool
    n: int = Field(description="Items scored.")
    source: str | None = Field(description="Where the items came from (Hub id or file name).")
    base: Scores
    tuned: Scores | None = Field(description="The adapter as trained; None when a plain model was evaluated alone.")
    delta: float | None
    delta_ci95: list[float | None] | None = Field(None, description="Paired bootstrap 95% interval of tuned - base.")
    merged: Scores | None = Field(None, description="The published merged model, when it passed its check and was scored.")
    merged_delta: float | None = None
    merged_delta_ci95: list[float | None] | None = None
    sft: Scores | None = Field(None, description="The SFT adapter, when a preference or reward stage came after it (three columns).")
    sft_delta: float | None = None
    sft_delta_ci95: list[float | None] | None = None
    tuned_vs_sft: float | None = Field(None, description="tuned - sft: what the stage after SFT changed.")
    tuned_vs_sft_ci95: list[float | None] | None = None
    one_class: bool = False
    warnings: list[str] | None = None


class EvalReport(Artifact):
    """RUN/eval/report.json: written by the eval stage (harness.write_report); read by the card, the publish gates and
    `finetune eval`'s table."""

    model_config = ConfigDict(extra="allow")  # the model and adapter names of `finetune eval MODEL`

    tasks: list[TaskResult]
