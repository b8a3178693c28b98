"""data_prep: readers, adapters, validation, quality filters, splits and documentation, on rows written here and
on the real files in ../shared/datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.build import build, collect
from data_prep.errors import DataError
from data_prep.sources.load import load_source
from data_prep.spec import BuildSpec, Source

from .conftest import ROOT


def spec(**kw) -> BuildSpec:
    kw.setdefault("name", "t")
    kw.setdefault("min_rows", 1)  # tiny test data; the default guards real builds
    return BuildSpec.model_validate(kw)


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def alpaca(i: int, **kw) -> dict:
    return {"instruction": f"Explain clause number {i} of the lease in plain words for a tenant", "input": "",
            "output": f"Clause {i} says the tenant must give notice {i} days before leaving and pay until then.", **kw}


def test_import_data_prep_does_not_import_torch():
    code = ("import sys, data_prep, data_prep.build, data_prep.spec, data_prep.sources.load, data_prep.datacard, "
            "data_prep.synth.selfinstruct, data_prep.synth.grounded, finetune.data_cli; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --------------------------------------------------------------------------------------------------
# Readers


def test_every_reader_gives_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"What is clause {i}?", "answer": f"It is about notice period {i}."} for i in range(5)]
    jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text("question,answer\n" + "".join(f'"{r["question"]}","{r["answer"]}"\n' for r in rows))
    (tmp_path / "d.tsv").write_text("question\tanswer\n" + "".join(f'{r["question"]}\t{r["answer"]}\n' for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    fields = {"instruction": "question", "output": "answer"}
    want = [(r["question"], r["answer"]) for r in rows]
    for name in ("d.jsonl", "d.json", "d.csv", "d.tsv", "d.parquet", "disk"):
        got = load_source(Source(path=name, fields=fields), tmp_path)
        assert [(r["instruction"], r["output"]) for r in got.rows] == want, name
        assert got.read == 5 and not got.rejects


def test_documents_folder_and_keyed_json(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("# Lease\n\nThe tenant pays rent monthly.")
    (docs / "sub" / "b.txt").write_text("Notice is thirty days.")
    (docs / "skip.pdf").write_bytes(b"%PDF")
    (docs / "bad.txt").write_bytes(b"caf\xe9")
    got = load_source(Source(path="docs", format="text"), tmp_path)
    assert [r["id"] for r in got.rows] == ["a.md", "sub/b.txt"]
    assert got.rejects == [{"source": "docs", "row": 2, "filter": "invalid", "reason": "bad.txt: invalid UTF-8 at byte 3"}]
    (tmp_path / "k.json").write_text(json.dumps({"111": {"instruction": "q1", "output": "a1"}, "222": {"instruction": "q2", "output": "a2"}}))
    (tmp_path / "ids.json").write_text(json.dumps({"222": "yes"}))
    got = load_source(Source(path="k.json", exclude_ids="ids.json"), tmp_path)
    assert [r["id"] for r in got.rows] == ["111"] and got.not_selected == 1


def test_mmlu_csv_without_header(tmp_path):
    (tmp_path / "law_test.csv").write_text('"Which court hears appeals?",Trial,Appellate,Small claims,Probate,B\n'
                                           '"Bad row",x,y,z,w,E\n')
    got = load_source(Source(path="law_test.csv", adapter="mmlu", options={"subject": "professional_law"}), tmp_path)
    assert got.rows[0]["output"] == "B" and "B. Appellate" in got.rows[0]["input"]
    assert "about professional law" in got.rows[0]["instruction"]
    assert got.rejects == [{"source": "law_test.csv", "row": 2, "filter": "invalid", "reason": "answer 'E' is not one of A, B, C, D"}]


def test_streaming_reads_rows_lazily(tmp_path):
    """A large file is not loaded whole: the JSONL reader yields the first row before the file is read to the end."""
    from data_prep.sources.readers import open_path

    path = jsonl(tmp_path / "big.jsonl", [alpaca(i) for i in range(2000)])
    opened = open_path(path, "auto")
    n, first = next(opened.rows)
    assert n == 1 and first["instruction"].startswith("Explain clause number 0")
    import inspect

    assert inspect.isgenerator(opened.rows)


# --------------------------------------------------------------------------------------------------
# Bad input: one clear message


def test_bad_input_messages(tmp_path):
    rows = [{"question": "q?", "answer": "a."}]
    jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.csv").write_text("question,answer\nq?,a.\n")
    with pytest.raises(DataError, match=r"fields.instruction names column 'qestion', which the data does not have; did you mean 'question'\?"):
        load_source(Source(path="d.csv", fields={"instruction": "qestion", "output": "answer"}), tmp_path)
    with pytest.raises(DataError, match=r"did you mean 'question'\?"):
        load_source(Source(path="d.jsonl", fields={"instruction": "qestion", "output": "answer"}), tmp_path)
    with pytest.raises(DataError, match=r"rows have columns \[question, answer\] but no 'instruction' or 'output'; map them"):
        load_source(Source(path="d.jsonl"), tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty source"):
        load_source(Source(path="empty.jsonl"), tmp_path)
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match="set `reader:`"):
        load_source(Source(path="x.xlsx"), tmp_path)
    (tmp_path / "broken.json").write_text('{"a": [1,')
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        load_source(Source(path="broken.json"), tmp_path)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_source(Source(path="bad.parquet"), tmp_path)
    with pytest.raises(ValueError, match="unknown adapter 'gsm8'; did you mean 'gsm8k'"):
        Source(path="d.jsonl", adapter="gsm8")
    with pytest.raises(ValueError, match="adapter 'gsm8k' has no option 'boxd'; did you mean 'boxed'"):
        Source(path="d.jsonl", adapter="gsm8k", options={"boxd": True})


def test_cli_bad_input_exits_2_with_one_message(tmp_path):
    (tmp_path / "d.csv").write_text("question,answer\nq?,a.\n")
    out = subprocess.run([sys.executable, "-m", "finetune.cli", "data", "validate", str(tmp_path / "d.csv"), "--field", "instruction=qustion",
                          "--field", "output=answer"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "did you mean 'question'?" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "spec.yaml").write_text("name: x\nsources: [{path: d.csv}]\nquality: {dedup: near}\n")
    out = subprocess.run([sys.executable, "-m", "finetune.cli", "data", "build", str(tmp_path / "spec.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "quality.dedup: unknown key; did you mean 'dedupe'?" in out.stderr


# --------------------------------------------------------------------------------------------------
# Validation with row numbers


def test_validation_rejects_with_row_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(alpaca(0, id="a")), json.dumps({"instruction": "", "output": "x"}), json.dumps({"instruction": "q", "output": 7}),
             json.dumps({"instruction": "q"}), "{oops", json.dumps(alpaca(1, id="a")), json.dumps({"instruction": "q \ud800", "output": "x"})]
    raw = "\n".join(lines).encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n' + json.dumps(alpaca(2)).encode() + b"\n"
    path.write_bytes(raw)
    got = load_source(Source(path="d.jsonl"), tmp_path)
    assert [(r["row"], r["reason"]) for r in got.rejects] == [
        (2, "empty field 'instruction'"), (3, "field 'output' is int, not a string"), (4, "missing field 'output'"),
        (5, "invalid JSON (Expecting property name enclosed in double quotes at column 2)"), (6, "duplicate id 'a' (first at row 1)"),
        (7, "invalid UTF-8 in field 'instruction'"), (8, "invalid UTF-8 (byte 20 of the line)")]
    assert [r["_row"] for r in got.rows] == [1, 9] and got.read == 9


def test_reject_threshold_stops_the_build_and_keeps_the_rejects(tmp_path):
    jsonl(tmp_path / "d.jsonl", [alpaca(i) for i in range(8)] + [{"instruction": "x"}] * 2)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"2 of 10 rows rejected \(20% > quality.max_reject_rate 10%\): missing field 'output' ×2"):
        build(spec(sources=[{"path": "d.jsonl"}]), tmp_path, out)
    assert [json.loads(l)["row"] for l in (out / "rejects.jsonl").read_text().splitlines()] == [9, 10]
    assert not (out / "train.jsonl").exists()
    b = build(spec(sources=[{"path": "d.jsonl"}], quality={"max_reject_rate": 0.25}), tmp_path, out)
    assert (b.train + b.val, b.rejected) == (8, 2)


def test_overlong_rows_counted_in_tokens(tmp_path):
    jsonl(tmp_path / "d.jsonl", [alpaca(i) for i in range(10)] + [alpaca(99, output="word " * 400)])
    s = spec(sources=[{"path": "d.jsonl"}], max_length=100, val_fraction=0)
    words = lambda r: len((r["instruction"] + " " + r["output"]).split())  # noqa: E731  (a stand-in tokenizer)
    got = collect(s, tmp_path, token_len=words)
    assert len(got.rows) == 10 and got.sources[0]["removed"]["overlong"] == 1
    assert got.rejects[0]["row"] == 11 and got.rejects[0]["reason"].endswith("tokens > max_length 100")
    with pytest.raises(DataError, match=r"d.jsonl row 11: \d+ tokens > max_length 100 \(overlong: error\)"):
        collect(s.model_copy(update={"overlong": "error"}), tmp_path, token_len=words)


# --------------------------------------------------------------------------------------------------
# Quality: planted duplicates, PII and test questions


def test_planted_exact_and_near_duplicates(tmp_path):
    rows = [alpaca(i) for i in range(20)]
    rows.append({**alpaca(3), "instruction": "  EXPLAIN clause number 3 of the lease in plain words for a TENANT "})  # exact after normalising
    story = ("The tenant must give written notice at least thirty days before the end of the month in which she plans to leave, "
             "and the landlord must return the deposit within two weeks of the keys being handed back, minus any repair costs "
             "that are documented with receipts and photographs taken at the final inspection of the flat.")
    rows[5] = {"instruction": "Summarise the lease terms.", "input": story, "output": "Notice thirty days; deposit back in two weeks."}
    rows.append({**rows[5], "input": story.replace("two weeks", "three weeks")})  # one word changed in 60
    jsonl(tmp_path / "d.jsonl", rows)
    got = collect(spec(sources=[{"path": "d.jsonl"}]), tmp_path)
    reasons = {r["row"]: (r["filter"], r["reason"]) for r in got.rejects}
    assert reasons[21] == ("exact_duplicate", "exact duplicate of d.jsonl row 4")
    assert reasons[22][0] == "near_duplicate" and reasons[22][1].startswith("near duplicate of d.jsonl row 6 (Jaccard 0.")
    assert len(got.rows) == 20 and len(got.rejects) == 2
    # The near filter is what caught row 22: with exact dedupe only, it stays.
    got = collect(spec(sources=[{"path": "d.jsonl"}], quality={"dedupe": "exact"}), tmp_path)
    assert len(got.rows) == 21


def test_shared_task_instruction_is_not_a_near_duplicate(tmp_path):
    task = "Classify the trademark on the distinctiveness spectrum. " * 6
    marks = ["Zentrix for shoes", "Blue Lake for water", "Speedy for couriers", "Apple for phones", "Salt for salt"]
    jsonl(tmp_path / "d.jsonl", [{"instruction": task, "input": m, "output": "fanciful"} for m in marks])
    got = collect(spec(sources=[{"path": "d.jsonl"}]), tmp_path)
    assert len(got.rows) == 5


PLANTED = {
    "email": "Write to the client at jane.roe@example.org about the filing.",
    "phone": "Call the ward on (555) 201-7788 before discharge.",
    "ssn": "Her SSN 123-45-6789 appears on the intake form.",
    "record_id": "Patient seen under MRN: 00483921 last week.",
    "date": "DOB: 04/12/1961, admitted for chest pain.",
    "name": "Dr. Helena Marsh reviewed the chart.",
}


def test_planted_pii_is_redacted_and_reported_without_text(tmp_path):
    rows = [alpaca(i) for i in range(10)] + [{"instruction": "Summarise the note.", "input": text, "output": "Summary of the note."}
                                             for text in PLANTED.values()]
    jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    build(spec(sources=[{"path": "d.jsonl"}], val_fraction=0), tmp_path, out)
    prov = json.loads((out / "provenance.json").read_text())
    pii = prov["quality"]["pii"]
    assert pii["findings"] == {k: 1 for k in PLANTED} and pii["rows"] == 6 and len(pii["row_ids_sha256"]) == 6
    written = (out / "train.jsonl").read_text() + (out / "provenance.json").read_text() + (out / "datacard.md").read_text()
    for kind, text in PLANTED.items():
        secret = {"email": "jane.roe@example.org", "phone": "201-7788", "ssn": "123-45-6789", "record_id": "00483921",
                  "date": "04/12/1961", "name": "Helena Marsh"}[kind]
        assert secret in text and secret not in written, kind
        assert f"[{kind.upper()}]" in (out / "train.jsonl").read_text()
    # flag keeps the text and lists the rows; drop removes them
    got = collect(spec(sources=[{"path": "d.jsonl"}], quality={"pii": {"action": "drop"}}), tmp_path)
    assert len(got.rows) == 10 and sum(r["filter"] == "pii" for r in got.rejects) == 6


def test_pii_patterns_leave_ordinary_numbers_alone():
    from data_prep.quality.pii import scan

    text = "She sold 48/2 = <<48/2=24>>24 clips in 2011-2012; a 3-4-5 triangle; 1,000,000 dollars at 12:30; medical record review."
    redacted, found = scan(text)
    assert redacted == text and not found.counts


def test_planted_test_questions_are_removed(tmp_path):
    evalset = [{"instruction": f"A farmer has {i} cows and buys {i + 3} more at the county market on a rainy Tuesday morning. How many cows now?",
                "input": "", "output": str(2 * i + 3)} for i in range(5)]
    jsonl(tmp_path / "test.jsonl", evalset)
    train = [alpaca(i) for i in range(10)] + [{"instruction": "Solve: " + evalset[2]["instruction"], "input": "", "output": "7 + 3 = 10"}]
    jsonl(tmp_path / "train.jsonl", train)
    s = spec(sources=[{"path": "train.jsonl"}], quality={"decontaminate": {"against": [{"path": "test.jsonl"}]}})
    got = collect(s, tmp_path)
    assert [(r["row"], r["filter"]) for r in got.rejects] == [(11, "contaminated")]
    assert got.quality["decontamination"]["by_eval_set"] == {"test.jsonl": 1}
    decontaminate = s.quality.decontaminate.model_copy(update={"action": "flag"})
    flag = collect(s.model_copy(update={"quality": s.quality.model_copy(update={"decontaminate": decontaminate})}), tmp_path)
    assert len(flag.rows) == 11 and len(flag.quality["decontamination"]["flagged_rows"]) == 1
    # 12 shared words are not enough at n = 13; n = 8 catches a shorter overlap
    short = [{"instruction": "county market on a rainy Tuesday morning bought cows", "input": "", "output": "ok then"}]
    jsonl(tmp_path / "short.jsonl", [alpaca(i) for i in range(10)] + short)
    assert len(collect(s.model_copy(update={"sources": [Source(path="short.jsonl")]}), tmp_path).rows) == 11


# --------------------------------------------------------------------------------------------------
# Split and documentation


def test_split_is_deterministic_and_order_free(tmp_path):
    rows = [alpaca(i) for i in range(40)]
    jsonl(tmp_path / "a.jsonl", rows)
    jsonl(tmp_path / "b.jsonl", rows[::-1])
    s = lambda p: spec(sources=[{"path": p}], val_fraction=0.2)  # noqa: E731
    a, b = build(s("a.jsonl"), tmp_path, tmp_path / "A"), build(s("b.jsonl"), tmp_path, tmp_path / "B")
    val = lambda d: sorted(json.loads(l)["output"] for l in (tmp_path / d / "val.jsonl").read_text().splitlines())  # noqa: E731
    assert (a.val, b.val) == (8, 8) and val("A") == val("B")


def test_provenance_datacard_and_histogram(tmp_path):
    jsonl(tmp_path / "d.jsonl", [alpaca(i) for i in range(30)] + [alpaca(1), {"instruction": "x"}])
    out = tmp_path / "out"
    b = build(spec(sources=[{"path": "d.jsonl", "license": "cc-by-nc-4.0"}], quality={"max_reject_rate": 0.5}), tmp_path, out)
    prov = json.loads((out / "provenance.json").read_text())
    src = prov["sources"][0]
    import hashlib

    assert src["sha256"] == hashlib.sha256((tmp_path / "d.jsonl").read_bytes()).hexdigest()
    assert (src["rows_read"], src["rows_kept"], src["removed"]["invalid"], src["removed"]["exact_duplicate"]) == (32, 30, 1, 1)
    assert src["license"] == "cc-by-nc-4.0"
    assert prov["splits"]["train"]["n"] + prov["splits"]["val"]["n"] == 30 == b.train + b.val
    card = (out / "datacard.md").read_text()
    assert "| d.jsonl | cc-by-nc-4.0 |" in card and "| 32 | 30 | 0 | 1 | 0 | 1 |" in card
    assert "Warning: non-commercial data" in card
    png = (out / "lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


# --------------------------------------------------------------------------------------------------
# Adapters


def test_adapters():
    from data_prep.errors import RowError
    from data_prep.sources.adapters import gsm8k, legalbench, mmlu, pubmedqa, sharegpt

    row = {"question": "Tom has 2 apples and buys 1,000 more. How many?", "answer": "2 + 1000 = <<2+1000=1002>>1002\n#### 1,002"}
    assert gsm8k(row)["output"] == "2 + 1000 = <<2+1000=1002>>1002\n#### 1,002"
    assert gsm8k(row, boxed=True, calculator=False)["output"] == "2 + 1000 = 1002\n\\boxed{1002}"
    with pytest.raises(RowError, match="no final '#### N' line"):
        gsm8k({"question": "q", "answer": "no marker"})
    p = pubmedqa({"QUESTION": "Does X help?", "CONTEXTS": ["Background.", "Results."], "final_decision": "Maybe", "LONG_ANSWER": "Unclear."})
    assert p["input"] == "Does X help?\n\nContext:\nBackground.\nResults." and p["output"] == "maybe. Unclear."
    assert pubmedqa({"QUESTION": "q", "final_decision": "no", "LONG_ANSWER": "x"}, contexts=False, long_answer=False)["output"] == "no"
    with pytest.raises(RowError, match="not yes, no or maybe"):
        pubmedqa({"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "perhaps", "LONG_ANSWER": "x"})
    assert legalbench({"text": "A said B.", "label": "Yes"}, instruction="Is there hearsay?") == {
        "instruction": "Is there hearsay?", "input": "A said B.", "output": "Yes"}
    m = mmlu({"question": "Q?", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "c"})
    assert m["output"] == "C" and m["input"] == "Q?\nA. a\nB. b\nC. c\nD. d"
    conv = {"conversations": [{"from": "gpt", "value": "Hi!"}, {"from": "human", "value": "Define tort."},
                              {"from": "gpt", "value": "A civil wrong."}, {"from": "human", "value": "Thanks"}]}
    assert sharegpt(conv, system="Be brief.")["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define tort."}, {"role": "assistant", "content": "A civil wrong."}]
    with pytest.raises(RowError, match="unknown speaker 'robot'"):
        sharegpt({"conversations": [{"from": "robot", "value": "x"}]})


# --------------------------------------------------------------------------------------------------
# Real data in ../shared/datasets


def test_gsm8k_build_counts(shared_datasets, tmp_path):
    g = shared_datasets / "gsm8k"
    s = spec(name="gsm8k", sources=[{"path": str(g / "train.jsonl"), "adapter": "gsm8k", "options": {"boxed": True}, "license": "mit"}],
             quality={"pii": {"action": "flag"}, "decontaminate": {"against": [{"path": str(g / "test.jsonl"), "adapter": "gsm8k"}]}})
    b = build(s, tmp_path, tmp_path / "out", progress=False)
    prov = json.loads((tmp_path / "out/provenance.json").read_text())
    src = prov["sources"][0]
    assert src["rows_read"] == 7473 and src["removed"]["invalid"] == 0
    # 11 training problems share a 13-gram with a test problem (e.g. train row 21 and a test problem both read
    # "bought stamps at the post office. Some of the stamps had a snowflake design ..."); no duplicates in GSM8K.
    assert src["removed"]["contaminated"] == 11 and src["removed"]["exact_duplicate"] == src["removed"]["near_duplicate"] == 0
    assert (b.train, b.val) == (7462 - 373, 373)  # val_fraction 0.05 of 7,462, capped by val_max 1000
    first = json.loads((tmp_path / "out/train.jsonl").read_text().splitlines()[0])
    assert first["output"].endswith("\\boxed{72}") and first["row"] == 1
    # GSM8K's word problems name people by title ("Mr. Sanchez") and have a 92-year-old (an age over 89 is an
    # identifier under Safe Harbor): flagged, not removed. Arithmetic ("3*30=90 years old") is not an age.
    assert prov["quality"]["pii"]["rows"] > 0 and set(prov["quality"]["pii"]["findings"]) == {"name", "age"}
    assert prov["quality"]["pii"]["findings"]["age"] == 1


def test_pubmedqa_build_counts(shared_datasets, tmp_path):
    p = shared_datasets / "pubmedqa"
    s = spec(name="pubmedqa", sources=[{"path": str(p / "ori_pqal.json"), "adapter": "pubmedqa", "exclude_ids": str(p / "test_ground_truth.json")}],
             quality={"decontaminate": {"against": [{"path": str(p / "ori_pqal.json"), "adapter": "pubmedqa",
                                                    "include_ids": str(p / "test_ground_truth.json")}]}})
    got = collect(s, tmp_path)
    src = got.sources[0]
    assert (src["rows_read"], src["not_selected"], src["rows_kept"]) == (1000, 500, 500)
    assert got.quality["decontamination"]["eval_items"] == 500 and got.quality["decontamination"]["overlapping_rows"] == 0
    labels = [r["output"].split(".")[0] for r in got.rows]
    test = set(json.loads((p / "test_ground_truth.json").read_text()))
    assert not {r["id"] for r in got.rows} & test
    # Planting the test split back into training is caught: all 500 test items overlap themselves.
    s2 = s.model_copy(update={"sources": [Source(path=str(p / "ori_pqal.json"), adapter="pubmedqa")]})
    assert collect(s2, tmp_path).quality["decontamination"]["overlapping_rows"] == 500
    assert labels.count("yes") + labels.count("no") + labels.count("maybe") == 500


def test_legalbench_build_counts(shared_datasets, tmp_path):
    lb = shared_datasets / "legalbench_prerelease"
    sources = [{"path": str(lb / t / "test.tsv"), "adapter": "legalbench", "options": {"prompt_file": str(lb / t / "base_prompt.txt")},
                "license": "cc-by-4.0"} for t in ("hearsay", "abercrombie")]
    got = collect(spec(sources=sources), tmp_path)
    assert [(s["rows_read"], s["rows_kept"]) for s in got.sources] == [(95, 95), (95, 95)]
    hearsay = got.rows[0]
    assert hearsay["instruction"].startswith("Hearsay is an out-of-court statement") and hearsay["instruction"].endswith("Is there hearsay?")
    assert {r["output"] for r in got.rows[95:]} == {"generic", "descriptive", "suggestive", "arbitrary", "fanciful"}
    # train.tsv rows planted into the training set are caught by decontamination against them
    planted = sources + [{"path": str(lb / "hearsay" / "train.tsv"), "adapter": "legalbench", "options": {"instruction": "Is there hearsay?"}}]
    s = spec(sources=planted, quality={"decontaminate": {"against": [{"path": str(lb / "hearsay" / "train.tsv"), "adapter": "legalbench",
                                                                        "options": {"instruction": "Is there hearsay?"}}], "min_words": 8}})
    got = collect(s, tmp_path)
    assert got.sources[2]["removed"]["contaminated"] == 5


def test_data_cli_build_validate_stats(shared_datasets, tmp_path):
    lb = shared_datasets / "legalbench_prerelease" / "hearsay"
    cmd = [sys.executable, "-m", "finetune.cli", "data"]
    out = subprocess.run(cmd + ["stats", str(lb / "test.tsv"), "--adapter", "legalbench", "--option", "instruction=Is there hearsay?", "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["valid"] == 95 and sum(st["labels"].values()) == 95 and set(st["labels"]) == {"Yes", "No"}
    out = subprocess.run(cmd + ["validate", str(lb / "test.tsv"), "--adapter", "legalbench", "--option", "instruction=x"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "95 rows read, 95 valid, 0 invalid" in out.stdout
    out = subprocess.run(cmd + ["validate", str(lb / "test.tsv"), "--adapter", "mmlu"], capture_output=True, text=True, cwd=ROOT)
    # MMLU's adapter reads header-less CSVs with its own 6 columns: every hearsay row is rejected, none lost
    assert out.returncode == 2 and "96 rows read, 0 valid, 96 invalid" in out.stdout and "has 3 fields, expected 6" in out.stdout
    build_math = cmd + ["build", str(ROOT / "recipes" / "math.yaml"), "--out", str(tmp_path / "m"), "--no-progress"]
    out = subprocess.run(build_math, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "hf://openai/gsm8k: cannot load the dataset" in out.stderr and "offline" in out.stderr
    local = ["--set", "data.sources=[{path: samples/math.jsonl}]", "--set", "data.quality.decontaminate.against=[{path: samples/math_eval.jsonl}]",
             "--set", "eval.tasks=[{name: t, type: exact_match, path: samples/math_test.jsonl, gold_extract: [hash]}]"]
    out = subprocess.run(build_math + local, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    prov = json.loads((tmp_path / "m" / "provenance.json").read_text())
    assert prov["name"] == "math-mistral-7b" and prov["quality"]["decontamination"]["overlapping_rows"] == 3
    assert "rows/s" in out.stderr and (tmp_path / "m" / "datacard.md").exists()


@pytest.mark.slow
def test_data_benchmark_script_runs(shared_datasets):
    """scripts/bench_data.py stays runnable (its timings are reported by hand, never asserted)."""
    out = subprocess.run([sys.executable, "scripts/bench_data.py", "--repeat", "1", "--shared", str(shared_datasets)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Rows: 7473 read, 7089 train, 373 val, 11 rejected (11 contaminated, 0 near duplicates)" in out.stdout
    assert "| near dedupe (MinHash LSH) |" in out.stdout


def test_data_build_counts_tokens_with_a_tokenizer(tmp_path):
    """`--tokenizer`: lengths in the tokenizer's tokens of the rendered Alpaca example, overlong rows rejected."""
    from finetune.smoke import build_tokenizer
    from finetune.templates import encode

    rows = [alpaca(i) for i in range(12)] + [alpaca(50, output="notice period " * 60)]
    jsonl(tmp_path / "d.jsonl", rows)
    tok = build_tokenizer([json.dumps(r) for r in rows])
    tok.save_pretrained(tmp_path / "tok")
    limit = max(len(encode(tok, {**r, "input": ""}, "alpaca").input_ids) for r in rows[:12])
    (tmp_path / "spec.yaml").write_text(f"name: t\nsources: [{{path: d.jsonl}}]\nmax_length: {limit}\nval_fraction: 0\nmin_rows: 1\n")
    out = subprocess.run([sys.executable, "-m", "finetune.cli", "data", "build", "spec.yaml", "--tokenizer", str(tmp_path / "tok"),
                          "--out", "out", "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    prov = json.loads((tmp_path / "out/provenance.json").read_text())
    assert prov["sources"][0]["removed"]["overlong"] == 1 and prov["length_unit"] == "tokens"
    assert prov["splits"]["train"]["max"] == limit and prov["max_length"] == limit


def test_hub_source_passes_id_config_split_and_revision(monkeypatch, tmp_path):
    """Hub sources go through datasets.load_dataset with the pinned revision, and provenance records it (a stand-in
    for load_dataset here: tests never touch the network)."""
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list([{"question": "Q1?", "answer": "A1 #### 3"}, {"question": "Q2?", "answer": "A2 #### 4"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    got = load_source(Source(hub="openai/gsm8k", config="main", split="test", revision="e53f048", adapter="gsm8k"), tmp_path)
    assert calls == [("openai/gsm8k", "main", "test", "e53f048")]
    assert [r["output"] for r in got.rows] == ["A1\n#### 3", "A2\n#### 4"]
    assert got.info["hub"] == "openai/gsm8k" and got.info["revision"] == "e53f048" and got.info["fingerprint"]


def test_quality_shorthands_from_design():
    """The short form users write: `quality: {dedupe: near, pii: redact, decontaminate: true}`; it means the full form."""
    q = spec(sources=[{"path": "x.jsonl"}], quality={"dedupe": "near", "pii": "flag", "decontaminate": False}).quality
    assert q.pii.action == "flag" and q.decontaminate.enabled is False and q.decontaminate.ngram == 13
    with pytest.raises(ValueError, match="pii.action"):
        spec(sources=[{"path": "x.jsonl"}], quality={"pii": "redacted"})
