"""Personal data: the detectors table, checksums, names, NER, pseudonyms, clean reports, and the data stats/scan
commands, on real rows of ../shared/datasets with values planted in layouts the table's examples do not use."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_prep.build import build, collect
from data_prep.errors import DataError
from data_prep.quality.pii import DETECTORS, KINDS, Scanner, checksums, scan
from data_prep.quality.pii.detectors import markdown_table
from data_prep.spec import BuildSpec

from .conftest import ROOT
from .pii_planted import CARD, IBAN_DE, NHS, NIR, PLANTED, TRICKY, clean_rows, host_texts, iban, luhn_digit, nhs_number, plant, vin


def spec(**kw) -> BuildSpec:
    return BuildSpec.model_validate({"name": "t", "min_rows": 1, **kw})


def jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# The table: every example found (the value gone, the rest of the text kept), every counter-example untouched


CASES = [(d.kind, ex) for d in DETECTORS for ex in d.examples]


@pytest.mark.parametrize("kind,example", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_every_table_example_is_found_as_its_kind(kind, example):
    text = example.replace("«", "").replace("»", "")
    values = re.findall("«(.*?)»", example, re.S)
    red, found = scan(text)
    assert found.counts[kind] >= 1, (example, red, dict(found.counts))
    for v in values:
        assert v not in red, (example, red)
    if len(values) == 1 and sum(found.counts.values()) == 1:  # exactly the value replaced, nothing around it
        before, after = example.split("«")[0], example.split("»")[1]
        assert red == f"{before}[{kind.upper()}]{after}"


NOT = [(d.kind, t) for d in DETECTORS for t in d.not_matched]


@pytest.mark.parametrize("kind,text", NOT, ids=[f"{k}-{i}" for i, (k, _) in enumerate(NOT)])
def test_every_table_counter_example_is_left_alone(kind, text):
    red, found = scan(text)
    assert red == text and not found, (text, red)


def test_checksum_counter_examples_differ_from_a_valid_id_by_one_character():
    """The counter-examples are near misses, so passing them proves the check digit is what decides."""
    assert scan("NHS number 943 476 5919")[1].counts["national_id"] == 1
    assert scan("NHS: 9434765918")[1].counts == Counter()
    assert scan("card 4111 1111 1111 1111")[1].counts["card"] == 1 and not scan("card 4111 1111 1111 1112")[1]
    assert scan("FR76 3000 6000 0112 3456 7890 189")[1].counts["iban"] == 1 and not scan("FR76 3000 6000 0112 3456 7890 188")[1]


def test_docs_table_is_the_code_table():
    """docs/pii.md shows the table the code runs (regenerate it with `python -m data_prep.quality.pii`)."""
    doc = (ROOT / "docs" / "pii.md").read_text(encoding="utf-8")
    assert markdown_table() in doc
    assert set(KINDS) == {d.kind for d in DETECTORS} and len(KINDS) == 18


# --------------------------------------------------------------------------------------------------
# Checksums against arithmetic written independently in tests/pii_planted.py


def test_checksums_accept_exactly_the_right_check_digit():
    rng = random.Random(0)
    for _ in range(200):
        body = "4" + "".join(rng.choice("0123456789") for _ in range(14))
        good = luhn_digit(body)
        assert [d for d in "0123456789" if checksums.luhn(body + d)] == [good]
        nine = "".join(rng.choice("0123456789") for _ in range(9))
        s = sum(int(c) * (10 - i) for i, c in enumerate(nine))
        if (11 - s % 11) % 11 != 10:
            ten = nhs_number(nine)
            assert [d for d in "0123456789" if checksums.nhs(ten[:9] + d)] == [ten[9]]
        body13 = rng.choice("12") + "".join(rng.choice("0123456789") for _ in range(12))
        key = 97 - int(body13) % 97
        assert checksums.nir(body13 + f"{key:02d}") and not checksums.nir(body13 + f"{(key % 97) + 1:02d}")
        bban = "".join(rng.choice("0123456789") for _ in range(18))
        good_iban = iban("DE", bban)
        assert checksums.iban(good_iban) and not checksums.iban(good_iban[:-1] + str((int(good_iban[-1]) + 1) % 10))
    assert checksums.nir(NIR) and checksums.nhs(NHS) and checksums.card(CARD) and checksums.iban(IBAN_DE)
    v = vin("1FTFW1EF1EKE57182")
    assert checksums.vin(v) and sum(checksums.vin(v[:8] + c + v[9:]) for c in "0123456789X") == 1
    # Corsica: 2A counts as 19, 2B as 18 in the key
    corsica = "1841218047058"
    assert checksums.nir("18412" + "2B" + "047058" + f"{97 - int(corsica) % 97:02d}")
    assert not checksums.ssn("000-12-3456") and not checksums.ssn("666-12-3456") and not checksums.ssn("912-12-3456")
    assert not checksums.ssn("123-00-4567") and not checksums.ssn("123-45-0000") and checksums.ssn("219-09-9999")


# --------------------------------------------------------------------------------------------------
# Planted into real rows: every value gone from train/val, no value in any report, clean rows untouched


def _written(out: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in out.iterdir() if p.suffix in (".jsonl", ".json", ".md")}


def test_planted_values_are_gone_and_reported_only_as_counts(shared_datasets, tmp_path):
    rows, truth = plant(shared_datasets)
    clean = clean_rows(shared_datasets)
    hosts = "\n".join(t for pool in host_texts(shared_datasets).values() for t in pool)
    assert not [s for _, _, secrets in PLANTED for s in secrets if s in hosts]  # a secret found later was planted, not already there
    jsonl(tmp_path / "notes.jsonl", rows + clean)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "finetune.cli", "data", "build", "spec.yaml", "--out", str(out), "--no-progress", "--rejects", "redacted"]
    (tmp_path / "spec.yaml").write_text("name: notes\nmin_rows: 1\nsources: [{path: notes.jsonl}]\nquality: {dedupe: exact}\n")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = _written(out)
    kept = [json.loads(line) for name in ("train.jsonl", "val.jsonl") for line in files[name].splitlines()]
    by_row = {r["row"]: r for r in kept}
    # Every planted row is still there (redacted, not dropped), and every secret is gone from it.
    recall: Counter = Counter()
    for i, (kind, secrets) in enumerate(truth, start=1):
        text = by_row[i]["input"]
        leaked = [s for s in secrets if s in text]
        assert not leaked, (kind, leaked, text)
        assert f"[{kind.upper()}" in text, (kind, text)
        recall[kind] += 1
    assert set(recall) == set(KINDS)
    # No secret in any file the build wrote, nor in what the command printed.
    everything = "\n".join(files.values()) + done.stdout + done.stderr
    for _, _, secrets in PLANTED:
        for s in secrets:
            assert s not in everything, s
    # The clean real rows and the tricky non-identifiers come through unchanged.
    for j, r in enumerate(clean, start=len(rows) + 1):
        assert by_row[j]["input"] == r["input"], r["input"]
    for t in TRICKY:
        assert t in files["train.jsonl"] + files["val.jsonl"]
    prov = json.loads(files["provenance.json"])
    pii = prov["quality"]["pii"]
    assert pii["rows"] == len(rows) and pii["rows_scanned"] == len(rows) + len(clean)
    assert set(pii["findings"]) == set(KINDS) and sum(pii["findings"].values()) >= len(rows)
    assert pii["rejects"] == "redacted" and pii["ner"] is None and "no named-entity recognition" in pii["names"]
    assert "Looked for: name, address" in files["datacard.md"] and "Names: titles, labels and role words" in files["datacard.md"]


def test_drop_and_flag_keep_values_out_of_reports(shared_datasets, tmp_path):
    rows, _ = plant(shared_datasets)
    rows = rows[::4]  # one layout per phrase
    jsonl(tmp_path / "d.jsonl", rows + [{"instruction": "Add 2 and 3.", "output": "5"}])
    for action in ("drop", "flag"):
        out = tmp_path / action
        build(spec(sources=[{"path": "d.jsonl"}], quality={"dedupe": "none", "pii": {"action": action}}, val_fraction=0), tmp_path, out)
        files = _written(out)
        reports = files["provenance.json"] + files["datacard.md"] + files["rejects.jsonl"]
        for _, _, secrets in PLANTED:
            for s in secrets:
                assert s not in reports, (action, s)
        rejects = [json.loads(line) for line in files["rejects.jsonl"].splitlines()]
        if action == "drop":
            assert len(rejects) == len(rows) and all(r["filter"] == "pii" and r["reason"].startswith("personal data: ") for r in rejects)
            assert [json.loads(line)["output"] for line in files["train.jsonl"].splitlines()] == ["5"]
        else:  # flag keeps the text as it is: that is what flag means, and publish refuses it
            assert not rejects and "O'Hara" in files["train.jsonl"]


def test_reject_reasons_quoting_a_value_are_redacted_on_request(tmp_path):
    """A duplicate id is quoted in its reason; with rejects: redacted the reason is scanned like a row."""
    rows = [{"id": "jane.roe@example.org", "instruction": f"Task {i}", "output": f"Answer {i}"} for i in range(2)]
    jsonl(tmp_path / "d.jsonl", rows + [{"instruction": "Task 3", "output": "Answer 3"}])
    got = collect(spec(sources=[{"path": "d.jsonl"}], quality={"max_reject_rate": 1.0}), tmp_path)
    assert "jane.roe@example.org" in got.rejects[0]["reason"]  # the comparison below can fail
    got = collect(spec(sources=[{"path": "d.jsonl"}], quality={"max_reject_rate": 1.0, "pii": {"rejects": "redacted"}}), tmp_path)
    assert got.rejects[0]["reason"] == "duplicate id '[EMAIL]' (first at row 1)"


def test_training_tokens_are_encoded_from_the_redacted_rows(tmp_path):
    """The length check encodes rows before the PII step; the tokens a run trains on must come from the redacted text
    (a cache of the raw text's encoding once travelled with the redacted copy: train.jsonl said [NAME], the tokens
    said O'Hara)."""
    from finetune.smoke import build_tokenizer
    from finetune.templates import row_encoder

    rows = [{"instruction": "Summarise the note.", "input": f"Mrs. Saoirse O'Hara (MRN 7734-229{i}) was seen on ward {i}.",
             "output": "Seen."} for i in range(6)]
    jsonl(tmp_path / "d.jsonl", rows)
    tok = build_tokenizer([r["input"] for r in rows] + ["Below is an instruction", "### Response:"])
    enc = row_encoder(tok, "alpaca")
    got = collect(spec(sources=[{"path": "d.jsonl"}], quality={"dedupe": "none"}), tmp_path, token_len=lambda r: len(enc(r).input_ids))
    assert len(got.rows) == 6
    for r in got.rows:
        assert "O'Hara" not in r["input"]
        trained_on = tok.decode(enc(r).input_ids)
        assert "[NAME]" in trained_on and "[RECORD_ID]" in trained_on
        assert "O'Hara" not in trained_on and "Saoirse" not in trained_on and "7734" not in trained_on, trained_on


# --------------------------------------------------------------------------------------------------
# Pseudonyms


def test_pseudonyms_are_consistent_within_and_across_rows_and_never_written(tmp_path):
    rows = [
        {"instruction": "Summarise.", "input": "Mrs. Siobhan O'Hara was admitted. O'Hara declined surgery; call 06 12 34 56 78.", "output": "Noted."},
        {"instruction": "Summarise.", "input": "Follow-up for Mrs. O'Hara with Dr Ioana Popescu-Vlad.", "output": "Dr Popescu-Vlad saw O'Hara."},
        {"instruction": "Summarise.", "input": "Mr. Hamish MacLeod phoned from 06 12 34 56 78 about Siobhan.", "output": "Noted."},
    ]
    jsonl(tmp_path / "d.jsonl", rows)
    outs = []
    for n in range(2):
        out = tmp_path / f"out{n}"
        build(spec(sources=[{"path": "d.jsonl"}], quality={"dedupe": "none", "pii": {"action": "pseudonymize"}}, val_fraction=0), tmp_path, out)
        outs.append(out)
    got = [json.loads(line) for line in (outs[0] / "train.jsonl").read_text().splitlines()]
    by = {r["row"]: r for r in got}
    assert by[1]["input"] == "Mrs. [NAME_1] was admitted. [NAME_1] declined surgery; call [PHONE_1]."
    assert by[2]["input"] == "Follow-up for Mrs. [NAME_1] with Dr [NAME_2]." and by[2]["output"] == "Dr [NAME_2] saw [NAME_1]."
    # A first name alone in another row has nothing to tie it to without an NER pipeline (test_ner_* below): it stays.
    assert by[3]["input"] == "Mr. [NAME_3] phoned from [PHONE_1] about Siobhan."
    # Same input, same output, though each build draws its own key; and nothing but the build's own files is written.
    assert (outs[0] / "train.jsonl").read_text() == (outs[1] / "train.jsonl").read_text()
    assert {p.name for p in outs[0].iterdir()} <= {"train.jsonl", "val.jsonl", "rejects.jsonl", "provenance.json", "datacard.md", "lengths.png",
                                                   ".finetune.json"}
    for f in outs[0].iterdir():
        data = f.read_bytes()
        for secret in (b"O'Hara", b"Siobhan O", b"Popescu", b"Ioana", b"Hamish", b"MacLeod", b"06 12 34 56 78"):
            assert secret not in data, (f.name, secret)
    assert "mapping was held in memory only and never written" in (outs[0] / "datacard.md").read_text()


def test_a_value_found_in_one_field_is_personal_in_every_field_of_the_row():
    row = {"instruction": "When was Mrs. Saoirse O'Hara admitted?", "input": "She was admitted on 14/02/2022 (MRN 7734-2291).",
           "output": "O'Hara came in on 14/02/2022; chart 7734-2291; she took 5 mg on 14/02/2023."}
    red, found = next(Scanner(action="pseudonymize").scan_rows([row]))
    assert red["output"] == "[NAME_1] came in on [DATE_1]; chart [RECORD_ID_1]; she took 5 mg on 14/02/2023."
    assert found.counts == Counter({"name": 2, "date": 2, "record_id": 2})
    # the scope is the row: the same date in another row, with no event beside it, is not a finding
    other = {"instruction": "Which date?", "input": "", "output": "14/02/2022"}
    assert list(Scanner().scan_rows([row, other]))[1][0]["output"] == "14/02/2022"


def test_pseudonym_numbers_follow_first_appearance_per_kind():
    s = Scanner(action="pseudonymize")
    out = [t for t, _ in s.scan_texts(["Dr Ann Lee and Dr Bo Chen", "Dr Bo Chen, then Dr Ann Lee, then Dr Cy Park"])]
    assert out == ["Dr [NAME_1] and Dr [NAME_2]", "Dr [NAME_2], then Dr [NAME_1], then Dr [NAME_3]"]
    assert Scanner(action="redact").scan_texts(["Dr Ann Lee"])[0][0] == "Dr [NAME]"


# --------------------------------------------------------------------------------------------------
# Named-entity recognition through a spaCy pipeline built here (no download)


@pytest.fixture
def ruler_pipeline(tmp_path):
    spacy = pytest.importorskip("spacy", reason="spaCy is in the test extras (finetune[pii]); pip install -e '.[test]'")
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "Natalia"}, {"label": "PERSON", "pattern": "Weng"},
                                               {"label": "ORG", "pattern": "Apple"}])
    nlp.meta["name"] = "ruler_test"
    nlp.meta["version"] = "0.0.1"
    path = tmp_path / "pipeline"
    nlp.to_disk(path)
    return path


