"""One licence rule (data_prep/licences.py) for the data card, the model card and the publish gate."""

from __future__ import annotations

import pytest

from data_prep import licences

TABLE = [
    # (spelling seen in the wild, kind)
    ("CC BY-NC", licences.NON_COMMERCIAL), ("CC BY-NC-SA", licences.NON_COMMERCIAL), ("cc-by-nc-4.0", licences.NON_COMMERCIAL),
    ("CC-BY-NC-4.0", licences.NON_COMMERCIAL), ("cc_by_nc_4.0", licences.NON_COMMERCIAL), ("CC BY-NC 4.0", licences.NON_COMMERCIAL),
    ("cc-by-nc-sa-4.0", licences.NON_COMMERCIAL), ("cc-by-nc-nd-4.0", licences.NON_COMMERCIAL), ("research-only", licences.NON_COMMERCIAL),
    ("Non-Commercial", licences.NON_COMMERCIAL),
    ("other", licences.UNKNOWN), ("unknown", licences.UNKNOWN), (None, licences.UNKNOWN), ("", licences.UNKNOWN),
    ("mitre", licences.UNKNOWN),     # a word that starts like a licence is not one
    ("llama2", licences.CUSTOM), ("llama3", licences.CUSTOM), ("llama3.1", licences.CUSTOM), ("gemma", licences.CUSTOM),
    ("openrail++", licences.CUSTOM), ("bigscience-openrail-m", licences.CUSTOM),
    ("apache-2.0", licences.PERMISSIVE), ("Apache 2.0", licences.PERMISSIVE), ("mit", licences.PERMISSIVE), ("MIT", licences.PERMISSIVE),
    ("bsd-3-clause", licences.PERMISSIVE), ("cc0-1.0", licences.PERMISSIVE), ("cc-by-4.0", licences.PERMISSIVE),
    ("NCSA", licences.PERMISSIVE),   # "nc" inside a word is not the NC token
    ("cc-by-sa-3.0", licences.SHARE_ALIKE), ("gpl-3.0", licences.SHARE_ALIKE), ("odbl", licences.SHARE_ALIKE),
    ("cc-by-nd-4.0", licences.NO_DERIVATIVES), ("proprietary", licences.PROPRIETARY),
]


@pytest.mark.parametrize("spelling,kind", TABLE)
def test_licence_kinds(spelling, kind):
    assert licences.kind(spelling) == kind


def test_spellings_of_one_licence_normalise_to_one_id():
    assert {licences.normalise(s) for s in ("CC BY-NC 4.0", "cc_by_nc_4.0", "CC-BY-NC-4.0", " cc-by-nc-4.0 ")} == {"cc-by-nc-4.0"}


@pytest.mark.parametrize("spelling", ["CC BY-NC 4.0", "cc_by_nc_4.0", "cc-by-nc-4.0", "CC BY-NC-SA", "apache-2.0", "llama3", "other"])
def test_data_card_and_publish_gate_give_one_answer(spelling):
    """The data card's warning and the publish gate's refusal agree for every spelling (they once disagreed both ways)."""
    import yaml

    from data_prep.datacard import licence_warnings
    from finetune.card import licence_conflicts
    from finetune.recipe import parse_recipe

    sources = [{"path": "d.jsonl", "license": spelling}]
    warned = any("Warning: non-commercial data" in w for w in licence_warnings(sources))
    recipe = parse_recipe(yaml.safe_load("name: t\nbase_model: {id: some/model, family: llama, license: apache-2.0}\n"
                              "data: {sources: [{path: d.jsonl}]}\npublish: {license: apache-2.0}\n"))
    refused = bool(licence_conflicts(recipe, sources))
    assert warned == refused == (licences.kind(spelling) == licences.NON_COMMERCIAL)


def test_a_base_models_own_licence_cannot_be_replaced():
    import yaml

    from finetune.card import licence_conflicts
    from finetune.recipe import parse_recipe

    text = "name: t\nbase_model: {id: meta-llama/Llama-3.1-8B, family: llama, license: llama3.1}\ndata: {sources: [{path: d.jsonl}]}\n"
    [msg] = licence_conflicts(parse_recipe(yaml.safe_load(text + "publish: {license: apache-2.0}\n")), [])
    assert msg == "publish.license 'apache-2.0' replaces the base model's licence 'llama3.1', which its derivatives keep"
    assert licence_conflicts(parse_recipe(yaml.safe_load(text + "publish: {license: llama3.1}\n")), []) == []
