"""The data schema: where rows come from, how they are cleaned and split. It is a recipe's `data:` section, and,
with a `name:` on top, a standalone spec for `finetune data build SPEC.yaml`. Every field is documented here.
Importable without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .schema import Section, did_you_mean
from .sources.adapters import ADAPTERS, check_options

ALPACA_FIELDS = ("instruction", "input", "output", "messages", "id", "text", "prompt", "chosen", "rejected")


class Location(Section):
    """Where rows are read from: a file, a folder, or a Hugging Face dataset (shared by training sources and eval tasks)."""

    path: str | None = Field(
        None,
        description="Local file (.jsonl, .json, .csv, .tsv, .parquet), a folder of .txt/.md documents, or a folder written by "
        "`datasets.save_to_disk`; relative to the recipe or spec file's folder (or absolute).",
    )
    hub: str | None = Field(None, description="Hugging Face dataset id, read with `datasets.load_dataset` (network on first use, then the local cache).")
    config: str | None = Field(None, description="Dataset configuration name (with `hub`).")
    split: str = Field("train", description="Dataset split to read (with `hub`, or a `save_to_disk` folder holding several splits).")
    revision: str | None = Field(None, description="Dataset revision (with `hub`); pin a commit for reproducible runs.")
    reader: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "documents", "hf_disk"] = Field(
        "auto", description="How to read `path`; `auto` decides from the extension (or the folder's content)."
    )
    columns: list[str] | None = Field(
        None, description="Column names for a CSV/TSV without a header row (MMLU's CSVs have none); the first row is then data."
    )
    include_ids: str | None = Field(
        None, description="JSON file whose keys (object) or items (list) are the only row ids to keep, e.g. an official test split's ids."
    )
    exclude_ids: str | None = Field(
        None, description="JSON file whose keys or items are row ids to leave out (PubMedQA: train on the ids not in the test set)."
    )
    limit: int | None = Field(None, ge=1, description="Read only the first N rows (quick runs).")
    license: str | None = Field(None, description="Licence of this data (SPDX-style id); recorded in provenance and the model card.")
    local: dict[str, Any] | None = Field(
        None, description="The local-file alternative of a `hub` location: the keys that replace `hub`, `config`, `split` and "
        "`revision` when the dataset's own files are on disk, e.g. `{path: gsm8k/train.jsonl}`. `finetune run --laptop` reads "
        "it, with `path` (and `*_ids`, `prompt_file`) relative to `--data-dir`.",
    )

    @model_validator(mode="after")
    def _one_place(self) -> "Location":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` or `hub`")
        return self

    @property
    def origin(self) -> str:
        """How the data is named in rejects, provenance, reports and messages: its path, or hf://id/config:split."""
        return self.path or f"hf://{self.hub}" + (f"/{self.config}" if self.config else "") + f":{self.split}"


class Source(Location):
    """One input of the instruction set: a file, a folder, or a Hugging Face dataset, optionally through an adapter."""

    adapter: str | None = Field(
        None,
        description="Turn a public schema into Alpaca rows: " + ", ".join(f"`{k}`" for k in ADAPTERS) + " (see data_prep/sources/adapters.py).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword options of the adapter, e.g. `{boxed: true}` for gsm8k; options ending in `_file` are paths relative to this file.",
    )
    format: Literal["auto", "alpaca", "messages", "text", "pairs"] = Field(
        "auto",
        description="Row layout after the adapter and `fields`: `alpaca` ({instruction, input?, output}), `messages` "
        "({messages: [{role, content}]}), `text` (raw documents, for continued pretraining and grounded synthesis), `pairs` "
        "({prompt, chosen, rejected}: preference pairs, `preference.sources`); "
        "`auto` decides per row.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns to ours, e.g. `{instruction: question, output: answer}`; a column that does not "
        "exist is an error with a did-you-mean over the real columns.",
    )

    @model_validator(mode="after")
    def _check(self) -> Source:
        bad = sorted(set(self.fields) - set(ALPACA_FIELDS))
        if bad:
            close = did_you_mean(bad[0], list(ALPACA_FIELDS))
            hint = f"; did you mean '{close}'?" if close else ""
            raise ValueError(f"`fields` maps onto {', '.join(ALPACA_FIELDS)}; not {bad}{hint}")
        if self.adapter is not None:
            if self.adapter not in ADAPTERS:
                close = did_you_mean(self.adapter, list(ADAPTERS))
                hint = f"; did you mean '{close}'?" if close else f"; known: {', '.join(ADAPTERS)}"
                raise ValueError(f"unknown adapter {self.adapter!r}{hint}")
            check_options(self.adapter, self.options)
        elif self.options:
            raise ValueError("`options` are adapter options; set `adapter:` too")
        return self