def test_ner_finds_bare_names_and_is_recorded(shared_datasets, tmp_path, ruler_pipeline):
    first = [json.loads(line) for line in (shared_datasets / "gsm8k" / "train.jsonl").read_text().splitlines()[:2]]
    assert first[0]["question"].startswith("Natalia sold clips") and first[1]["question"].startswith("Weng earns")
    rows = [{"instruction": r["question"], "output": r["answer"]} for r in first] + [{"instruction": "Apple sells phones.", "output": "Yes."}]
    jsonl(tmp_path / "d.jsonl", rows)
    s = spec(sources=[{"path": "d.jsonl"}], quality={"dedupe": "none", "pii": {"ner": "off"}})
    plain = collect(s, tmp_path)
    assert plain.rows[0]["instruction"].startswith("Natalia")  # no title: the patterns alone leave it
    s = spec(sources=[{"path": "d.jsonl"}], quality={"dedupe": "none", "pii": {"ner": str(ruler_pipeline)}})
    got = collect(s, tmp_path)
    assert got.rows[0]["instruction"].startswith("[NAME] sold clips") and "Natalia" not in got.rows[0]["output"]
    assert got.rows[1]["instruction"].startswith("[NAME] earns") and got.rows[2]["instruction"] == "Apple sells phones."  # ORG is not a person
    pii = got.quality["pii"]
    assert pii["ner"]["detector"] == "spacy" and pii["ner"]["model"] == "en_ruler_test" and pii["ner"]["model_version"] == "0.0.1"
    assert "named-entity recognition: spaCy" in pii["names"] and pii["findings"]["name"] >= 3


