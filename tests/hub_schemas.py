"""The exact schemas of the Hugging Face datasets the shipped recipes read, as their dataset cards publish them
(docs/datasets.md says where each was read). `build(hub, config)` writes a `save_to_disk` dataset with exactly these
features and splits, a few rows of our own text, for test_hub_schemas.py.

Features are written in `datasets` terms: a `Sequence` of a dict is stored as a dict of lists (PubMedQA's `context`),
a plain dict is a struct (MedQA's `options`), a ClassLabel is an integer with names (MMLU's `answer`)."""

from __future__ import annotations

from pathlib import Path

# Repositories that ship a loading script, which datasets >= 4 refuses to run ("Dataset scripts are no longer supported");
# their Hub-converted Parquet branch loads (HazyResearch/legalbench issue 54; huggingface/datasets issue 8012).
SCRIPTED = {"nguha/legalbench", "isaacus/open-australian-legal-qa"}
PARQUET_BRANCH = "refs/convert/parquet"


def _features(kind: str):
    from datasets import ClassLabel, Features, Sequence, Value

    s = Value("string")
    return {
        "pubmedqa_labeled": Features({"pubid": Value("int32"), "question": s,
                                     "context": Sequence({"contexts": s, "labels": s, "meshes": s, "reasoning_required_pred": s,
                                                          "reasoning_free_pred": s}),
                                     "long_answer": s, "final_decision": s}),
        "pubmedqa_artificial": Features({"pubid": Value("int32"), "question": s,
                                        "context": Sequence({"contexts": s, "labels": s, "meshes": s}),
                                        "long_answer": s, "final_decision": s}),
        "medqa": Features({"question": s, "answer": s, "options": {"A": s, "B": s, "C": s, "D": s}, "meta_info": s,
                           "answer_idx": s, "metamap_phrases": Sequence(s)}),
        "mmlu": Features({"question": s, "subject": s, "choices": Sequence(s), "answer": ClassLabel(names=["A", "B", "C", "D"])}),
        "gsm8k": Features({"question": s, "answer": s}),
        "math500": Features({"problem": s, "solution": s, "answer": s, "subject": s, "level": Value("int64"), "unique_id": s}),
        "legalbench_hearsay": Features({"answer": s, "index": s, "slice": s, "text": s}),
        "legalbench_abercrombie": Features({"answer": s, "index": s, "text": s}),
        "legal_qa": Features({"question": s, "answer": s, "text": s, "prompt": s,
                              "source": {"version_id": s, "type": s, "jurisdiction": s, "source": s, "citation": s, "url": s, "text": s}}),
        "pubmed": Features({"id": s, "title": s, "content": s, "contents": s, "PMID": s}),
        "wikipedia": Features({"id": s, "url": s, "title": s, "text": s}),
        "dolly_ja": Features({"output": s, "index": s, "category": s, "instruction": s, "input": s}),
        "metamathqa": Features({"query": s, "response": s, "type": s, "original_question": s}),
    }[kind]


# (hub id, config) -> (schema kind, splits). Configs not listed for MMLU take the MMLU layout (every subject the same).
DATASETS = {
    ("qiaojin/PubMedQA", "pqa_labeled"): ("pubmedqa_labeled", ["train"]),
    ("qiaojin/PubMedQA", "pqa_artificial"): ("pubmedqa_artificial", ["train"]),
    ("GBaker/MedQA-USMLE-4-options", None): ("medqa", ["train", "test"]),
    ("openai/gsm8k", "main"): ("gsm8k", ["train", "test"]),
    ("HuggingFaceH4/MATH-500", None): ("math500", ["test"]),
    ("nguha/legalbench", "hearsay"): ("legalbench_hearsay", ["train", "test"]),
    ("nguha/legalbench", "abercrombie"): ("legalbench_abercrombie", ["train", "test"]),
    ("isaacus/open-australian-legal-qa", None): ("legal_qa", ["train"]),
    ("MedRAG/pubmed", None): ("pubmed", ["train"]),
    ("wikimedia/wikipedia", "20231101.en"): ("wikipedia", ["train"]),
    ("wikimedia/wikipedia", "20231101.ja"): ("wikipedia", ["train"]),
    ("kunishou/databricks-dolly-15k-ja", None): ("dolly_ja", ["train"]),
    ("meta-math/MetaMathQA", None): ("metamathqa", ["train"]),
}
MMLU_SPLITS = ["test", "validation", "dev"]


def kind_of(hub: str, config: str | None) -> tuple[str, list[str]]:
    if hub == "cais/mmlu":
        return "mmlu", MMLU_SPLITS
    return DATASETS[(hub, config)]


