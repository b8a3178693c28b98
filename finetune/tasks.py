"""Evaluation tasks defined in YAML, and the prompts they turn into. Importing this module must not import torch.

A task reads a local file (CSV, TSV, JSONL, JSON, Parquet, a `save_to_disk` folder) or a Hugging Face dataset, maps
its columns onto the task's fields, and renders every item into the exact text both models see:

    [header] [k solved examples] question layout  ->  wrapped in the template (raw, alpaca or the chat template)

- `multiple_choice`: each choice is a continuation scored by log-likelihood (`mmlu` letters, BioMistral's layout, or
  `cloze` with the choice text, where length-normalised accuracy matters);
- `classification`: the continuations are the task's labels (output constrained to the label set);
- `exact_match`: greedy generation until a stop sequence, then answer extraction (answers.py);
- `perplexity`: loss on held-out text (documents, or the responses of instruction rows).

A task file for `finetune eval` is `tasks: [ ... ]`; a recipe lists the same entries under `eval.tasks`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from data_prep.errors import DataError
from data_prep.schema import Section, did_you_mean, explain
from data_prep.spec import Location, resolve_path

from .answers import METHODS

TaskType = Literal["multiple_choice", "exact_match", "classification", "perplexity"]
Extract = Literal["boxed", "hash", "answer_is", "last_number"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# The primary metric of each type, and the ones it may be switched to (all of which the report shows beside it).
METRICS = {
    "multiple_choice": ("accuracy", ("accuracy", "accuracy_norm")),
    "classification": ("balanced_accuracy", ("balanced_accuracy", "accuracy", "macro_f1")),
    "exact_match": ("exact_match", ("exact_match",)),
    "perplexity": ("perplexity", ("perplexity", "bits_per_byte")),
}
# Fields every row must end up with (after `fields:`), per type. `prompt` placeholders may name any column too.
REQUIRED = {"multiple_choice": ("question", "answer"), "classification": ("label",), "exact_match": ("question", "answer"), "perplexity": ()}
BIOMISTRAL_HEADER = "The following are multiple choice questions (with answers) about medical knowledge."  # BioMistral's eval prompt (Labrak et al. 2024)


class FewShot(Location):
    """Where the solved examples come from (a dev or train split), with the same columns as the task."""


class EvalTask(Location):
    """One evaluation task, scored for the base and the tuned model on identical prompts."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="Short task name shown in the report and the model card.")
    type: TaskType = Field(description="`multiple_choice`, `classification`, `exact_match` or `perplexity` (see finetune/tasks.py).")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map the task's fields onto the data's columns, e.g. `{question: QUESTION, label: final_decision}`. Fields: "
        "question, choices (a list column), answer (choice index, letter or text; the gold answer for exact_match), label "
        "(classification), text (documents for perplexity), context, id. A missing column is an error with a did-you-mean.",
    )
    choice_columns: list[str] | None = Field(None, description="multiple_choice whose options are separate columns (MMLU's CSVs: `[B, C, D, E]`).")
    prompt: str | None = Field(
        None,
        description="The item's text, with `{{field}}` placeholders (task fields or raw columns; lists are joined by newlines). "
        "Default: `{{question}}` (`{{text}}` for classification). In the alpaca and chat templates this is the instruction.",
    )
    prompt_file: str | None = Field(None, description="Read `prompt` from this file (LegalBench's base_prompt.txt, whose `{{text}}` is the item).")
    input: str | None = Field(
        None, description="Second part of the item (the Alpaca template's `### Input:`), with `{{field}}` placeholders; lets a task "
        "render exactly like the training rows (PubMedQA: fixed instruction, question and abstract as input)."
    )
    style: Literal["mmlu", "biomistral", "cloze"] = Field(
        "mmlu",
        description="multiple_choice layout: `mmlu` (options `A. ...`, answer a letter), `biomistral` (`**Question:** ... (A) ... "
        "**Answer:**(` then the letter, BioMistral's prompt), `cloze` (the option text itself is scored).",
    )
    header: str | None = Field(None, description="Text before the examples (default for `biomistral`: its medical-knowledge sentence).")
    labels: list[str] | None = Field(None, description="classification: the label set; the output is constrained to it and gold labels "
                                     "outside it are an error.")
    metric: str | None = Field(None, description="Primary metric; default per type: accuracy, balanced_accuracy, exact_match, perplexity.")
    template: Literal["auto", "raw", "alpaca", "chat"] = Field(
        "auto",
        description="How the item is wrapped: `auto` = the recipe's own template in a recipe (byte-identical to training), `raw` "
        "for `finetune eval` on a plain model; or force `raw`, `alpaca`, `chat`.",
    )
    target_delimiter: str | None = Field(None, description="Text between prompt and answer; default a space for `raw`, nothing in a template (as in training).")
    num_fewshot: int = Field(0, ge=0, description="Solved examples before each item (BioMistral: 3; LegalBench's base prompts carry their own).")
    fewshot: FewShot | None = Field(None, description="Where solved examples come from; default the task's own rows, never the item itself.")
    fewshot_seed: int = Field(1234, description="Seed of the example draw (the same examples for base and tuned).")
    max_new_tokens: int = Field(256, ge=1, description="exact_match: generation budget (GSM8K solutions fit in 256).")
    stop: list[str] | None = Field(None, description="exact_match: stop sequences; default `\\n\\n\\n` and the next-question cue of the layout.")
    extract: list[Extract] = Field(list(METHODS), min_length=1, description="exact_match: answer extraction, first that finds one wins.")
    gold_extract: list[Extract] | None = Field(None, description="exact_match: how to read the gold field (GSM8K: `[hash]`); default: the "
                                               "gold field is the answer.")
    max_samples: int | None = Field(
        None, ge=1, description="Score N items (quick runs): a seeded random sample, stratified by gold label for classification "
        "(LegalBench files are sorted by label: their first N rows hold one class). Recorded in the report.",
    )
    sample_seed: int = Field(1234, description="Seed of the `max_samples` draw (the same items for base and tuned, and run to run).")

    @model_validator(mode="after")
    def _check(self) -> EvalTask:
        default, allowed = METRICS[self.type]
        if self.metric is None:
            self.metric = default
        elif self.metric not in allowed:
            raise ValueError(f"metric {self.metric!r} does not apply to {self.type}; choose from {', '.join(allowed)}")
        if self.type == "classification" and not self.labels:
            raise ValueError("classification needs `labels:` (the label set the output is constrained to)")
        if self.labels and len({normalise_label(x) for x in self.labels}) != len(self.labels):
            raise ValueError("labels must be distinct (compared lower-cased)")
        if self.prompt is not None and self.prompt_file is not None:
            raise ValueError("give `prompt` or `prompt_file`, not both")
        if self.num_fewshot and self.type == "perplexity":
            raise ValueError("num_fewshot does not apply to perplexity tasks")
        return self

    @property
    def source_label(self) -> str:
        """The data's name for reports and cards: the hub id, or the file name (never a local absolute path)."""
        if self.hub:
            return self.hub + (f"/{self.config}" if self.config else "") + f":{self.split}"
        return Path(self.path or "").name

    @property
    def higher_is_better(self) -> bool:
        return self.type != "perplexity"


