"""Training you can trust, in-process: checkpoint resolution and rotation, non-finite guards, fully masked batches,
gradient-accumulation equivalence, the preflight, overlong policies."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune import checkpoints
from finetune.errors import StageFailed
from finetune.pipeline import make_context, run_stages, start
from finetune.preflight import PreflightError, check_batch, check_rows, preflight, render
from finetune.smoke import build_tokenizer
from finetune.templates import encode, truncate

from .conftest import RECIPES

BASE = ["training.save_steps=1", "training.save_total_limit=20", "training.max_steps=6"]


def go(run_dir, *sets, stages=("prepare", "sft")):
    ctx, resolved = make_context(str(RECIPES / "legal.yaml"), list(sets), True, str(run_dir), [])
    start(ctx, resolved)
    return run_stages(ctx, stages)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prepared") / "run"
    go(d, stages=("prepare",))
    return d


def copy(prepared, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(prepared, d)
    return d


def step_losses(run_dir):
    return [(m["step"], m["loss"]) for m in map(json.loads, (run_dir / "logs/metrics.jsonl").read_text().splitlines()) if "loss" in m]


# ---- checkpoints


def fake_checkpoint(ckpt_dir, step, tmp_path):
    src = tmp_path / f"trainer/checkpoint-{step}"
    src.mkdir(parents=True)
    for name in checkpoints.REQUIRED + ("rng_state.pth", "training_args.bin"):
        (src / name).write_bytes(b"x" * step)
    return checkpoints.finalize(src, ckpt_dir, step)


def test_only_complete_checkpoints_are_resumed_from(tmp_path):
    ck = tmp_path / "checkpoints"
    fake_checkpoint(ck, 10, tmp_path)
    assert not (ck / "step-000010/training_args.bin").exists()  # a pickle resume never reads: not kept
    # A newer folder still being written, a newer one without its marker, one whose file was truncated after marking.
    (ck / "step-000030.tmp").mkdir()
    (ck / "step-000030.tmp/adapter_model.safetensors").write_bytes(b"partial")
    (ck / "step-000040").mkdir()
    (ck / "step-000040/adapter_model.safetensors").write_bytes(b"x")
    fake_checkpoint(ck, 50, tmp_path)
    (ck / "step-000050/optimizer.pt").write_bytes(b"cut")
    assert checkpoints.latest(ck).name == "step-000010"
    fake_checkpoint(ck, 9, tmp_path)  # by number, not by name or time: 10 is still the newest
    assert checkpoints.latest(ck).name == "step-000010"
    checkpoints.sweep(ck)
    assert sorted(p.name for p in ck.iterdir()) == ["step-000009", "step-000010"]


def test_a_checkpoint_missing_what_resume_needs_is_never_marked(tmp_path):
    src = tmp_path / "checkpoint-5"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="lacks optimizer.pt"):
        checkpoints.finalize(src, tmp_path / "ck", 5)
    assert not list((tmp_path / "ck").iterdir())


def test_rotation_never_leaves_none_even_when_a_delete_crashes(tmp_path, monkeypatch):
    ck = tmp_path / "checkpoints"
    fake_checkpoint(ck, 1, tmp_path)
    checkpoints.rotate(ck, 1)
    assert [p.name for p in checkpoints.complete(ck)] == ["step-000001"]  # the only one is kept
    fake_checkpoint(ck, 2, tmp_path)
    real_rmtree = shutil.rmtree

    def crash(path, *a, **kw):
        if str(path).endswith(".deleting") and path.exists():  # renamed out of sight, then killed mid-delete
            (path / "scheduler.pt").unlink()
            raise KeyboardInterrupt("killed while deleting")
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.rotate(ck, 1)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    assert [p.name for p in checkpoints.complete(ck)] == ["step-000002"]
    assert checkpoints.latest(ck).name == "step-000002"
    checkpoints.rotate(ck, 1)  # the next rotation sweeps the half-deleted folder
    assert sorted(p.name for p in ck.iterdir()) == ["step-000002"]


# ---- guards


def nan_at(monkeypatch, steps):
    """Make the model's output NaN in the training forwards of `steps` (1-based; one micro-batch per step)."""
    import finetune.train as train

    real = train.with_adapter
    seen = {"n": 0}

    def hooked(model, *a, **kw):
        peft_model = real(model, *a, **kw)

        def poison(module, args, output):
            if module.training:
                seen["n"] += 1
                if seen["n"] in steps:
                    return output * float("nan")
            return output

        peft_model.get_input_embeddings().register_forward_hook(poison)  # (trl fuses the lm_head into its loss)
        return peft_model

    monkeypatch.setattr(train, "with_adapter", hooked)


