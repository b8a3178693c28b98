"""Preference and reward stages after SFT (issue 19): pair data through data_prep, the pair preflight, the reference
model (the SFT policy, not the base), exact resume in a DPO stage, and each of [sft, dpo|orpo|kto|grpo] end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.errors import RowError
from data_prep.formats import normalise
from data_prep.sources.adapters import ADAPTERS
from finetune.errors import UserError
from finetune.recipe import load_recipe

from .conftest import RECIPES, ROOT

# --------------------------------------------------------------------------------------------------
# Pair data: layouts, adapters, validation


def test_public_layouts_become_one_pair():
    hh = ADAPTERS["hh_rlhf"].fn({
        "chosen": "\n\nHuman: Is 7 prime?\n\nAssistant: Let me check.\n\nHuman: Well?\n\nAssistant: Yes, 7 is prime.",
        "rejected": "\n\nHuman: Is 7 prime?\n\nAssistant: Let me check.\n\nHuman: Well?\n\nAssistant: No."})
    assert hh == {"prompt": [{"role": "user", "content": "Is 7 prime?"}, {"role": "assistant", "content": "Let me check."},
                             {"role": "user", "content": "Well?"}], "chosen": "Yes, 7 is prime.", "rejected": "No."}
    conv = [{"role": "user", "content": "Name a prime."}]
    uf = ADAPTERS["ultrafeedback"].fn({"prompt": "Name a prime.", "chosen": conv + [{"role": "assistant", "content": "7"}],
                                       "rejected": conv + [{"role": "assistant", "content": "8"}]})
    assert uf == {"prompt": conv, "chosen": "7", "rejected": "8"}
    ar = ADAPTERS["argilla"].fn({"instruction": "Name a prime.", "system": "Be brief.", "chosen_response": "7", "rejected_response": "8",
                                 "chosen_rating": 5, "rejected_rating": 2})
    assert ar["prompt"][0] == {"role": "system", "content": "Be brief."} and (ar["chosen"], ar["rejected"]) == ("7", "8")
    # every adapter's output is a valid pair
    for row in (hh, uf, ar):
        assert normalise(row, "auto") == row


@pytest.mark.parametrize("row, reason", [
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "do not share a prompt"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: more", "rejected": "\n\nHuman: a\n\nAssistant: y"}, "does not end with an 'Assistant:'"),
])
def test_hh_rlhf_pairs_that_are_not_pairs_are_rejected(row, reason):
    with pytest.raises(RowError, match=reason):
        ADAPTERS["hh_rlhf"].fn(row)


def test_argilla_ties_are_rejected_unless_kept():
    row = {"instruction": "q", "chosen": "a", "rejected": "b", "chosen_rating": 4, "rejected_rating": 4}
    with pytest.raises(RowError, match="tie"):
        ADAPTERS["argilla"].fn(row)
    assert ADAPTERS["argilla"].fn(row, ties=True)["chosen"] == "a"


def _collect(tmp_path, rows, eval_texts=()):
    from data_prep.build import collect
    from data_prep.spec import DataSpec

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec.model_validate({"sources": [{"path": str(path), "format": "pairs", "license": "mit"}],
                                    "quality": {"max_reject_rate": 0.9}})
    return collect(spec, tmp_path, eval_sets=[("eval", list(eval_texts))] if eval_texts else ())


def test_bad_pairs_are_rejected_with_their_row_numbers(tmp_path):
    rows = [
        {"prompt": "What is an analgesic?", "chosen": "A medicine that relieves pain.", "rejected": "A kind of bandage."},
        {"prompt": "What is oedema?", "chosen": "Swelling  from fluid.", "rejected": "swelling from FLUID."},  # the same answer
        {"prompt": "What is jaundice?", "chosen": "Yellow skin from bilirubin."},  # no rejected
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "chosen": "a", "rejected": "b"},
        {"prompt": "What is cyanosis?", "chosen": 3, "rejected": "A rash."},
        # trl's conversational layout: the answers as one assistant message each
        {"prompt": [{"role": "user", "content": "What is pyrexia?"}], "chosen": [{"role": "assistant", "content": "Fever."}],
         "rejected": [{"role": "assistant", "content": "A fear of fire."}]},
        {"prompt": "What is hypoxia?", "chosen": [{"role": "user", "content": "Low oxygen."}], "rejected": "Too much oxygen."},
    ]
    got = _collect(tmp_path, rows)
    assert [r["chosen"] for r in got.rows] == ["A medicine that relieves pain.", "Fever."]
    reasons = {r["row"]: r["reason"] for r in got.rejects}
    assert "chosen and rejected are the same answer" in reasons[2]
    assert "missing field 'rejected'" in reasons[3]
    assert "last message must be the user's" in reasons[4]
    assert "field 'chosen' is int" in reasons[5]
    assert "must be one assistant message" in reasons[7]


def test_pairs_are_deduplicated_decontaminated_and_scrubbed(tmp_path):
    item = "A 54-year-old presents with crushing chest pain radiating to the left arm and sweating. What is the most likely diagnosis?"
    rows = [
        {"prompt": "Define tachycardia.", "chosen": "A heart rate above 100 per minute.", "rejected": "A slow heart rate."},
        {"prompt": "Define  tachycardia.", "chosen": "A heart rate above 100 per minute.", "rejected": "A slow heart rate."},  # duplicate
        {"prompt": item, "chosen": "Myocardial infarction.", "rejected": "Indigestion."},  # an eval item
        {"prompt": "Who do I call?", "chosen": "Write to the ward at clinic.desk@example.org for an appointment.", "rejected": "Nobody."},
    ]
    got = _collect(tmp_path, rows, eval_texts=[item])
    kinds = {r["row"]: r["filter"] for r in got.rejects}
    assert kinds == {2: "exact_duplicate", 3: "contaminated"}
    scrubbed = next(r for r in got.rows if r["prompt"][0]["content"] == "Who do I call?")
    assert "clinic.desk@example.org" not in scrubbed["chosen"] and "[EMAIL]" in scrubbed["chosen"]
    assert got.quality["pii"]["findings"] == {"email": 1}


def test_encoded_pairs_share_the_prompt_and_end_with_eos():
    from finetune.pairs import encode_pair
    from finetune.smoke import build_tokenizer
    from finetune.templates import encode

    tok = build_tokenizer(["What is an analgesic? A medicine that relieves pain. A bandage."] * 20)
    pair = {"prompt": [{"role": "user", "content": "What is an analgesic?"}], "chosen": "A medicine that relieves pain.",
            "rejected": "A bandage."}
    e = encode_pair(tok, pair, "chat", None)
    assert e["chosen_ids"][-1] == e["rejected_ids"][-1] == tok.eos_token_id
    # independently: the SFT encoding of prompt + chosen is exactly prompt_ids + chosen_ids, its labels mask the prompt
    sft = encode(tok, {"messages": pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}]}, "chat")
    assert sft.input_ids == e["prompt_ids"] + e["chosen_ids"]
    assert sft.labels == [-100] * len(e["prompt_ids"]) + e["chosen_ids"]
    with pytest.raises(RowError, match="single user prompt"):
        encode_pair(tok, {**pair, "prompt": pair["prompt"] * 1 + [{"role": "assistant", "content": "x"}, pair["prompt"][0]]}, "alpaca", None)


# --------------------------------------------------------------------------------------------------
# The pair preflight: each check can fail


def _dpo_batch_check(items):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from finetune.preflight import preflight_pairs
    from finetune.smoke import build_tokenizer

    tok = build_tokenizer(["a b c d e f"] * 10)
    eos = tok.eos_token_id
    rows = [{k: [t if t != "E" else eos for t in v] for k, v in it.items()} for it in items]
    return preflight_pairs(tok, rows, DataCollatorForPreference(pad_token_id=tok.pad_token_id), 8, "dpo")


def test_pair_preflight_passes_good_pairs_and_names_a_missing_eos():
    good = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, "E"], "rejected_ids": [10, "E"]}
    assert _dpo_batch_check([good, good])["passed"]
    from finetune.preflight import PreflightError

    with pytest.raises(PreflightError, match=r"eos: pair 2, rejected"):
        _dpo_batch_check([good, {**good, "rejected_ids": [10, 11]}])


def test_kto_preflight_catches_answers_to_different_prompts():
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from finetune.preflight import PreflightError, preflight_pairs
    from finetune.smoke import build_tokenizer

    tok = build_tokenizer(["a b c d e f"] * 10)
    eos = tok.eos_token_id
    rows = [{"prompt_ids": [5, 6], "completion_ids": [8, eos], "label": True}, {"prompt_ids": [5, 7], "completion_ids": [9, eos], "label": False}]
    collate = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id)
    with pytest.raises(PreflightError, match="shared_prompt: pair 1"):
        preflight_pairs(tok, rows, collate, 8, "kto")
    rows[1]["prompt_ids"] = [5, 6]
    assert preflight_pairs(tok, rows, collate, 8, "kto")["samples"] == 1


# --------------------------------------------------------------------------------------------------
# Recipes


@pytest.mark.parametrize("sets, message", [
    (["stages=[dpo]"], "use [sft] or [cpt, sft], optionally followed by one of dpo, orpo, kto, grpo"),
    (["stages=[sft, dpo, grpo]"], "optionally followed by one of"),
    (["stages=[sft, kto]", "preference=null"], "no `preference:` section"),
    (["grpo.rewards=[correctnes]"], "did you mean 'correctness'"),
    (["grpo.reward_weights=[1.0]"], "reward_weights has 1 weights for 2 rewards"),
])
def test_recipe_stage_orders_and_sections_are_checked(sets, message):
    path = RECIPES / ("math.yaml" if "grpo" in " ".join(sets) else "medical.yaml")
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(path, sets)


def test_grpo_prompts_keep_the_rows_with_an_extractable_answer():
    from finetune.pairs import grpo_rows

    recipe, _ = load_recipe(RECIPES / "math.yaml", ["grpo.val_prompts=1"])
    train = [{"id": "a", "prompt": "P1", "completion": "So 3 + 4 = 7.\nThe answer is \\boxed{7}."},
             {"id": "b", "prompt": "P2", "completion": "It depends on the context."}]
    tr, va, info = grpo_rows(recipe, train, [{"id": "c", "prompt": "P3", "completion": "#### 12"}, {"id": "d", "prompt": "P4", "completion": "#### 5"}])
    assert tr == [{"id": "a", "prompt": "P1", "answer": "7"}]
    assert va == [{"id": "c", "prompt": "P3", "answer": "12"}]
    assert info == {"prompts": {"train": 1, "val": 1}, "without_answer": 1}


# --------------------------------------------------------------------------------------------------
# End to end: [sft, dpo], [sft, orpo], [sft, kto], [sft, grpo] on the tiny stand-ins


PATHS = {"dpo": "medical", "orpo": "medical", "kto": "medical", "grpo": "math"}


@pytest.fixture(scope="module")
def after_sft_runs(tmp_path_factory):
    from finetune.pipeline import make_context, run_stages, start

    out = {}
    for stage, recipe in PATHS.items():
        d = tmp_path_factory.mktemp(f"after-sft-{stage}") / "run"
        ctx, resolved = make_context(str(RECIPES / f"{recipe}.yaml"), [f"stages=[sft, {stage}]"], True, str(d), [])
        start(ctx, resolved)
        outcome = run_stages(ctx)
        out[stage] = (d, outcome)
    return out


@pytest.mark.parametrize("stage", list(PATHS))
def test_stage_after_sft_runs_end_to_end_with_three_columns(after_sft_runs, stage):
    from safetensors.torch import load_file

    d, outcome = after_sft_runs[stage]
    assert outcome == {s: "ran" for s in ("prepare", "sft", stage, "merge", "eval", "card", "publish")}
    summary = json.loads((d / stage / "training_summary.json").read_text())
    assert summary["stage"] == stage and summary["continued_from"] == "sft" and summary["global_step"] == summary["planned_steps"] > 0
    if stage in ("dpo", "kto"):
        assert summary["reference"]["reference"] == "sft_adapter" and summary["reference"]["tensors_checked"] > 0
    if stage != "grpo":
        assert json.loads((d / f"logs/preflight-{stage}.json").read_text())["passed"]
    # three columns on every task, and the stage's own metric for base, SFT and the final model
    report = json.loads((d / "eval/report.json").read_text())
    assert report["stages"] == ["sft", stage]
    for t in report["tasks"]:
        assert t["sft"] and t["tuned"] and t["merged"] and len(t["tuned_vs_sft_ci95"]) == 2
    if stage == "grpo":
        g = report["grpo"]
        assert g["n"] == len((d / "data/grpo_val.jsonl").read_text().splitlines()) > 0
        assert set(g["mean_reward"]) == {"base", "sft", "tuned"}
    else:
        p = report["preference"]
        assert p["stage"] == stage and p["n"] == len((d / "data/pairs_val.jsonl").read_text().splitlines()) > 0
        assert set(p["preference_accuracy"]) == {"base", "sft", "tuned"} and p["reward_accuracy"]["ci95"][0] <= p["reward_accuracy"]["score"]
    md = (d / "eval/report.md").read_text()
    assert f"| SFT | delta [95% CI] | {stage} (adapter) | delta vs SFT [95% CI] | merged (published) | delta [95% CI] |" in md
    # the shipped adapter is the stage's, which moved off the SFT adapter; the card says which stages ran
    published = sorted((d / "hub").rglob("adapter_model.safetensors"))[-1]
    ours, sft = load_file(d / stage / "adapter_model.safetensors"), load_file(d / "adapter/adapter_model.safetensors")
    assert set(load_file(published)) == set(ours)
    assert all((load_file(published)[k] == ours[k]).all() for k in ours)
    assert max(float((ours[k] - sft[k]).abs().max()) for k in ours) > 0
    card = (d / "card/README.md").read_text()
    assert f"stages: sft → {stage}" in card


# --------------------------------------------------------------------------------------------------
# The reference model is the SFT policy


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A medical smoke run with stages [sft, dpo], prepared and trained up to SFT (in-process)."""
    from finetune.pipeline import make_context, run_stages, start

    d = tmp_path_factory.mktemp("ref") / "run"
    ctx, resolved = make_context(str(RECIPES / "medical.yaml"), ["stages=[sft, dpo]"], True, str(d), [])
    start(ctx, resolved)
    run_stages(ctx, ("prepare", "sft"))
    return ctx


