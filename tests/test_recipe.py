"""The recipe schema: strict keys with did-you-mean, types, cross-field checks, overrides, shipped recipes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from finetune.errors import UserError
from finetune.recipe import Recipe, apply_overrides, json_schema, load_recipe, parse_recipe, redact

from .conftest import RECIPES, ROOT

MINIMAL = {"name": "t", "base_model": {"id": "org/llama-x"}, "data": {"sources": [{"path": "d.jsonl"}]}}


def errors_of(data) -> str:
    with pytest.raises(UserError) as e:
        parse_recipe(data, "r.yaml")
    return str(e.value)


def with_(**sections):
    d = json.loads(json.dumps(MINIMAL))
    for k, v in sections.items():
        d[k] = v
    return d


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_opens_with_a_header(recipe):
    r, _ = load_recipe(recipe)
    assert r.samples is not None, "every shipped recipe must be smoke-testable"
    head = recipe.read_text().splitlines()[:3]
    assert head[0].startswith("# ") and any("Run:" in h for h in head), "recipes open with purpose and run command"


def test_unknown_key_at_depth_names_path_and_suggests():
    msg = errors_of(with_(training={"lerning_rate": 1e-4}, lora={"rnak": 8}))
    assert "training.lerning_rate: unknown key; did you mean 'learning_rate'?" in msg
    assert "lora.rnak: unknown key; did you mean 'r'?" in msg  # 'rank' is how other tools name it


def test_unknown_key_in_list_items_and_top_level():
    msg = errors_of(with_(data={"sources": [{"path": "a.jsonl", "licence": "mit"}]}, tracking={"report": []}))
    assert "data.sources.0.licence: unknown key; did you mean 'license'?" in msg
    assert "tracking.report: unknown key; did you mean 'report_to'?" in msg


def test_wrong_type_and_bad_choice_name_the_value():
    msg = errors_of(with_(training={"learning_rate": "fast"}, data={"sources": [{"path": "a"}], "template": "alpacca"}))
    assert "training.learning_rate" in msg and '"fast"' in msg
    assert "data.template" in msg and "did you mean 'alpaca'?" in msg


def test_cross_field_checks():
    assert "needs an adapter" in errors_of(with_(lora=None))
    assert "merge.enabled is false" in errors_of(with_(publish={"what": ["merged"]}, merge={"enabled": False}))
    assert "exactly one of `path` or `hub`" in errors_of(with_(data={"sources": [{"path": "a", "hub": "b/c"}]}))


def test_set_overrides_coerce_types_and_reach_list_items():
    d = apply_overrides(json.loads(json.dumps(MINIMAL)), ["training.learning_rate=1e-4", "lora.r=32", "data.sources.0.path=x.jsonl",
                                                        "publish.what=[adapter, merged]", "training.packing=true"])
    r = parse_recipe(d)
    assert r.training.learning_rate == 1e-4 and r.lora.r == 32 and r.training.packing is True
    assert r.data.sources[0].path == "x.jsonl" and r.publish.what == ["adapter", "merged"]
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        apply_overrides({}, ["training.learning_rate"])


def test_every_field_is_documented_in_the_schema():
    schema = json_schema()
    missing = []
    for name, section in [("Recipe", schema)] + list(schema["$defs"].items()):
        for field, spec in section.get("properties", {}).items():
            if not spec.get("description"):
                missing.append(f"{name}.{field}")
    assert not missing


def test_redact_hides_secret_values_and_keys():
    fake = "hf_" + "Ab1" * 11  # built at run time so no token-like string sits in the repository
    out = redact({"a": f"token {fake}", "api_key": "x", "n": 1})
    assert "hf_" not in json.dumps(out) and out["api_key"] == "***" and out["n"] == 1


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_bad_recipe_exits_2_with_one_message_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_(training={"lerning_rate": 1})))
    p = run_cli("validate", str(bad))
    assert p.returncode == 2
    assert "did you mean 'learning_rate'" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("validate", str(tmp_path / "missing.yaml"))
    assert p.returncode == 2 and "recipe file not found" in p.stderr


def test_cli_unknown_family_exits_2(tmp_path):
    p = run_cli("validate", str(RECIPES / "legal.yaml"), "--smoke", "--set", "base_model.family=falconn")
    assert p.returncode == 2 and "did you mean 'falcon'" in p.stderr and "Traceback" not in p.stderr
    d = yaml.safe_load((RECIPES / "legal.yaml").read_text())
    d["base_model"] = {"id": "someorg/unheard-of-7b"}
    d["samples"]["data"] = str(RECIPES / "samples/legal.jsonl")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    p = run_cli("validate", str(tmp_path / "r.yaml"), "--smoke")
    assert p.returncode == 2 and "cannot tell its architecture family" in p.stderr


def test_help_and_schema_do_not_import_torch():
    code = "import sys; from finetune.cli import app; from typer.testing import CliRunner; " \
           "r = CliRunner().invoke(app, ['--help']); r2 = CliRunner().invoke(app, ['schema']); " \
           "assert r.exit_code == 0 and r2.exit_code == 0, (r.output, r2.output); print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_schema_command_prints_json_schema():
    p = run_cli("schema")
    assert p.returncode == 0
    assert json.loads(p.stdout)["title"] == Recipe.__name__