class NearDedupeSpec(Section):
    """Near-duplicate removal with MinHash LSH (datasketch)."""

    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Estimated Jaccard similarity at or above which a row is a near duplicate of "
                             "an earlier one (0.8: Lee et al. 2022, 'Deduplicating training data').")
    num_perm: int = Field(128, ge=16, description="MinHash permutations; more = a closer Jaccard estimate and slower (128: error ~0.09 at "
                          "worst, ~0.03 typical).")
    ngram: int = Field(5, ge=1, description="Shingle size in words (5-word shingles as in Lee et al. 2022); rows shorter than this are one shingle.")


PII_KINDS = ("name", "address", "date", "age", "ssn", "national_id", "record_id", "health_plan", "account", "licence", "vehicle", "device",
             "card", "iban", "phone", "email", "url", "ip")
# Kinds renamed since earlier recipes: date_of_birth became `date` (any date tied to a person: birth, admission, discharge, death).
_PII_RENAMED = {"date_of_birth": "date"}


class PIISpec(Section):
    """Personal data in medical and legal sources, to the HIPAA Safe Harbor list (45 CFR 164.514(b)(2)) plus European ids: found by
    the detectors table (docs/pii.md: patterns with checksums where an id has one), and bare names by a spaCy pipeline when one is
    installed (`pip install 'finetune[pii]'`)."""

    action: Literal["redact", "pseudonymize", "flag", "drop", "off"] = Field(
        "redact",
        description="`redact`: replace each finding with its kind ([NAME], [PHONE] ...); `pseudonymize`: with a numbered placeholder that "
        "stays the same for the same value across rows ([NAME_1] ... [NAME_1]), so a conversation about one patient stays coherent (the "
        "mapping lives in memory only and is never written); `flag`: keep the text, report the rows (publish then refuses without --force); "
        "`drop`: remove the rows; `off`: no scan.",
    )
    kinds: list[Literal[PII_KINDS]] = Field(  # type: ignore[valid-type]
        list(PII_KINDS), description="What to look for (docs/pii.md has each kind's patterns, examples and what it leaves alone)."
    )
    ner: str = Field(
        "auto",
        description="Names without a title or label: `auto` uses the first installed spaCy pipeline with an NER component "
        "(en_core_web_trf, _lg, _md, _sm first), `off` uses none, or a pipeline's package name or folder. Which ran is recorded in "
        "provenance.json and the data card.",
    )
    rejects: Literal["keep", "redacted"] = Field(
        "keep",
        description="rejects.jsonl keeps every removed row as it was read, so nothing is lost (`keep`); `redacted` writes removed rows "
        "redacted like the training rows instead (the personal data of dropped and duplicate rows is then gone from the build).",
    )

    @field_validator("kinds", mode="before")
    @classmethod
    def _renamed_kinds(cls, v: Any) -> Any:
        return [_PII_RENAMED.get(k, k) for k in v] if isinstance(v, list) else v


class DecontaminateSpec(Section):
    """Training rows that share a long n-gram with an evaluation item are removed (or flagged), as GPT-3 did (13-grams)."""

    enabled: bool = Field(True, description="Check the training rows against the eval sets (the recipe's eval tasks plus `against`).")
    ngram: int = Field(13, ge=4, description="Words per n-gram (13 as in GPT-3, Brown et al. 2020, appendix C).")
    min_words: int = Field(8, ge=1, description="Eval items shorter than `ngram` words are matched whole when they have at least this many "
                           "words (shorter ones are too generic to mean contamination).")
    action: Literal["remove", "flag"] = Field("remove", description="`remove` overlapping training rows (to rejects.jsonl) or only `flag` them in provenance.")
    against: list[Source] = Field(default_factory=list, description="Extra eval sets to check against (same keys as a source), e.g. GSM8K test.")


