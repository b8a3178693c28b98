"""`finetune data build|validate|stats|scan|synth|pairs`: the data_prep package from the command line (pairs: from a run's SFT model). Importing this module
must not import torch (a local teacher imports it when used)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from data_prep.errors import DataError

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Build, check and synthesise instruction sets (Alpaca-style).")
synth_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Synthetic instructions from a teacher model.")
app.add_typer(synth_app, name="synth")

AdapterOpt = Annotated[Optional[str], typer.Option("--adapter", help="Public schema adapter: gsm8k, pubmedqa, legalbench, mmlu, sharegpt.")]
OptionOpt = Annotated[Optional[list[str]], typer.Option("--option", metavar="KEY=VALUE",
                                                       help="Adapter option KEY=VALUE (repeatable), e.g. --option boxed=true.")]
FieldOpt = Annotated[Optional[list[str]], typer.Option("--field", metavar="OURS=THEIRS",
                                                      help="Column mapping OURS=THEIRS (repeatable), e.g. --field instruction=question.")]
FormatOpt = Annotated[str, typer.Option("--format", help="Row layout: auto, alpaca, messages, text.")]
ReaderOpt = Annotated[str, typer.Option("--reader", help="auto, jsonl, json, csv, tsv, parquet, documents, hf_disk.")]
TokOpt = Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer (Hub id or folder) to count tokens with.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars on stderr.")]


def _pairs(items: list[str] | None, what: str) -> dict[str, Any]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise DataError(f"{what} {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
    return out


def _file_source(file: Path, adapter, option, field, fmt, reader):
    from pydantic import ValidationError

    from data_prep.schema import explain
    from data_prep.spec import Source

    spec = {"path": str(file.resolve()), "format": fmt, "reader": reader, "fields": {k: str(v) for k, v in _pairs(field, "--field").items()}}
    if adapter:
        spec.update(adapter=adapter, options=_pairs(option, "--option"))
    try:
        return Source.model_validate(spec)
    except ValidationError as e:
        raise DataError(explain(e, str(file), Source, "source options")) from None


def _token_counter(tokenizer: str | None, template: str = "alpaca", system_prompt: str | None = None):
    """A row's length in tokens as training will see it (the template rendered, EOS included)."""
    if not tokenizer:
        return None
    from .errors import UserError
    from .models import Loader, load_tokenizer
    from .templates import row_encoder

    try:
        tok = load_tokenizer(tokenizer, Loader.plain(tokenizer, "--tokenizer"))  # the loader a run uses, pad fix included
    except UserError:
        raise
    except Exception as e:
        raise DataError(f"--tokenizer {tokenizer}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    enc = row_encoder(tok, template, system_prompt)

    def count(row):
        if "text" in row:
            return len(tok(row["text"], add_special_tokens=False)["input_ids"])
        return len(enc(row).input_ids)

    return count


@app.command()
def build(spec: Annotated[Path, typer.Argument(metavar="SPEC_OR_RECIPE",
                                               help="A data spec YAML (name:, sources:, quality: ...) or a recipe (its data: section).")],
          out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default built/<name>/).")] = None,
          set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE",
                                                            help="Override a value: --set quality.dedupe=exact (repeatable).")] = None,
          tokenizer: TokOpt = None, progress: ProgressOpt = True,
          rejects: Annotated[Optional[str], typer.Option("--rejects", metavar="keep|redacted",
                                                         help="rejects.jsonl reasons as written (keep) or scanned for personal data and "
                                                              "redacted (redacted); default: quality.pii.rejects.")] = None) -> None:
    """Build an instruction set: train.jsonl, val.jsonl, rejects.jsonl, provenance.json, datacard.md, lengths.png."""
    from pydantic import ValidationError

    from data_prep.build import build as run_build
    from data_prep.schema import explain
    from data_prep.spec import BuildSpec

    from .recipe import _yaml_load, apply_overrides

    data = apply_overrides(_yaml_load(spec), set_ or [])
    base_dir = spec.resolve().parent
    eval_sets: list[tuple[str, list[str]]] = []
    if "base_model" in data:  # a recipe: its data section, decontaminated against its eval tasks like the prepare stage
        from .prepare import decontamination_sets
        from .recipe import parse_recipe

        recipe = parse_recipe(data, str(spec))
        eval_sets = decontamination_sets(recipe, base_dir)
        data = {"name": recipe.name, **recipe.data.model_dump()}
    try:
        bspec = BuildSpec.model_validate(data)
    except ValidationError as e:
        raise DataError(explain(e, str(spec), BuildSpec, "data spec")) from None
    if rejects is not None:
        if rejects not in ("keep", "redacted"):
            raise DataError(f"--rejects {rejects!r}: keep or redacted")
        pii = bspec.quality.pii.model_copy(update={"rejects": rejects})
        bspec = bspec.model_copy(update={"quality": bspec.quality.model_copy(update={"pii": pii})})
    tok_name = tokenizer or bspec.tokenizer
    counter = _token_counter(tok_name, bspec.template, bspec.system_prompt)
    built = run_build(bspec, base_dir, out or Path("built") / bspec.name, token_len=counter, tokenizer_name=tok_name, progress=progress,
                      eval_sets=eval_sets)
    rate = built.rows_read / built.seconds if built.seconds else 0
    typer.secho(f"{bspec.name}: {built.rows_read} rows read, {built.train} train, {built.val} val, {built.rejected} rejected "
                f"in {built.seconds:.1f} s ({rate:,.0f} rows/s)", err=True)
    typer.echo(str(built.out))