def test_nan_stops_training_naming_the_step_and_no_nonfinite_checkpoint(prepared, tmp_path, monkeypatch):
    d = copy(prepared, tmp_path)
    nan_at(monkeypatch, {3})
    with pytest.raises(StageFailed, match=r"non-finite loss and gradient norm at optimizer step 3 \(epoch"):
        go(d, *BASE)
    assert [p.name for p in checkpoints.complete(d / "checkpoints")] == ["step-000001", "step-000002"]
    for p in checkpoints.complete(d / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in load_file(p / "adapter_model.safetensors").values())
    assert json.loads((d / "manifest.json").read_text())["stages"]["sft"]["status"] == "failed"
    assert not (d / "adapter").exists()


def test_nan_within_patience_is_skipped_and_counted(prepared, tmp_path, monkeypatch):
    d = copy(prepared, tmp_path)
    nan_at(monkeypatch, {3})
    go(d, *BASE, "training.nonfinite_patience=1")
    summary = json.loads((d / "adapter/training_summary.json").read_text())
    assert summary["skipped_nonfinite_steps"] == 1 and summary["global_step"] == 6
    weights = load_file(d / "adapter/adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # The skipped step changed nothing: its checkpoint's weights equal the one before it.
    w2 = load_file(d / "checkpoints/step-000002/adapter_model.safetensors")
    w3 = load_file(d / "checkpoints/step-000003/adapter_model.safetensors")
    w4 = load_file(d / "checkpoints/step-000004/adapter_model.safetensors")
    assert all(torch.equal(w2[k], w3[k]) for k in w2) and not all(torch.equal(w3[k], w4[k]) for k in w3)
    lines = [json.loads(line) for line in (d / "logs/metrics.jsonl").read_text().splitlines()]
    assert any(line.get("skipped_steps") == 1 for line in lines)


def test_fully_masked_batches_give_a_finite_zero_loss_and_no_update(prepared, tmp_path):
    """trl drops examples without any supervised label; what is left to guard is a micro-batch whose only labels sit
    on first positions, which the next-token shift leaves with nothing to predict: 0 / 0 without trl's clamp."""
    from finetune.train import train

    d = copy(prepared, tmp_path)
    rows = [json.loads(line) for line in (d / "data/train.jsonl").read_text().splitlines()]
    for r in rows:
        r["labels"] = [r["input_ids"][0]] + [-100] * (len(r["labels"]) - 1)
    (d / "data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx, resolved = make_context(str(RECIPES / "legal.yaml"), [*BASE, "training.max_steps=3", "training.preflight_samples=0"], True, str(d), [])
    start(ctx, resolved)
    train(ctx.recipe, ctx.run)
    losses = [loss for _, loss in step_losses(d)]
    assert losses == [0.0, 0.0, 0.0]
    summary = json.loads((d / "adapter/training_summary.json").read_text())
    assert summary["masked_batches"] == 3
    # Zero gradients: LoRA's B matrices are still their initial zeros, so the adapter is a no-op.
    weights = load_file(d / "adapter/adapter_model.safetensors")
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(torch.count_nonzero(v) == 0 for v in b)


def test_micro_batch_times_accumulation_gives_the_same_training(prepared, tmp_path):
    """4x1, 2x2 and 1x4 on rows of different lengths: the loss is normalised by the supervised tokens of the whole
    optimizer step (not averaged per micro-batch), so the three are the same optimisation.

    The tolerances come from float32, not from one machine's luck (a fixed 1e-5 failed on a fresh clone at 1.8e-5):
    - a step's loss is a sum over its supervised tokens taken in another order; recursive summation of n terms errs by
      at most (n - 1) * eps * sum|x| (Higham, Accuracy and Stability of Numerical Algorithms, 2.2), so per step
      tol = n_tokens * eps * |loss|;
    - Adam divides by sqrt(v): a coordinate whose gradient is ~0 can take a different step in any order, so the
      weights are compared as a whole, relative Frobenius distance below 1e-3 of their size.
    A run on other batches (another seed) is the effect this guards against; it must land far outside both."""
    eps = torch.finfo(torch.float32).eps
    runs = {}
    configs = ((4, 1, 42), (2, 2, 42), (1, 4, 42), (4, 1, 7))
    for mb, ga, seed in configs:
        d = tmp_path / f"mb{mb}-{seed}"
        shutil.copytree(prepared, d)
        go(d, "training.max_steps=4", "lora.lora_dropout=0.0", f"training.per_device_train_batch_size={mb}",
           f"training.gradient_accumulation_steps={ga}", f"training.seed={seed}")
        runs[(mb, ga, seed)] = (step_losses(d), load_file(d / "adapter/adapter_model.safetensors"))
    rows = [json.loads(line) for line in (prepared / "data/train.jsonl").read_text().splitlines()]
    assert len({len(r["input_ids"]) for r in rows}) > 5 and len({r["labels"].count(-100) for r in rows}) > 5  # padding matters
    n_tokens = 4 * max(sum(x != -100 for x in r["labels"]) for r in rows)  # supervised tokens of a 4-row step, at most

    def loss_gap(a, b):  # worst step, in units of that step's tolerance
        return max(abs(x - y) / (n_tokens * eps * abs(y)) for (_, x), (_, y) in zip(a, b))

    def weight_gap(a, b):
        num = sum(((a[k] - b[k]).float() ** 2).sum() for k in b) ** 0.5
        return (num / sum((b[k].float() ** 2).sum() for k in b) ** 0.5).item()

    (ref_losses, ref_w) = runs[(4, 1, 42)]
    assert [s for s, _ in ref_losses] == [1, 2, 3, 4]
    assert max(v.abs().max().item() for k, v in ref_w.items() if "lora_B" in k) > 1e-4  # it trained
    other_losses, other_w = runs[(4, 1, 7)]
    assert loss_gap(other_losses, ref_losses) > 10 and weight_gap(other_w, ref_w) > 1e-2  # the checks can fail
    for key in ((2, 2, 42), (1, 4, 42)):
        losses, w = runs[key]
        assert [s for s, _ in losses] == [1, 2, 3, 4]
        assert loss_gap(losses, ref_losses) < 1, (key, losses, ref_losses)
        assert weight_gap(w, ref_w) < 1e-3, key


# ---- preflight


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["Define tort. A civil wrong. Below is an instruction that describes a task. ### Response:"] * 5)


def rows_for(tok, template, n=3):
    out = []
    for i in range(n):
        row = {"instruction": f"Define tort {i}.", "input": "", "output": f"A civil wrong {i}." + " Indeed." * i, "source": "s.jsonl", "row": i + 1}
        e = encode(tok, row, template)
        out.append({**row, "prompt": e.prompt, "completion": e.completion, "input_ids": e.input_ids, "labels": e.labels})
    return out


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_preflight_passes_what_prepare_writes(tok, template):
    assert not check_rows(tok, rows_for(tok, template), template, None, 256).problems


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_preflight_catches_each_failure_and_names_it(tok, template):
    def broken(edit):
        rows = rows_for(tok, template, 1)
        edit(rows[0])
        return {p.check for p in check_rows(tok, rows, template, None, 256).problems}

    bos = tok.bos_token_id
    eos = tok.eos_token_id
    assert broken(lambda r: (r["input_ids"].insert(0, bos), r["labels"].insert(0, -100))) >= {"bos"}
    assert broken(lambda r: r["labels"].__setitem__(-1, -100)) == {"eos"}  # the EOS masked (pad == eos collators did this)
    first = lambda r: next(i for i, x in enumerate(r["labels"]) if x != -100)  # noqa: E731
    assert "prompt_masked" in broken(lambda r: r["labels"].__setitem__(first(r) - 1, r["input_ids"][first(r) - 1]))
    assert "parity" in broken(lambda r: r.__setitem__("instruction", r["instruction"] + " (edited)"))

    def cut(r):  # truncated by someone else: the answer's end and its EOS gone
        r["input_ids"], r["labels"] = r["input_ids"][:-2], r["labels"][:-2]
    assert "eos" in broken(cut)
    assert "truncation" in {p.check for p in check_rows(tok, rows_for(tok, template, 1), template, None, 10).problems}
    ours = truncate(encode(tok, {"instruction": "Define tort.", "output": "A civil wrong. " * 40}, template), 100, eos)
    row = {"instruction": "Define tort.", "output": "A civil wrong. " * 40, "truncated": True, "prompt": ours.prompt,
           "completion": ours.completion, "input_ids": ours.input_ids, "labels": ours.labels}
    assert len(ours.input_ids) == 100 and not check_rows(tok, [row], template, None, 100).problems  # truncation that keeps the EOS is fine


def test_preflight_marker_missing_when_the_template_has_no_generation_prompt(tok):
    bare = build_tokenizer(["Define tort. A civil wrong."] * 5)
    bare.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    rows = rows_for(bare, "chat", 1)
    assert {p.check for p in check_rows(bare, rows, "chat", None, 256).problems} == {"marker"}


def test_preflight_collator_check_with_pad_equal_to_eos():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = build_tokenizer(["Define tort. A civil wrong."] * 5)
    tok.pad_token = tok.eos_token
    items = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows_for(tok, "alpaca", 3)]
    assert len({len(i["input_ids"]) for i in items}) > 1  # the batch is padded, with pad == eos
    assert check_batch(tok, DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id), items) == []

    def masking_collator(examples):  # the trl#1623 bug: labels from input_ids with every pad id (== eos) masked
        batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)([{"input_ids": e["input_ids"]} for e in examples])
        batch["labels"][batch["input_ids"] == tok.pad_token_id] = -100
        return batch

    problems = check_batch(tok, masking_collator, items)
    assert problems and "supervises 0 EOS tokens, the examples 3 (pad == eos)" in problems[0]