class QualitySpec(Section):
    """Cleaning applied after validation, in this order: exact dedupe, near dedupe, decontamination, PII."""

    dedupe: Literal["none", "exact", "near"] = Field("near", description="`exact`: normalised-text hash; `near`: exact, then MinHash LSH near duplicates.")
    near: NearDedupeSpec = Field(default_factory=NearDedupeSpec, description="Near-duplicate settings.")
    pii: PIISpec = Field(default_factory=PIISpec, description="Personal data scan.")
    decontaminate: DecontaminateSpec = Field(default_factory=DecontaminateSpec, description="Eval-set overlap check.")
    max_reject_rate: float = Field(
        0.1, ge=0.0, le=1.0,
        description="The build fails when more than this share of a source's rows is invalid (malformed, empty, overlong): a sign of a "
        "wrong mapping rather than a few bad rows. Duplicates and contaminated rows are not counted.",
    )

    @field_validator("pii", mode="before")
    @classmethod
    def _pii_shorthand(cls, v: Any) -> Any:
        return {"action": v} if isinstance(v, str) else v  # `pii: redact` means `pii: {action: redact}`

    @field_validator("decontaminate", mode="before")
    @classmethod
    def _decontaminate_shorthand(cls, v: Any) -> Any:
        return {"enabled": v} if isinstance(v, bool) else v  # `decontaminate: true` means `{enabled: true}`


class DataSpec(Section):
    """How the instruction set is read, cleaned, split and rendered."""

    sources: list[Source] = Field(min_length=1, description="Where the training rows come from; rows of all sources are pooled.")
    quality: QualitySpec = Field(default_factory=QualitySpec, description="Deduplication, PII and decontamination.")
    template: Literal["alpaca", "chat"] = Field(
        "alpaca",
        description="`alpaca`: Stanford Alpaca's prompt, byte for byte (prompt ends at `### Response:`, the output and EOS follow); "
        "`chat`: the tokenizer's chat template (`messages` rows, or Alpaca rows turned into a user/assistant turn).",
    )
    system_prompt: str | None = Field(None, description="System message prepended to every conversation (`chat` template only).")
    max_length: int = Field(2048, gt=8, description="Longest training example in tokens, prompt + response + EOS (BioMistral packs 2,048).")
    overlong: Literal["drop", "truncate", "error"] = Field(
        "drop",
        description="Rows longer than `max_length`: `drop` them, `truncate` the response (keeping EOS supervised), or stop with an `error`. "
        "Counts are always reported.",
    )
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Share of rows held out for validation, chosen by content hash (stable across runs).")
    val_max: int | None = Field(1000, ge=1, description="Cap on validation rows, so evaluation stays quick on big sets.")
    min_rows: int = Field(
        16, ge=1, description="Fewest usable training rows after cleaning; fewer is an error naming what removed the rest. A "
        "handful of rows teaches nothing and is memorised within a few steps (39 duplicates of 40 once trained 20 steps on one "
        "row and published it); lower it on purpose for tiny experiments.",
    )


class BuildSpec(DataSpec):
    """A standalone data spec for `finetune data build`: a recipe's `data:` section plus a name and, optionally, the
    tokenizer whose token counts decide what is overlong."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="Name of the instruction set (output folder and data card title).")
    tokenizer: str | None = Field(
        None, description="Tokenizer (Hugging Face id or local folder) used to count tokens against `max_length`; without one, lengths are "
        "reported in words and no row is dropped as overlong."
    )

    @field_validator("tokenizer")
    @classmethod
    def _nonempty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("empty tokenizer name")
        return v


def resolve_path(base_dir: Path, p: str) -> Path:
    """Paths in a recipe or spec are relative to its file's folder, so it works from any directory."""
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base_dir / q)