def _completion_logps(model, batch):
    """Sum of log p over each sequence's completion tokens, computed here from the logits (not by trl)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)


def test_reference_log_probs_are_the_sft_models_not_the_bases(sft_run):
    import torch
    from peft import PeftModel

    from finetune import preference, train
    from finetune.errors import StageFailed
    from finetune.models import load_model

    recipe, run = sft_run.recipe, sft_run.run
    tok, model, *_ = train._model_with_adapter(recipe, run, "dpo")
    train_ds, val_ds = preference.stage_datasets(run, "dpo")
    trainer, _ = train._trainer(recipe, run, "dpo", model, tok, train_ds, val_ds, run.root / ".t", train.GuardState())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))

    # independently: a fresh load of the base with the SFT adapter, and the base alone
    sft = PeftModel.from_pretrained(load_model(recipe.base_model.id, recipe, quantized=True), str(run.adapter)).eval()
    by_sft = _completion_logps(sft, batch)
    with sft.disable_adapter():
        by_base = _completion_logps(sft, batch)
    assert float((by_sft - by_base).abs().max()) > 1e-2  # SFT moved the model: the comparison below can fail
    assert torch.allclose(ref, by_sft, atol=1e-4), (ref, by_sft)
    assert float((ref - by_base).abs().max()) > 1e-2

    # training moves the policy and leaves the reference where it was
    policy0 = _completion_logps(trainer.model, batch)
    assert torch.allclose(policy0, by_sft, atol=1e-4)  # the policy starts as the SFT model too
    trainer.args.max_steps = 3
    trainer.train()
    trainer.model.eval()
    assert float((_completion_logps(trainer.model, batch) - policy0).abs().max()) > 1e-3
    assert torch.allclose(torch.cat(trainer.compute_ref_log_probs(trainer.model, batch)), ref, atol=1e-5)

    # LLaMA-Factory's failure mode (no reference adapter: trl would disable the adapter, the base) is refused
    trainer.model.delete_adapter("ref")
    with pytest.raises(StageFailed, match="reference adapter is missing"):
        preference.check_reference(trainer.model, run.adapter)


# --------------------------------------------------------------------------------------------------
# SIGTERM in a DPO stage, then resume: equal to an uninterrupted run

DPO_SETS = ["stages=[sft, dpo]", "preference.max_steps=-1", "preference.num_train_epochs=2", "training.save_steps=3",
            "lora.lora_dropout=0.1"]


def _dpo_command(run_dir, interrupt=None):
    args = ["dpo", str(RECIPES / "medical.yaml"), "--smoke", "--run-dir", str(run_dir), *[a for s in DPO_SETS for a in ("--set", s)]]
    head = [sys.executable, "-m", "tests.interrupt", *interrupt, "--"] if interrupt else [sys.executable, "-m", "finetune.cli"]
    return subprocess.run(head + args, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})


def _dpo_losses(run_dir: Path):
    return [(m["step"], m["loss"]) for m in map(json.loads, (run_dir / "logs/metrics-dpo.jsonl").read_text().splitlines()) if "loss" in m]


@pytest.fixture(scope="module")
def dpo_sft_done(tmp_path_factory):
    from finetune.pipeline import make_context, run_stages, start

    d = tmp_path_factory.mktemp("dpo-resume") / "run"
    ctx, resolved = make_context(str(RECIPES / "medical.yaml"), DPO_SETS, True, str(d), [])
    start(ctx, resolved)
    run_stages(ctx, ("prepare", "sft"))
    return d


def test_sigterm_in_dpo_then_resume_equals_an_uninterrupted_run(dpo_sft_done, tmp_path):
    from safetensors.torch import load_file

    ref, d = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(dpo_sft_done, ref)
    shutil.copytree(dpo_sft_done, d)
    done = _dpo_command(ref)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = json.loads((ref / "dpo/training_summary.json").read_text())["planned_steps"]
    assert [s for s, _ in _dpo_losses(ref)] == list(range(1, steps + 1)) and steps > 5

    stopped = _dpo_command(d, interrupt=["--at-step", "5", "--signal", "TERM"])
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "stopped by SIGTERM after step 5" in stopped.stderr
    assert (d / "checkpoints-dpo/step-000005").is_dir() and not (d / "dpo").exists()
    kept = load_file(d / "checkpoints-dpo/step-000005/adapter_model.safetensors")

    resumed = _dpo_command(d)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dpo: resuming from" in resumed.stderr
    assert _dpo_losses(d) == _dpo_losses(ref)  # every step once, each with the uninterrupted run's loss
    final, uninterrupted = load_file(d / "dpo/adapter_model.safetensors"), load_file(ref / "dpo/adapter_model.safetensors")
    assert max(float((final[k] - kept[k]).abs().max()) for k in final) > 1e-4  # it trained after the resume
    assert max(float((final[k] - uninterrupted[k]).abs().max()) for k in final) <= 1e-6
    assert json.loads((d / "dpo/training_summary.json").read_text())["resumed_from_step"] == 5


# --------------------------------------------------------------------------------------------------
# `finetune data pairs`: pairs from the run's own SFT model


class _Judge:
    """A stand-in teacher: prefers the answer containing `good`, or (biased) always answers A."""

    name = "stand-in judge"

    def __init__(self, good: str | None):
        self.good, self.prompts = good, []

    def complete(self, prompt, *, max_tokens, temperature, top_p=1.0, stop=None):
        from data_prep.synth.teacher import Completion

        self.prompts.append(prompt)
        if self.good is None:
            return Completion("A", False)
        a = prompt.split("Answer A:")[1].split("Answer B:")[0]
        return Completion("A" if self.good in a else "B.", False)


def test_checker_pairs_a_right_answer_with_a_wrong_one():
    from finetune.selfpairs import checker_pair

    samples = ["3 + 4 = 8, so \\boxed{8}", "3 + 4 = 7.\nThe answer is \\boxed{7}", "I think 7.0"]
    got, what = checker_pair(samples, "7", None)
    assert what == "pair" and got["chosen"] == samples[1] and got["rejected"] == samples[0] and got["correct_samples"] == 2
    assert checker_pair(samples[1:], "7", None) == (None, "all correct")
    assert checker_pair(samples[:1], "7", None) == (None, "none correct")
    # a right answer cut off at the token cap is never the chosen one
    assert checker_pair(samples, "7", None, cut={samples[1]})[0]["chosen"] == samples[2]
    assert checker_pair(samples, "7", None, cut={samples[1], samples[2]}) == (None, "none correct")
    got, what = checker_pair(samples[:1], "7", "The answer is \\boxed{7}.")
    assert got["chosen"] == "The answer is \\boxed{7}." and got["chosen_is_reference"]


def test_judge_verdicts_must_survive_swapping_the_answers():
    from finetune.selfpairs import judge_pair

    fair = _Judge("relieves pain")
    got, what = judge_pair(fair, "What is an analgesic?", "A pain reliever.", "A bandage.", "A medicine that relieves pain.")
    assert what == "pair" and got == {"chosen": "A medicine that relieves pain.", "rejected": "A bandage."}
    assert len(fair.prompts) == 2 and all("Reference answer" in p and "A pain reliever." in p for p in fair.prompts)
    biased = _Judge(None)  # always "A": it picks a different answer once they are swapped
    assert judge_pair(biased, "q", None, "x", "y") == (None, "judge inconsistent when swapped")
    assert "Reference answer" not in biased.prompts[0]


def test_data_pairs_from_a_run_resume_and_read_back_as_pairs(after_sft_runs, tmp_path):
    from finetune.selfpairs import make_pairs

    d, _ = after_sft_runs["grpo"]  # the math smoke run: its rows have checkable answers
    from finetune.answers import extract

    gold = {r["prompt"]: extract(r["completion"]) for r in map(json.loads, (d / "data/train.jsonl").read_text().splitlines())}
    calls = []

    def sampler(prompt, k, seed):  # hand-written answers: odd prompts get one right and one wrong, even ones only right ones
        calls.append(prompt)
        right = f"So the total is {gold[prompt]}.\nThe answer is \\boxed{{{gold[prompt]}}}."
        texts = ["The answer is \\boxed{-12345}.", right] + ["x"] * (k - 2) if len(calls) % 2 else [right] * k
        return [(t, False) for t in texts]

    out = tmp_path / "pairs.jsonl"
    first = make_pairs(d, out, k=3, limit=2, sampler=sampler)
    assert first["method"] == "checker" and first["prompts"] == 2 and len(calls) == 2
    again = make_pairs(d, out, k=3, limit=4, sampler=sampler)  # continues: only the two new prompts are sampled
    assert len(calls) == 4 and again["prompts"] == 4 and again["samples"] == 12
    assert again["pair"] == again["pairs"] == 2 and again["all correct"] == 2
    first_pair = json.loads(out.read_text().splitlines()[0])
    assert first_pair["rejected"] == "The answer is \\boxed{-12345}." and first_pair["origin"]["method"] == "checker"
    got = _collect(tmp_path, [json.loads(line) for line in out.read_text().splitlines()])
    assert len(got.rows) == again["pairs"] and not got.rejects  # every written pair is a valid pair
    with pytest.raises(Exception, match="other settings"):
        make_pairs(d, out, k=5, limit=4, sampler=sampler)

    # the real SFT model samples k answers per prompt
    real = make_pairs(d, tmp_path / "real.jsonl", k=2, limit=1, max_new_tokens=8)
    assert real["samples"] == 2 and real["prompts"] == 1


@pytest.mark.slow
def test_adding_a_stage_after_sft_to_a_finished_run_does_not_retrain_sft(tmp_path):
    from finetune.pipeline import make_context, run_stages, start

    d = tmp_path / "run"
    ctx, resolved = make_context(str(RECIPES / "medical.yaml"), [], True, str(d), [])
    start(ctx, resolved)
    assert run_stages(ctx)["sft"] == "ran"
    sft = (d / "adapter/adapter_model.safetensors").read_bytes()
    ctx, resolved = make_context(str(RECIPES / "medical.yaml"), ["stages=[sft, dpo]"], True, str(d), [])
    start(ctx, resolved)
    outcome = run_stages(ctx)
    assert outcome["prepare"] == "ran" and outcome["sft"] == "skipped" and outcome["dpo"] == "ran"
    assert (d / "adapter/adapter_model.safetensors").read_bytes() == sft


def test_a_nan_in_a_dpo_step_stops_it_naming_the_step(dpo_sft_done, tmp_path, monkeypatch):
    from finetune.errors import StageFailed
    from finetune.pipeline import make_context, run_stages, start

    from .test_reliability import nan_at

    d = tmp_path / "run"
    shutil.copytree(dpo_sft_done, d)
    nan_at(monkeypatch, {5, 6})  # a DPO step runs two forwards in training mode: the policy's and the reference's
    ctx, resolved = make_context(str(RECIPES / "medical.yaml"), DPO_SETS, True, str(d), [])
    start(ctx, resolved)
    with pytest.raises(StageFailed, match=r"non-finite loss and gradient norm at optimizer step 3 \(epoch"):
        run_stages(ctx, ("prepare", "sft", "dpo"))
    assert json.loads((d / "manifest.json").read_text())["stages"]["dpo"]["status"] == "failed"
    assert not (d / "dpo").exists()


def test_preference_metrics_from_log_probs():
    import numpy as np

    from finetune.stage_eval import grpo_metrics, preference_metrics

    # chosen/rejected log-probs of 4 pairs under each model, written out by hand
    logps = {"base": (np.array([-10.0, -8, -9, -7]), np.array([-9.0, -9, -8, -8])),
             "sft": (np.array([-6.0, -5, -7, -4]), np.array([-5.0, -6, -6, -5])),
             "tuned": (np.array([-5.0, -5, -8, -3]), np.array([-7.0, -6, -6, -7]))}
    out = preference_metrics(logps)
    assert out["n"] == 4
    assert [out["preference_accuracy"][c]["correct"] for c in ("base", "sft", "tuned")] == [2, 2, 3]
    # margins by hand: (tuned_c - sft_c) - (tuned_r - sft_r) = [1 - -2, 0 - 0, -1 - 0, 1 - -2] = [3, 0, -1, 3]
    assert out["reward_margin"]["score"] == pytest.approx(5 / 4)
    assert out["reward_accuracy"]["correct"] == 2  # strictly positive: 3 and 3
    lo, hi = out["reward_margin"]["ci95"]
    assert -1 <= lo <= 5 / 4 <= hi <= 3
    g = grpo_metrics({"base": {"correctness": [0, 0, 1, 0], "boxed_format": [1, 0, 0, 0]},
                      "sft": {"correctness": [1, 0, 1, 0], "boxed_format": [1, 1, 1, 1]},
                      "tuned": {"correctness": [1, 1, 1, 0], "boxed_format": [1, 1, 1, 1]}}, [1.0, 0.2])
    assert g["n"] == 4 and g["mean_reward"]["base"]["score"] == pytest.approx((1 + 0.2) / 4)
    assert g["mean_reward"]["tuned"]["score"] == pytest.approx((3 + 0.8) / 4) and g["rewards"]["sft"] == {"correctness": 0.5, "boxed_format": 1.0}