def test_ner_auto_uses_an_installed_pipeline(monkeypatch, ruler_pipeline):
    import spacy

    from data_prep.quality.pii import ner

    monkeypatch.setattr(spacy.util, "get_installed_models", lambda: ["xx_other_model", "en_core_web_sm"])
    real_load = spacy.load
    loaded = []

    def fake_load(name, *a, **k):
        loaded.append(name)
        if name == "en_core_web_sm":
            return real_load(ruler_pipeline)
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", fake_load)
    got, line = ner.load("auto")
    assert loaded == ["en_core_web_sm"] and got is not None and "pipeline en_ruler_test 0.0.1" in line  # the preferred one first
    assert [t for t, _ in Scanner(ner=got).scan_texts(["Natalia and Weng met."])] == ["[NAME] and [NAME] met."]
    monkeypatch.setattr(spacy.util, "get_installed_models", lambda: [])
    assert ner.load("auto")[0] is None and "no pipeline installed" in ner.load("auto")[1]
    monkeypatch.setitem(sys.modules, "spacy", None)  # spaCy not installed
    got, line = ner.load("auto")
    assert got is None and "spaCy is not installed" in line and "finetune[pii]" in line
    with pytest.raises(DataError, match=r"needs spaCy: pip install 'finetune\[pii\]'"):
        ner.load("en_core_web_sm")