def _read(file, adapter, option, field, fmt, reader, progress):
    from data_prep.sources.load import load_source

    src = _file_source(file, adapter, option, field, fmt, reader)
    return load_source(src, Path.cwd(), progress)


@app.command()
def validate(file: Annotated[Path, typer.Argument(metavar="FILE", help="A data file or folder.")], adapter: AdapterOpt = None, option: OptionOpt = None,
             field: FieldOpt = None, fmt: FormatOpt = "auto", reader: ReaderOpt = "auto", tokenizer: TokOpt = None,
             max_length: Annotated[int, typer.Option("--max-length", help="With --tokenizer: longest row in tokens.")] = 2048,
             rejects: Annotated[Optional[Path], typer.Option("--rejects", help="Write the rejected rows (row number + reason) here.")] = None,
             progress: ProgressOpt = False) -> None:
    """Check every row (fields, types, UTF-8, duplicate ids, length); exit 2 when any row is invalid."""
    from data_prep.build import write_jsonl

    loaded = _read(file, adapter, option, field, fmt, reader, progress)
    bad = list(loaded.rejects)
    count = _token_counter(tokenizer)
    if count:
        from data_prep.errors import RowError
        from data_prep.rejects import reject_row

        for r in loaded.rows:
            try:
                n = count(r)
            except RowError as e:
                bad.append(reject_row(r, "invalid", str(e)))
                continue
            if n > max_length:
                bad.append(reject_row(r, "overlong", f"{n} tokens > {max_length}"))
    bad.sort(key=lambda r: r["row"])
    if rejects:
        write_jsonl(rejects, bad)
    typer.echo(f"{file}: {loaded.read} rows read, {loaded.read - len(bad)} valid, {len(bad)} invalid")
    for reason, n in Counter(r["reason"].split(" (")[0] for r in bad).most_common(10):
        rows = [str(r["row"]) for r in bad if r["reason"].split(" (")[0] == reason][:5]
        typer.echo(f"  {n:6d} × {reason}  (rows {', '.join(rows)}{' …' if n > 5 else ''})")
    if bad:
        raise typer.Exit(2)


def _mapped(adapter, field, fmt) -> bool:
    return bool(adapter or field or fmt != "auto")


def _echo_profile(file: Path, prof: dict[str, Any]) -> None:
    typer.echo(f"{file}: {prof['rows']} rows" + (f", {prof['invalid']} unreadable" if prof["invalid"] else ""))
    for name, c in prof["columns"].items():
        kinds = "/".join(c["types"])
        line = f"  {name}: {kinds}, filled {c['fill_rate']:.0%}"
        if "words" in c:
            w, ch = c["words"], c["chars"]
            line += f"; words mean {w['mean']}, median {w['median']}, p95 {w['p95']}, max {w['max']} ({ch['mean']} chars on average)"
        if "values" in c:
            line += "; values " + ", ".join(f"{k!r} {v}" for k, v in c["values"].items())
        elif "distinct" in c:
            line += f"; {c['distinct']} distinct"
        if "keys" in c:
            line += f"; keys {', '.join(c['keys'])}"
        typer.echo(line)
    for h in prof["hints"]:
        typer.echo(f"  looks like {h}")