LOWER_IS_BETTER = ("perplexity", "bits_per_byte")  # metrics shown with decimals and compared as a relative rise


class TaskFile(Section):
    """A file of tasks for `finetune eval MODEL --tasks FILE`."""

    tasks: list[EvalTask] = Field(min_length=1, description="The tasks, scored in order.")

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[EvalTask]) -> list[EvalTask]:
        return unique_names(tasks)


def unique_names(tasks: list[EvalTask]) -> list[EvalTask]:
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"task names must be unique; repeated: {dupes}")
    return tasks


def load_task_file(path: str | Path) -> tuple[list[EvalTask], Path]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: task file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot read the task file ({e})") from None
    if isinstance(data, list):
        data = {"tasks": data}
    if isinstance(data, dict) and "tasks" not in data and isinstance(data.get("eval"), dict):
        data = {"tasks": data["eval"].get("tasks") or []}  # a recipe: its eval tasks
    if not isinstance(data, dict):
        raise DataError(f"{path}: a task file is a mapping with `tasks: [...]`")
    try:
        return TaskFile.model_validate(data).tasks, path.resolve().parent
    except ValidationError as e:
        raise DataError(explain(e, str(path), TaskFile, "task file")) from None


# --------------------------------------------------------------------------------------------------
# Items