def test_ner_reads_a_long_document_in_pieces(ruler_pipeline):
    import spacy

    from data_prep.quality.pii.ner import PIECE, Ner

    nlp = spacy.load(ruler_pipeline)
    text = "word " * (PIECE // 4) + "Natalia met Weng. " + "more " * PIECE
    assert len(text) > 5 * PIECE
    [spans] = list(Ner(nlp, {}).persons([text]))
    assert [text[s:e] for s, e in spans] == ["Natalia", "Weng"]


def test_ner_named_but_missing_is_one_clear_error(tmp_path):
    pytest.importorskip("spacy")
    jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"quality.pii.ner: cannot load the spaCy pipeline 'xx_missing_pipeline'"):
        collect(spec(sources=[{"path": "d.jsonl"}], quality={"pii": {"ner": "xx_missing_pipeline"}}), tmp_path)


# --------------------------------------------------------------------------------------------------
# Recipe keys


def test_old_kind_name_and_bad_kind():
    assert spec(sources=[{"path": "x.jsonl"}], quality={"pii": {"kinds": ["date_of_birth", "name"]}}).quality.pii.kinds == ["date", "name"]
    with pytest.raises(ValueError, match="kinds"):
        spec(sources=[{"path": "x.jsonl"}], quality={"pii": {"kinds": ["passport_photo"]}})