def _row(kind: str, i: int) -> dict:
    """Row i of a schema, in our own words: what the recipes map must be there, with the right types and nesting."""
    yn = ["yes", "no", "maybe"][i % 3]
    return {
        "pubmedqa_labeled": lambda: {"pubid": 1000 + i, "question": f"Does treatment {i} shorten recovery?",
                                     "context": {"contexts": [f"Background of study {i}.", f"Results of study {i}."], "labels": ["BACKGROUND", "RESULTS"],
                                                 "meshes": ["Humans"], "reasoning_required_pred": [yn], "reasoning_free_pred": [yn]},
                                     "long_answer": f"Treatment {i} had an effect.", "final_decision": yn},
        "pubmedqa_artificial": lambda: {"pubid": 5000 + i, "question": f"Is marker {i} linked to outcome {i}?",
                                        "context": {"contexts": [f"Cohort {i} was followed.", f"Marker {i} rose."], "labels": ["METHODS", "RESULTS"],
                                                    "meshes": ["Cohort Studies"]},
                                        "long_answer": f"Marker {i} is linked to the outcome in cohort {i}.", "final_decision": ["yes", "no"][i % 2]},
        "medqa": lambda: {"question": f"A patient aged {30 + i} presents with symptom {i}. What is the next step?", "answer": f"Step {i}",
                          "options": {"A": f"Step {i}", "B": f"Other {i}", "C": f"Wait {i}", "D": f"Refer {i}"}, "meta_info": "step1",
                          "answer_idx": "A", "metamap_phrases": [f"symptom {i}"]},
        "mmlu": lambda: {"question": f"Question {i} about the subject?", "subject": "subject",
                         "choices": [f"first {i}", f"second {i}", f"third {i}", f"fourth {i}"], "answer": i % 4},
        "gsm8k": lambda: {"question": f"Sam has {i + 3} pens and buys {i + 2} more. How many pens does Sam have?",
                          "answer": f"Sam has {i + 3} + {i + 2} = <<{i + 3}+{i + 2}={2 * i + 5}>>{2 * i + 5} pens.\n#### {2 * i + 5}"},
        "math500": lambda: {"problem": f"What is ${i} + {i}$?", "solution": f"We add: ${i} + {i} = \\boxed{{{2 * i}}}$.", "answer": str(2 * i),
                            "subject": "Algebra", "level": 1 + i % 5, "unique_id": f"test/algebra/{i}.json"},
        "legalbench_hearsay": lambda: {"answer": ["Yes", "No"][i % 2], "index": str(i), "slice": "Standard hearsay",
                                       "text": f"On the issue of whether person {i} left early, the fact that a neighbour said so."},
        "legalbench_abercrombie": lambda: {"answer": ["generic", "descriptive", "suggestive", "arbitrary", "fanciful"][i % 5], "index": str(i),
                                           "text": f"The mark \"Mark{i}\" for product {i}."},
        "legal_qa": lambda: {"question": f"Under statute {i}, when must notice be given?", "answer": f"Notice must be given within {i + 7} days.",
                             "text": f"Section {i}: notice within {i + 7} days.", "prompt": f"Source: section {i}",
                             "source": {"version_id": f"v{i}", "type": "primary_legislation", "jurisdiction": "commonwealth",
                                        "source": "federal_register_of_legislation", "citation": f"Act {i}", "url": f"https://example.org/{i}",
                                        "text": f"Section {i}: notice within {i + 7} days."}},
        "pubmed": lambda: {"id": f"pmid{i}", "title": f"Study {i}", "content": f"Study {i} measured blood pressure in {i + 20} adults.",
                           "contents": f"Study {i}. Study {i} measured blood pressure.", "PMID": str(9000 + i)},
        "wikipedia": lambda: {"id": str(i), "url": f"https://en.wikipedia.org/wiki/Item_{i}", "title": f"Item {i}",
                              "text": f"Item {i} is a thing described in an encyclopedia article of our own, number {i}."},
        "dolly_ja": lambda: {"output": f"答えは{i}です。", "index": str(i), "category": "open_qa", "instruction": f"{i}に一を足すといくつですか。",
                             "input": ""},
        "metamathqa": lambda: {"query": f"Ann has {i + 2} apples and eats one. How many are left?",
                               "response": f"Ann has {i + 2} - 1 = {i + 1} apples left.\nThe answer is: {i + 1}", "type": "GSM_Rephrased",
                               "original_question": f"Ann has {i + 2} apples; she eats one. How many remain?"},
    }[kind]()


def build(hub: str, config: str | None, root: Path, rows: int = 12) -> Path:
    """A `save_to_disk` DatasetDict with the schema and splits of (hub, config)."""
    from datasets import Dataset, DatasetDict

    kind, splits = kind_of(hub, config)
    out = root / f"{hub.replace('/', '__')}__{config or 'default'}"
    if not out.exists():
        feats = _features(kind)
        DatasetDict({sp: Dataset.from_list([_row(kind, i + 100 * n) for i in range(rows)], features=feats)
                     for n, sp in enumerate(splits)}).save_to_disk(str(out))
    return out