def test_preflight_message_is_redacted_unless_asked(tok):
    rows = rows_for(tok, "alpaca", 2)
    rows[1]["labels"][-1] = -100
    with pytest.raises(PreflightError) as e:
        preflight(tok, rows, "alpaca", None, 256, show=False)
    msg = str(e.value)
    assert "eos (1 sample), e.g. s.jsonl row 2" in msg and "--show-example" in msg
    assert "civil wrong" not in msg and "Define tort" not in msg and "response tokens]" in msg
    with pytest.raises(PreflightError) as e:
        preflight(tok, rows, "alpaca", None, 256, show=True)
    assert "Define tort 1." in str(e.value) and "«A civil wrong 0.»</s>" in render(tok, rows[0]["input_ids"], rows[0]["labels"], True)


def test_preflight_runs_before_training_and_in_validate(prepared, tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    d = copy(prepared, tmp_path)
    go(d, "training.max_steps=1")
    assert json.loads((d / "logs/preflight.json").read_text()) == {
        "samples": 26, "passed": True, "failures": {c: 0 for c in ("bos", "eos", "prompt_masked", "marker", "truncation", "parity")}}
    # A prepared row broken after the fact stops training before the first step, exit 2 from the CLI.
    rows = [json.loads(line) for line in (d / "data/train.jsonl").read_text().splitlines()]
    rows[0]["labels"][-1] = -100
    (d / "data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from finetune.run import RunDir
    from finetune.train import train

    with pytest.raises(PreflightError, match="eos"):
        train(RunDir(d).load_recipe()[0], RunDir(d))
    out = CliRunner().invoke(app, ["validate", str(RECIPES / "math.yaml"), "--smoke", "--preflight"])
    assert out.exit_code == 0 and "preflight:" in out.output and "passed" in out.output, out.output


# ---- overlong policies


@pytest.mark.parametrize("policy", ["drop", "truncate", "error"])
def test_overlong_policy_counts_and_truncation_keeps_the_eos(tmp_path, policy):
    from data_prep.errors import DataError
    from finetune.prepare import prepare
    from finetune.recipe import load_recipe
    from finetune.run import RunDir

    tok = build_tokenizer(["question answer " * 20] * 3)
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"question {i}", "output": "answer " * (3 if i % 4 else 200)} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [f"data.sources=[{{path: '{data}', format: alpaca}}]", "eval.tasks=[]", "data.max_length=200", f"data.overlong={policy}",
            "data.quality.max_reject_rate=0.5", "data.quality.dedupe=none", "data.min_rows=1"]
    r, _ = load_recipe(RECIPES / "legal.yaml", sets)
    if policy == "error":
        with pytest.raises(DataError, match=r"row 1: \d+ tokens > max_length 200 \(overlong: error\)"):
            prepare(r, tmp_path, RunDir(tmp_path / "run"), tok)
        return
    stats = prepare(r, tmp_path, RunDir(tmp_path / "run"), tok)
    out = [json.loads(line) for f in ("train", "val") for line in (tmp_path / f"run/data/{f}.jsonl").read_text().splitlines()]
    assert all(len(x["input_ids"]) <= 200 and x["labels"][-1] == tok.eos_token_id for x in out)
    if policy == "drop":
        assert stats["overlong_dropped"] == 5 and stats["overlong_truncated"] == 0 and len(out) == 15
    else:
        assert stats["overlong_truncated"] == 5 and stats["overlong_dropped"] == 0 and len(out) == 20
        assert sum(1 for x in out if x.get("truncated")) == 5


def test_packed_rows_score_like_separate_rows(prepared):
    """`training.packing`: rows concatenated padding-free (trl's collator, position ids restarting per row) give every
    token the loss it has alone, and no label reaches across rows."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [json.loads(line) for line in (prepared / "data/train.jsonl").read_text().splitlines()][:4]
    items = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    model = AutoModelForCausalLM.from_pretrained(prepared / "base", dtype=torch.float32).eval()
    pad = DataCollatorForLanguageModeling(pad_token_id=3)(items)
    packed = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=True)(items)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed

    def token_losses(batch):
        with torch.no_grad():
            # use_cache=False as in trl's compute_loss: with a cache, transformers does not look for packed rows
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none")
        return nll[labels != -100]

    alone, together = token_losses(pad), token_losses(packed)
    assert alone.numel() == together.numel() == sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    assert torch.allclose(alone, together, atol=1e-5)
    # Without the restarting position ids the rows would attend to each other: the check can fail.
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    assert (token_losses(leaky) - alone).abs().max() > 1e-3
    # The first token of each row is never a label, so no row is trained to follow the one before it.
    starts = (packed["position_ids"][0] == 0).nonzero().flatten()
    assert (packed["labels"][0, starts] == -100).all()