def test_kinds_limit_the_scan(tmp_path):
    text = "Dr Ann Lee, jane.roe@example.org"
    assert scan(text, {"email"})[0] == "Dr Ann Lee, [EMAIL]" and scan(text, {"name"})[0] == "Dr [NAME], jane.roe@example.org"


# --------------------------------------------------------------------------------------------------
# finetune data stats / scan before any mapping


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "finetune.cli", "data", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_stats_reads_any_file_without_a_mapping(shared_datasets):
    f = shared_datasets / "gsm8k" / "train.jsonl"
    done = _cli("stats", f, "--json")
    assert done.returncode == 0, done.stderr
    st = json.loads(done.stdout)
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    raw = st["raw"]
    assert raw["rows"] == len(rows) == 7473 and list(raw["columns"]) == ["question", "answer"]
    q = raw["columns"]["question"]
    assert q["types"] == {"str": 7473} and q["fill_rate"] == 1.0
    words = sorted(len(r["question"].split()) for r in rows)
    assert q["words"]["max"] == words[-1] and q["words"]["min"] == words[0] and q["words"]["mean"] == round(sum(words) / len(words), 1)
    assert st["mapped"] is None and "no 'instruction' or 'output'" in st["mapping_needed"] and any("gsm8k" in h for h in raw["hints"])
    text = _cli("stats", f)
    assert text.returncode == 0 and "question: str, filled 100%" in text.stdout and "--adapter gsm8k" in text.stdout
    # With a mapping: what it printed before (counts as finetune reads the rows).
    mapped = json.loads(_cli("stats", f, "--adapter", "gsm8k", "--json").stdout)
    assert mapped["valid"] == 7473 and mapped["pii"]["findings"]["name"] > 0 and "raw" not in mapped
    # A label column shows its values; a PubMedQA JSON object of records reads as rows.
    pub = json.loads(_cli("stats", shared_datasets / "pubmedqa" / "ori_pqal.json", "--json").stdout)["raw"]
    assert pub["rows"] == 1000 and set(pub["columns"]["final_decision"]["values"]) == {"yes", "no", "maybe"}
    assert pub["columns"]["CONTEXTS"]["types"] == {"list": 1000} and pub["columns"]["YEAR"]["fill_rate"] < 1