@app.command()
def stats(file: Annotated[Path, typer.Argument(metavar="FILE", help="A data file or folder.")], adapter: AdapterOpt = None, option: OptionOpt = None,
          field: FieldOpt = None, fmt: FormatOpt = "auto", reader: ReaderOpt = "auto", tokenizer: TokOpt = None,
          png: Annotated[Optional[Path], typer.Option("--png", help="Write a length histogram here.")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False, progress: ProgressOpt = False) -> None:
    """Any file: rows, columns with types, fill rates and text lengths. With a mapping (--adapter, --field, --format) or a file
    already in a layout finetune reads: also counts, lengths, duplicates, personal-data findings and label balance as finetune reads it."""
    from data_prep.profile import profile
    from data_prep.sources.readers import open_path

    result: dict[str, Any] = {"file": str(file)}
    if not _mapped(adapter, field, fmt):
        result["raw"] = profile(open_path(file, reader))
    try:
        result["mapped"] = _mapped_stats(file, adapter, option, field, fmt, reader, tokenizer, png, progress)
    except DataError as e:
        if _mapped(adapter, field, fmt):
            raise
        result["mapped"] = None
        result["mapping_needed"] = str(e)
    if as_json:
        if _mapped(adapter, field, fmt):  # with a mapping, the keys stay at the top as before
            result = {"file": result["file"], **result["mapped"]}
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    if "raw" in result:
        _echo_profile(file, result["raw"])
    m = result["mapped"]
    if m is None:
        typer.echo(f"  as finetune reads it: needs a mapping ({result['mapping_needed'].split(': ', 1)[-1]})")
        return
    L = m["lengths"]
    typer.echo(f"{file} as finetune reads it: {m['rows_read']} rows read, {m['valid']} valid, {m['invalid']} invalid; layouts {m['layouts']}")
    if L["n"]:
        typer.echo(f"  length ({m['length_unit']}): mean {L['mean']}, min {L['min']}, median {L['median']}, p95 {L['p95']}, max {L['max']}")
    typer.echo(f"  with input: {m['with_input']}; exact duplicates: {m['exact_duplicates']}")
    pii = m["pii"]
    typer.echo(f"  personal data: {pii['rows']} rows ({', '.join(f'{k} {v}' for k, v in sorted(pii['findings'].items())) or 'none'})")
    if m["labels"]:
        typer.echo("  outputs: " + ", ".join(f"{k!r} {v}" for k, v in m["labels"].items()))


def _mapped_stats(file, adapter, option, field, fmt, reader, tokenizer, png, progress) -> dict[str, Any]:
    from data_prep.datacard import histogram, lengths
    from data_prep.formats import normalised_hash, row_texts
    from data_prep.quality.pii import Scanner

    loaded = _read(file, adapter, option, field, fmt, reader, progress)
    rows = loaded.rows
    count = _token_counter(tokenizer) or (lambda r: sum(len(t.split()) for t in row_texts(r)))
    unit = "tokens" if tokenizer else "words"
    lens = lengths([count(r) for r in rows])
    hashes = Counter(normalised_hash(r) for r in rows)
    pii: Counter = Counter()
    pii_rows = 0
    for _, found in Scanner().scan_rows(rows):
        pii.update(found.counts)
        pii_rows += bool(found)
    layouts = Counter("messages" if "messages" in r else "text" if "text" in r else "alpaca" for r in rows)
    outputs = Counter(r["output"].strip() for r in rows if "output" in r)
    labels = dict(outputs.most_common(20)) if rows and len(outputs) <= 20 else None  # a classification set: show its balance
    if png:
        histogram(png, {"train": lens, "val": lengths([]), "unit": unit}, f"{file.name}: lengths")
    return {"rows_read": loaded.read, "valid": len(rows), "invalid": len(loaded.rejects), "layouts": dict(layouts),
            "with_input": sum(1 for r in rows if r.get("input")), "exact_duplicates": sum(n - 1 for n in hashes.values()),
            "length_unit": unit, "lengths": {k: v for k, v in lens.items() if k != "values"},
            "pii": {"rows": pii_rows, "findings": dict(pii)}, "labels": labels}


KindsOpt = Annotated[Optional[list[str]], typer.Option("--kind", help="Only these kinds (repeatable); default all (docs/pii.md).")]


@app.command()
def scan(file: Annotated[Path, typer.Argument(metavar="FILE", help="A data file or folder.")], adapter: AdapterOpt = None, option: OptionOpt = None,
         field: FieldOpt = None, fmt: FormatOpt = "auto", reader: ReaderOpt = "auto", kind: KindsOpt = None,
         ner: Annotated[str, typer.Option("--ner", help="auto (an installed spaCy pipeline), off, or a pipeline's name or folder.")] = "auto",
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False, progress: ProgressOpt = False) -> None:
    """Personal data in a file, per kind: how many findings, in which columns and rows (row numbers, never the values).
    Without a mapping every string of every row is read; with one (--adapter, --field, --format), the fields finetune trains on."""
    from data_prep.profile import scan_raw, scan_rows
    from data_prep.quality.pii import KINDS, Scanner, row_fields
    from data_prep.quality.pii.ner import load as load_ner
    from data_prep.schema import did_you_mean
    from data_prep.sources.readers import open_path

    for k in kind or []:
        if k not in KINDS:
            close = did_you_mean(k, list(KINDS))
            raise DataError(f"--kind {k!r} is not a kind of personal data{f'; did you mean {close!r}?' if close else ''} (kinds: {', '.join(KINDS)})")
    recogniser, ner_line = load_ner(ner)
    scanner = Scanner(kind or KINDS, "redact", recogniser)
    if _mapped(adapter, field, fmt):  # the fields finetune trains on, as the build scans them
        loaded = _read(file, adapter, option, field, fmt, reader, progress)
        rows = ((r["_row"], [(key if i is None else f"{key}[{i}].content", r[key] if i is None else r[key][i]["content"])
                             for key, i in row_fields(r)]) for r in loaded.rows)
        result = {**scan_rows(rows, scanner), "invalid": len(loaded.rejects)}
    else:
        result = scan_raw(open_path(file, reader), scanner)
    result = {"file": str(file), **result, "names": ner_line if recogniser else f"titles, labels and role words only ({ner_line})"}
    if as_json:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    typer.echo(f"{file}: {result['rows']} rows scanned, {result['rows_with_findings']} with personal data")
    if not result["kinds"]:
        typer.echo("  no personal data found")
    for k, v in result["kinds"].items():
        where = f" in {', '.join(v['columns'])}"
        more = " …" if v["rows"] > len(v["row_numbers"]) else ""
        typer.echo(f"  {k}: {v['findings']} findings in {v['rows']} rows{where} (rows {', '.join(map(str, v['row_numbers']))}{more})")
    typer.echo(f"  names: {result['names']}")


TeacherOpt = Annotated[str, typer.Option("--teacher", help="OpenAI-compatible endpoint (http://HOST:PORT/v1) or local:PATH (a transformers model).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Model name the endpoint serves.")]
KeyEnvOpt = Annotated[str, typer.Option("--api-key-env", help="Environment variable holding the API key (never a flag: keys stay out of shell history).")]
ApiOpt = Annotated[str, typer.Option("--api", help="chat (/chat/completions) or completions (/completions).")]
RetriesOpt = Annotated[int, typer.Option("--retries", help="Retries on network errors, 429 and 5xx, with exponential backoff.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output JSONL; rows are appended as they arrive and a rerun continues it.")]


def load_local_teacher(path: str):
    """A `local:PATH` teacher through the loader every command uses (remote code refused, pad token set, MoE unfused)."""
    from .models import Loader, load_model, load_tokenizer

    spec = Loader.plain(path, "--teacher local:")
    return load_tokenizer(path, spec), load_model(path, spec, quantized=False)


def _teacher(teacher: str, model: str | None, api_key_env: str, api: str, retries: int):
    from data_prep.synth.teacher import make_teacher

    try:
        return make_teacher(teacher, model, local_load=load_local_teacher, api=api, api_key_env=api_key_env, retries=retries)
    except ValueError as e:
        raise DataError(str(e)) from None


@synth_app.command("self-instruct")
def self_instruct(seeds: Annotated[Path, typer.Option("--seeds", help="Seed tasks JSONL ({instruction, instances: [{input, output}]}).")],
                  out: OutOpt, teacher: TeacherOpt, model: ModelOpt = None,
                  prompt: Annotated[Optional[Path], typer.Option("--prompt", help="Generation prompt (default: prompt.txt beside the seeds).")] = None,
                  num: Annotated[int, typer.Option("--num", help="Tasks to keep.")] = 100,
                  seed: Annotated[int, typer.Option("--seed", help="Seed of the seed-task sampling.")] = 42,
                  temperature: Annotated[float, typer.Option("--temperature", help="Alpaca: 1.0.")] = 1.0,
                  max_requests: Annotated[Optional[int], typer.Option("--max-requests", help="Stop after this many requests in all.")] = None,
                  api: ApiOpt = "chat", api_key_env: KeyEnvOpt = "OPENAI_API_KEY", retries: RetriesOpt = 4, progress: ProgressOpt = True) -> None:
    """Alpaca's self-instruct: new tasks from seed tasks, keyword filters and ROUGE-L < 0.7 novelty."""
    from data_prep.synth.selfinstruct import load_seeds
    from data_prep.synth.selfinstruct import self_instruct as run

    prompt = prompt or seeds.parent / "prompt.txt"
    try:
        header = prompt.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{prompt}: cannot read the generation prompt ({e}); pass --prompt") from None
    result = run(_teacher(teacher, model, api_key_env, api, retries), load_seeds(seeds), header, out, num=num, seed=seed,
                 temperature=temperature, max_requests=max_requests, progress=progress)
    typer.echo(json.dumps(result, indent=2))


@synth_app.command("grounded")
def grounded(docs: Annotated[Path, typer.Option("--docs", help="Folder of .txt/.md domain documents.")], out: OutOpt, teacher: TeacherOpt,
             model: ModelOpt = None, domain: Annotated[str, typer.Option("--domain", help="Named in the prompt (legal, medical ...).")] = "domain",
             per_chunk: Annotated[int, typer.Option("--per-chunk", help="Pairs asked per chunk.")] = 3,
             chunk_words: Annotated[int, typer.Option("--chunk-words", help="Words per chunk.")] = 350,
             min_grounding: Annotated[float, typer.Option("--min-grounding", help="Share of answer words that must occur in the chunk.")] = 0.5,
             limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N chunks.")] = None,
             api: ApiOpt = "chat", api_key_env: KeyEnvOpt = "OPENAI_API_KEY", retries: RetriesOpt = 4, progress: ProgressOpt = True) -> None:
    """Instruction/answer pairs grounded in chunks of your documents (SaulLM-style)."""
    from data_prep.synth.grounded import grounded as run

    result = run(_teacher(teacher, model, api_key_env, api, retries), docs, out, domain=domain, per_chunk=per_chunk,
                 chunk_words=chunk_words, min_grounding=min_grounding, limit=limit, progress=progress)
    typer.echo(json.dumps(result, indent=2))


@app.command("pairs")
def pairs(run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run whose sft stage is done.")], out: OutOpt,
          k: Annotated[int, typer.Option("--k", help="Answers sampled per prompt.")] = 4,
          method: Annotated[str, typer.Option("--method", help="checker (answers checked like the eval's exact match), judge (the teacher "
                                                                "picks the better of two), or auto: checker when the recipe has an "
                                                                "exact_match task.")] = "auto",
          teacher: Annotated[Optional[str], typer.Option("--teacher", help="For judge: an OpenAI-compatible endpoint (http://HOST:PORT/v1) "
                                                                            "or local:PATH.")] = None,
          model: ModelOpt = None,
          split: Annotated[str, typer.Option("--split", help="Prompts from RUN/data/train.jsonl or val.jsonl.")] = "train",
          limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N prompts.")] = None,
          max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Cap on each sampled answer.")] = 256,
          temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature (1.0 gives varied answers).")] = 1.0,
          seed: Annotated[int, typer.Option("--seed", help="Sampling seed (per prompt: seed + the prompt's hash).")] = 0,
          gold_if_none: Annotated[bool, typer.Option("--gold-if-none", help="checker: when no sample is right, the row's reference "
                                                                             "solution is the chosen answer.")] = False,
          api: ApiOpt = "chat", api_key_env: KeyEnvOpt = "OPENAI_API_KEY", retries: RetriesOpt = 4, progress: ProgressOpt = True) -> None:
    """Preference pairs from the run's own SFT model: k sampled answers per training prompt, paired by the answer checker
    (rejection sampling) or by a teacher judging two of them. Resumable: a rerun continues OUT."""
    from .selfpairs import make_pairs

    if method not in ("auto", "checker", "judge"):
        raise DataError(f"--method {method!r}: use auto, checker or judge")
    if split not in ("train", "val"):
        raise DataError(f"--split {split!r}: use train or val")
    judge = _teacher(teacher, model, api_key_env, api, retries) if teacher else None
    result = make_pairs(run_dir, out, k=k, method=method, teacher=judge, split=split, limit=limit, max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=seed, gold_if_none=gold_if_none, progress=progress)
    typer.echo(json.dumps(result, indent=2))
