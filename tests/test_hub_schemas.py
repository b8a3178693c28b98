"""Issue 15, item 6: every Hub source and task of the shipped recipes, run for real (not --smoke) against a local
`save_to_disk` dataset with exactly the schema its dataset card publishes (tests/hub_schemas.py, docs/datasets.md).
The first run on a GPU box must not die on a column name, a nested feature or a loading script."""

from __future__ import annotations

import pytest

from .conftest import RECIPES
from .hub_schemas import PARQUET_BRANCH, SCRIPTED, build, kind_of

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """datasets.load_dataset answering from local copies with the published schemas, refusing scripted repositories
    outside their Parquet branch as datasets >= 4 does. Records every call."""
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split, revision))
        if path in SCRIPTED and revision != PARQUET_BRANCH:
            raise RuntimeError(f"Dataset scripts are no longer supported, but found {path.split('/')[-1].replace('-', '_')}.py")
        try:
            kind_of(path, name)
        except KeyError:
            raise ValueError(f"BuilderConfig '{name}' not found for {path}") from None
        d = datasets.load_from_disk(str(build(path, name, tmp_path / "hub")))
        if split not in d:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(d)}.')
        return d[split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("name", ["legal", "medical", "math", "japanese", "math_pro"])
def test_recipe_data_sources_build_on_their_published_schemas(name, hub):
    from data_prep.build import collect
    from data_prep.sources.load import load_source
    from finetune.prepare import decontamination_sets
    from finetune.recipe import load_recipe

    recipe, recipe_dir = load_recipe(RECIPES / f"{name}.yaml")
    collected = collect(recipe.data, recipe_dir, eval_sets=decontamination_sets(recipe, recipe_dir))
    assert collected.rows, collected.rejects[:3]
    assert len(collected.rejects) == 0, collected.rejects[:3]  # every row of the published layout maps cleanly
    for row in collected.rows:
        assert (row.get("instruction") and row.get("output")) or row.get("messages"), row
    for src in recipe.cpt.sources if recipe.cpt is not None else []:  # continued pretraining's corpora too
        if src.hub:
            loaded = load_source(src, recipe_dir)
            assert loaded.rows and all(r.get("text") for r in loaded.rows), src.origin
    read = {c[0] for c in hub}
    assert {s.hub for s in recipe.data.sources if s.hub} <= read


@pytest.mark.parametrize("name", ["legal", "medical", "math", "japanese", "math_pro"])
def test_recipe_eval_tasks_load_on_their_published_schemas(name, hub):
    from finetune.recipe import load_recipe
    from finetune.smoke import build_tokenizer
    from finetune.tasks import load_items

    recipe, recipe_dir = load_recipe(RECIPES / f"{name}.yaml")
    tok = build_tokenizer(["a chat template is all the medical recipe's tasks need of a tokenizer"])
    for task in recipe.eval.tasks:
        items = load_items(task, recipe_dir, recipe.data.template, tok)
        assert items, task.name
        for it in items:
            if task.type == "multiple_choice":
                assert len(it.choices) == 4 and 0 <= it.gold < 4, task.name
                assert all(c.strip() for c in it.choices)
            elif task.type == "classification":
                assert 0 <= it.gold < len(task.labels), task.name
            elif task.type == "exact_match":
                assert str(it.gold).strip(), task.name
        if task.num_fewshot:  # the solved examples come from the few-shot split, with its published columns
            assert items[0].prompt.count("\n") > 2 * task.num_fewshot, task.name


def test_scripted_repositories_load_from_their_parquet_branch(hub):
    """nguha/legalbench ships legalbench.py: datasets >= 4 refuses it; the reader retries the Hub's Parquet export."""
    from data_prep.sources.readers import open_hub

    opened = open_hub("nguha/legalbench", "hearsay", "test", None)
    assert list(opened.columns) == ["answer", "index", "slice", "text"]
    assert [c[3] for c in hub] == [None, PARQUET_BRANCH]
    assert opened.info["revision"] == PARQUET_BRANCH  # provenance records what was really read


def test_a_wrong_column_on_a_real_schema_is_one_message(hub):
    """The check can fail: MedQA's answer letter is `answer_idx`; a mapping onto `answer_index` names the real columns."""
    from data_prep.errors import DataError
    from finetune.recipe import load_recipe
    from finetune.tasks import load_items

    recipe, recipe_dir = load_recipe(RECIPES / "medical.yaml", ["eval.tasks.1.fields={answer: answer_index}"])
    with pytest.raises(DataError, match="answer_idx"):
        load_items(recipe.eval.tasks[1], recipe_dir, recipe.data.template)