def test_scan_lists_kinds_columns_and_rows_never_values(tmp_path):
    rows = [{"id": "r1", "messages": [{"role": "user", "content": "Mrs. Siobhan O'Hara, DOB 1957-11-03"}, {"role": "assistant", "content": "ok"}]},
            {"id": "MRN 7734-2291", "messages": [{"role": "user", "content": "plain"}, {"role": "assistant", "content": "call 06 12 34 56 78"}]},
            {"id": "r3", "messages": [{"role": "user", "content": "nothing here"}, {"role": "assistant", "content": "fine"}]}]
    jsonl(tmp_path / "chat.jsonl", rows)
    done = _cli("scan", tmp_path / "chat.jsonl", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["rows"] == 3 and got["rows_with_findings"] == 2
    k = got["kinds"]
    assert k["name"]["row_numbers"] == [1] and k["name"]["columns"] == {"messages[].content": 1}
    assert k["date"]["row_numbers"] == [1] and k["record_id"]["columns"] == {"id": 1} and k["phone"]["row_numbers"] == [2]
    text = _cli("scan", tmp_path / "chat.jsonl", cwd=tmp_path)
    for secret in ("O'Hara", "Siobhan", "1957-11-03", "7734-2291", "06 12 34 56 78"):
        assert secret not in done.stdout + done.stderr + text.stdout + text.stderr
    assert "phone: 1 findings in 1 rows in messages[].content (rows 2)" in text.stdout
    bad = _cli("scan", tmp_path / "chat.jsonl", "--kind", "phon", cwd=tmp_path)
    assert bad.returncode == 2 and "did you mean 'phone'?" in bad.stderr


# --------------------------------------------------------------------------------------------------
# A whole run: nothing planted survives anywhere in the run folder (logs, card, tokenizer, eval items, hub copy)


@pytest.mark.slow
def test_smoke_run_on_planted_samples_leaves_no_value_in_any_file(shared_datasets, tmp_path):
    rows, _ = plant(shared_datasets)
    for r in rows:  # answers as varied as the notes (a stand-in tokenizer learnt from 208 identical answers merges across the prompt)
        r["output"] = "In short: " + " ".join(r["input"].split()[-6:])
    samples = tmp_path / "planted.jsonl"
    jsonl(samples, rows)
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(ROOT / "recipes" / "legal.yaml"), "--smoke", "--run-dir", str(run),
                           "--set", f"samples.data={samples}", "--set", "data.quality.max_reject_rate=0.5"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    secrets = {s for _, _, ss in PLANTED for s in ss if len(s) >= 5}
    checked = 0
    for f in run.rglob("*"):
        if not f.is_file() or f.suffix in (".safetensors", ".png", ".bin", ".pt", ".pth"):
            continue
        text = f.read_bytes().decode("utf-8", errors="replace")
        checked += 1
        leaked = [s for s in secrets if s in text]
        assert not leaked, (f.relative_to(run), leaked)
    assert checked > 20
    for s in secrets:
        assert s not in done.stdout + done.stderr
    card = (run / "card" / "README.md").read_text()
    assert "Personal data (redact): " in card and "Names: titles, labels and role words" in card