@dataclass
class Item:
    """One scored unit. `prompt` is the full text before the answer (template applied); `choices` the scored
    continuations (multiple_choice, classification); `gold` the index of the right choice, or the gold answer string."""

    id: str
    prompt: str
    gold: Any
    choices: list[str] = field(default_factory=list)
    segments: list[tuple[str, bool]] = field(default_factory=list)  # perplexity: (text, scored)
    encoded: dict[str, Any] | None = None  # perplexity on rows prepare already tokenised: {input_ids, labels}
    row: int = 0


def normalise_label(s: Any) -> str:
    """LegalBench's evaluation compares lower-cased, stripped strings."""
    return re.sub(r"\s+", " ", str(s)).strip().lower()


_PLACEHOLDER = re.compile(r"\{\{\s*([\w.-]+)\s*\}\}")


def render(template: str, row: dict[str, Any], where: str) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in row:
            close = did_you_mean(key, [k for k in row if not k.startswith("_")])
            hint = f"; did you mean '{{{{{close}}}}}'?" if close else f"; fields: {', '.join(k for k in row if not k.startswith('_'))}"
            raise DataError(f"{where}: the prompt names {{{{{key}}}}}, which the rows do not have{hint}")
        v = row[key]
        return "\n".join(str(x) for x in v) if isinstance(v, list) else str(v)

    return _PLACEHOLDER.sub(sub, template)


def _get(raw: dict[str, Any], column: str) -> Any:
    """A column, or a dotted path into nested records (`context.contexts`, `options.A`)."""
    if column in raw or "." not in column:
        return raw.get(column)
    v: Any = raw
    for part in column.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def _has(columns: list[str], raw: dict[str, Any], column: str) -> bool:
    return column in columns or ("." in column and column.split(".", 1)[0] in columns and _get(raw, column) is not None)


def _rows(loc: Location, task: EvalTask, base_dir: Path, limit: int | None) -> list[tuple[int, dict[str, Any]]]:
    """The mapped rows of a location, in file order, after id selection."""
    from data_prep.sources.load import id_selector, open_source

    where = f"task {task.name}: {loc.origin}"
    opened = open_source(loc, base_dir)
    mapping = dict(task.fields)
    selected = id_selector(loc, base_dir, where)
    out: list[tuple[int, dict[str, Any]]] = []
    checked = False
    for n, raw in opened.rows:
        if not isinstance(raw, dict):
            raise DataError(f"{where} row {n}: {raw if isinstance(raw, Exception) else 'not an object'}")
        if not checked:
            columns = opened.columns or list(raw)
            wanted = list(mapping.values()) + list(task.choice_columns or [])
            for theirs in wanted:
                if not _has(columns, raw, theirs):
                    close = did_you_mean(theirs, columns)
                    hint = f"did you mean '{close}'?" if close else f"columns: {', '.join(columns[:20])}"
                    raise DataError(f"{where}: the task maps onto column '{theirs}', which the data does not have; {hint}")
            row0 = {**raw, **{k: _get(raw, v) for k, v in mapping.items()}}
            missing = [k for k in REQUIRED[task.type] if k not in row0]
            if task.type == "multiple_choice" and not task.choice_columns and "choices" not in row0:
                missing.append("choices")
            if task.type == "perplexity" and not ({"text", "output", "messages"} & row0.keys()):
                missing.append("text")
            if missing:
                raise DataError(f"{where}: rows have columns [{', '.join(columns[:20])}] but no {', '.join(repr(m) for m in missing)}; "
                                f"map with `fields: {{{missing[0]}: <column>}}`")
            checked = True
        row = {**raw, **{k: _get(raw, v) for k, v in mapping.items()}}
        if task.choice_columns:
            row["choices"] = [_get(raw, c) for c in task.choice_columns]
        if selected is not None and not selected(row, n):
            continue
        out.append((n, row))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{where}: no rows to evaluate")
    return out


def _gold_index(row: dict[str, Any], choices: list[str], where: str) -> int:
    ans = row.get("answer")
    if isinstance(ans, bool):
        ans = None
    if isinstance(ans, int) or (isinstance(ans, str) and ans.strip().isdigit()):
        i = int(ans)
        if 0 <= i < len(choices):
            return i
    elif isinstance(ans, str):
        a = ans.strip()
        if len(a) == 1 and a.upper() in LETTERS[: len(choices)]:
            return LETTERS.index(a.upper())
        texts = [normalise_label(c) for c in choices]
        if normalise_label(a) in texts:
            return texts.index(normalise_label(a))
    raise DataError(f"{where}: answer {ans!r} is not an index, a letter or the text of one of its {len(choices)} choices")


@dataclass
class Layout:
    """How one item reads before wrapping, and what is scored after it."""

    text: str  # the question as laid out
    input: str  # the alpaca `input` part ("" when none)
    choices: list[str]  # continuations (without delimiter)
    gold: Any
    gold_text: str  # the solved form used in few-shot examples


def _layout(task: EvalTask, prompt: str, row: dict[str, Any], where: str) -> Layout:
    text = render(prompt, row, where)
    inp = render(task.input, row, where) if task.input else ""
    if task.type == "multiple_choice":
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, (str, int, float)) for c in choices):
            raise DataError(f"{where}: `choices` must be a list of at least two options, got {str(choices)[:80]}")
        choices = [str(c) for c in choices]
        gold = _gold_index(row, choices, where)
        letters = list(LETTERS[: len(choices)])
        if task.style == "mmlu":
            text = text + "\n" + "\n".join(f"{l}. {c}" for l, c in zip(letters, choices)) + "\nAnswer:"
            return Layout(text, inp, letters, gold, letters[gold])
        if task.style == "biomistral":
            text = f"**Question:** {text}\n" + "\n".join(f"({l}) {c}" for l, c in zip(letters, choices)) + "\n**Answer:**("
            return Layout(text, inp, letters, gold, letters[gold])
        return Layout(text + "\nAnswer:", inp, choices, gold, choices[gold])
    if task.type == "classification":
        label = normalise_label(row.get("label"))
        labels = [normalise_label(x) for x in task.labels or []]
        if label not in labels:
            close = did_you_mean(label, labels)
            hint = f"; did you mean '{close}'?" if close else ""
            raise DataError(f"{where}: label {row.get('label')!r} is not in the task's labels {task.labels}{hint}")
        return Layout(text, inp, list(task.labels or []), labels.index(label), task.labels[labels.index(label)])
    gold = str(row.get("answer", ""))
    return Layout(text, inp, [], gold, gold)


def wrap(text: str, inp: str, template: str, tok=None, system_prompt: str | None = None) -> str:
    """The text before the answer, in the template training used (templates.py renders training rows the same way)."""
    from .templates import alpaca_prompt

    if template == "raw":
        return text + (f"\n\n{inp}" if inp else "")
    if template == "alpaca":
        return alpaca_prompt(text, inp)
    if tok is None or not getattr(tok, "chat_template", None):
        raise DataError("template `chat` needs a tokenizer with a chat template")
    msgs = [{"role": "user", "content": text + (f"\n\n{inp}" if inp else "")}]
    if system_prompt:
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def resolved_template(task: EvalTask, recipe_template: str | None) -> str:
    if task.template != "auto":
        return task.template
    return recipe_template or "raw"


def delimiter(task: EvalTask, template: str) -> str:
    if task.target_delimiter is not None:
        return task.target_delimiter
    if task.type == "multiple_choice" and task.style == "biomistral":
        return ""  # the layout ends with "(" and the letter follows directly
    return " " if template == "raw" else ""


def stops(task: EvalTask, template: str) -> list[str]:
    if task.stop is not None:
        return list(task.stop)
    if template == "alpaca":
        return ["### Instruction", "\n\n\n"]
    if template == "chat":
        return []  # the chat turn ends with the tokenizer's EOS / end-of-turn token
    return ["\n\n\n", "\n\nQuestion:", "\n\nQ:", "\n\nProblem:"]


def _prompt_text(task: EvalTask, base_dir: Path) -> str:
    if task.prompt_file:
        p = resolve_path(base_dir, task.prompt_file)
        try:
            return p.read_text(encoding="utf-8").rstrip("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"task {task.name}: prompt_file {p}: cannot read ({e})") from None
    if task.prompt is not None:
        return task.prompt
    return "{{text}}" if task.type == "classification" else "{{question}}"


def load_items(task: EvalTask, base_dir: Path, recipe_template: str | None = None, tok=None,
               system_prompt: str | None = None, info: dict[str, Any] | None = None) -> list[Item]:
    """The task's items (all, or the `max_samples` sample), fully rendered. Base and tuned get these exact strings.
    `info` receives how they were sampled."""
    rows = _rows(task, task, base_dir, None)
    template = resolved_template(task, recipe_template)
    if task.type == "perplexity":
        rows = [rows[i] for i in sample_indices(task, [None] * len(rows), info)]
        return _perplexity_items(task, rows, template if template != "raw" else "alpaca", tok, system_prompt)
    prompt = _prompt_text(task, base_dir)
    where = lambda n: f"task {task.name}: {task.origin} row {n}"  # noqa: E731
    layouts = [(n, row, _layout(task, prompt, row, where(n))) for n, row in rows]
    shots_pool: list[Layout] = []
    if task.num_fewshot:
        if task.fewshot is not None:
            pool = _rows(task.fewshot, task, base_dir, None)
            shots_pool = [_layout(task, prompt, r, f"task {task.name}: {task.fewshot.origin} row {n}") for n, r in pool]
        else:
            shots_pool = [lay for _, _, lay in layouts]
        if len(shots_pool) <= task.num_fewshot and task.fewshot is None:
            raise DataError(f"task {task.name}: num_fewshot={task.num_fewshot} needs more rows than the task's {len(shots_pool)}; "
                            "give a `fewshot:` dev split")
    delim = delimiter(task, template)
    shot_delim = delimiter(task, "raw")  # solved examples are prompt text: "A: Yes", whatever the template does after the prompt
    header = task.header if task.header is not None else (BIOMISTRAL_HEADER if task.style == "biomistral" and task.type == "multiple_choice" else None)
    labels = [normalise_label(lay.choices[lay.gold]) if task.type == "classification" else None for _, _, lay in layouts]
    items = []
    for k in sample_indices(task, labels, info):
        n, row, lay = layouts[k]
        parts = [header] if header else []
        if task.num_fewshot:
            # keyed by the item's place in the whole file: its shots do not change with the sample drawn around it
            rng = random.Random(f"{task.fewshot_seed}:{k}")
            candidates = [i for i in range(len(shots_pool)) if task.fewshot is not None or i != k]
            for i in rng.sample(candidates, task.num_fewshot):
                shot = shots_pool[i]
                parts.append(shot.text + (f"\n\n{shot.input}" if shot.input else "") + shot_delim + shot.gold_text)
        parts.append(lay.text)
        text = "\n\n".join(parts)
        full = wrap(text, lay.input, template, tok, system_prompt)
        rid = str(row.get("id", n))
        items.append(Item(id=rid, prompt=full, gold=lay.gold, choices=[delim + c for c in lay.choices], row=n))
    return items


def sample_indices(task: EvalTask, labels: list[str | None], info: dict[str, Any] | None = None) -> list[int]:
    """Which of the task's rows are scored, in file order: all of them, or `max_samples` drawn with `sample_seed`;
    for classification the draw is stratified by gold label (each label gets its share, largest remainders first, and
    at least one item while the sample has room). `info` receives what was done, for the report."""
    n = len(labels)
    k = task.max_samples
    if not k or k >= n:
        if info is not None:
            info.update(scored=n, of=n)
        return list(range(n))
    rng = random.Random(f"{task.sample_seed}:{task.name}")
    if task.type != "classification":
        picked = rng.sample(range(n), k)
        if info is not None:
            info.update(scored=k, of=n, seed=task.sample_seed, method="seeded random sample")
        return sorted(picked)
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(str(lab), []).append(i)
    order = sorted(groups)
    exact = {g: k * len(groups[g]) / n for g in order}
    take = {g: int(exact[g]) for g in order}
    if k >= len(order):  # room for every label: none left out
        for g in order:
            take[g] = max(take[g], 1)
    while sum(take.values()) > k:  # the minimum of one pushed past k: trim the largest
        g = max(order, key=lambda g: (take[g], g))
        take[g] -= 1
    for g in sorted(order, key=lambda g: (-(exact[g] - int(exact[g])), g)):
        if sum(take.values()) >= k:
            break
        if take[g] < len(groups[g]):
            take[g] += 1
    picked = [i for g in order for i in rng.sample(groups[g], min(take[g], len(groups[g])))]
    if info is not None:
        info.update(scored=len(picked), of=n, seed=task.sample_seed, method="seeded sample stratified by gold label",
                    per_label={g: take[g] for g in order})
    return sorted(picked)


def _perplexity_items(task: EvalTask, rows, template: str, tok, system_prompt: str | None) -> list[Item]:
    from data_prep.errors import RowError
    from data_prep.formats import normalise

    from .templates import TemplateError, segments

    items = []
    for n, row in rows:
        rid = str(row.get("id", n))
        if "output" not in row and "messages" not in row:
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"task {task.name}: row {n}: `text` must be a non-empty string")
            items.append(Item(id=rid, prompt="", gold=None, segments=[(text, True)], row=n))
            continue
        try:
            clean = normalise({k: v for k, v in row.items() if k in ("instruction", "input", "output", "messages")}, "auto")
            segs = segments(tok, clean, template, system_prompt)
        except (RowError, TemplateError) as e:
            raise DataError(f"task {task.name}: row {n}: {e}") from None
        items.append(Item(id=rid, prompt=segs[0][0], gold=None, segments=segs, row=n))
    return items


# What `task_texts` reads of a task: where its rows are and how they map. Only these go into the prepare stage's
# fingerprint, so changing how a task is scored (max_samples, prompt, shots) does not rebuild the data and retrain.
DECONTAMINATION_FIELDS = frozenset(set(Location.model_fields) - {"license"}) | {"name", "type", "fields", "choice_columns"}


def task_texts(task: EvalTask, base_dir: Path) -> list[str]:
    """What a task asks and answers, for decontaminating the training data against it."""
    from data_prep.formats import content_texts, normalise

    out, instruction_rows = [], []
    for _, row in _rows(task, task, base_dir, None):  # every item: whichever ones a run scores, none may be trained on
        if "output" in row or "messages" in row:
            # below: a task instruction shared by many rows is left out
            instruction_rows.append(normalise({k: v for k, v in row.items() if k in ("instruction", "input", "output", "messages")}, "auto"))
            continue
        for key in ("question", "text", "context"):
            v = row.get(key)
            if isinstance(v, str) and v.strip():
                out.append(v)
            elif isinstance(v, list):
                out.append("\n".join(str(x) for x in v))
        if task.type == "exact_match" and isinstance(row.get("answer"), str):
            out.append(row["answer"])
    return out + content_texts(instruction_rows)

