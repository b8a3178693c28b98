"""Vocabulary extension (issue 20, finetune/vocab.py): every old id kept, text shorter per byte on documents the tokens
were not learned from, every document decoding back to its text, new rows initialised as the mean of their pieces'
rows (checked against a computation that goes through the base tokenizer's own BPE), and a [cpt, sft] run with the
grown vocabulary that evaluates in bits per byte, merges, and publishes a model that loads without finetune."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from data_prep.errors import DataError

from .conftest import RECIPES, ROOT
from .test_real_model import smollm2, smollm2_gguf  # noqa: F401  (fixtures: the real SmolLM2-135M tokenizer)

JA_DOCS = RECIPES / "samples" / "ja_docs.jsonl"
ENGLISH = ["The patient was reviewed at follow-up and the dose was lowered.", "Sam has 12 pens and buys 7 more."]


def _docs() -> list[str]:
    return [json.loads(line)["text"] for line in JA_DOCS.read_text(encoding="utf-8").splitlines()]


def _tokenizer(kind: str, smollm2_dir=None):
    if kind == "smollm2":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(smollm2_dir)
    from finetune.smoke import build_tokenizer

    # an English stand-in of Llama 2's layout: Japanese falls back to bytes, as with the real Llama 2 for most kanji
    english = [json.loads(line)["text"] for p in ("medical_docs.jsonl", "general_docs.jsonl") for line in (RECIPES / "samples" / p).read_text().splitlines()]
    return build_tokenizer(english, kind)


@pytest.fixture(params=["smollm2", "sentencepiece", "byte_level"])
def base_tok(request):
    if request.param == "smollm2":
        return request.param, _tokenizer("smollm2", request.getfixturevalue("smollm2"))
    return request.param, _tokenizer(request.param)


def test_extension_keeps_every_id_shortens_held_out_text_and_round_trips(base_tok):
    from finetune import vocab

    kind, tok = base_tok
    learn, held = vocab.held_out(_docs(), 0.1)
    assert len(held) == 4 and not set(held) & set(learn)
    ext, entries = vocab.learn_merges(tok, learn, 300, 2)
    assert len(entries) == 300 and len(ext) == len(tok) + 300
    old, new = tok.get_vocab(), ext.get_vocab()
    assert all(new[t] == i for t, i in old.items())  # every old token (specials and added tokens too) keeps its id
    assert sorted(e["id"] for e in entries) == list(range(len(tok), len(tok) + 300))
    before, after = vocab.tokens_per_byte(tok, held), vocab.tokens_per_byte(ext, held)
    assert after < 0.85 * before, (kind, before, after)
    for doc in held + learn + ENGLISH:
        assert ext.decode(ext.encode(doc, add_special_tokens=False)) == tok.decode(tok.encode(doc, add_special_tokens=False))
        assert len(ext.encode(doc)) <= len(tok.encode(doc))  # merges appended after the base's: text never gets longer
    for text in ENGLISH:  # text without the learned pieces tokenizes exactly as before
        assert ext.encode(text) == tok.encode(text)
    print(f"{kind}: tokens per byte on {len(held)} held-out documents {before:.3f} -> {after:.3f}")


def test_the_round_trip_proof_can_fail(monkeypatch):
    """Merging byte-fallback tokens (`<0xE5>` + `<0xBE>`) makes a token the decoder spells literally: the bug the split
    at bytes prevents, and the proof catches."""
    from finetune import vocab

    tok = _tokenizer("sentencepiece")
    monkeypatch.setattr(vocab, "_split_at_bytes", lambda units: [units])
    ext, _ = vocab.learn_merges(tok, _docs(), 1000, 2)
    with pytest.raises(DataError, match="does not decode back"):
        vocab.prove(tok, ext, _docs())


def test_moved_ids_are_refused():
    from finetune import vocab

    tok = _tokenizer("sentencepiece")

    class Shifted:
        def get_vocab(self):
            v = dict(tok.get_vocab())
            v["<pad>"] += 1
            return v

    with pytest.raises(DataError, match="moved the id of 1 existing tokens"):
        vocab.check_ids(tok, Shifted())


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_are_the_mean_of_their_pieces(tied):
    from transformers import AutoModelForCausalLM

    from finetune import vocab
    from finetune.families import tiny_config

    tok = _tokenizer("sentencepiece")
    ext, entries = vocab.learn_merges(tok, _docs(), 120, 2)
    cfg = tiny_config("llama", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    info = vocab.fit(model, entries, len(ext))
    assert info == {"rows": len(ext), "subword_mean": 120, "mean_resizing": 0, "tied": tied}
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(emb[: len(tok)], emb0) and torch.equal(head[: len(tok)], head0)  # old rows untouched
    # Independently: the new token's string as the extended tokenizer stores it, split by the base tokenizer's own BPE
    # model (byte fallback included), looked up in the base's vocabulary.
    base_bpe, base_ids = tok.backend_tokenizer.model, tok.get_vocab()
    for token_id in range(len(tok), len(ext)):
        piece = ext.convert_ids_to_tokens(token_id)
        ids = [base_ids[t.value] for t in base_bpe.tokenize(piece)]
        assert len(ids) >= 2
        assert torch.allclose(emb[token_id], emb0[ids].mean(0), atol=1e-6)
        assert torch.allclose(head[token_id], head0[ids].mean(0), atol=1e-6)
    # the check can fail: transformers' own initialisation (mean_resizing's draw) gives other rows
    plain = AutoModelForCausalLM.from_config(cfg)
    plain.resize_token_embeddings(len(ext), mean_resizing=True)
    assert float((plain.get_input_embeddings().weight[len(tok):] - emb[len(tok):]).detach().abs().max()) > 1e-3


def test_vocabulary_recipe_checks(tmp_path):
    from finetune.errors import UserError
    from finetune.recipe import apply_overrides, load_recipe, parse_recipe

    recipe, _ = load_recipe(RECIPES / "japanese.yaml")
    d = json.loads(json.dumps(recipe.model_dump()))
    for sets, message in ((["cpt.vocabulary.tokens_file=t.txt"], "exactly one of `add`"), (["stages=[sft]"], "add `cpt` to stages"),
                          (["cpt.vocabulary.add=0"], "cpt.vocabulary.add"), (["cpt.vocabulary.from=all"], "cpt.vocabulary.from")):
        with pytest.raises(UserError, match=message):
            parse_recipe(apply_overrides(json.loads(json.dumps(d)), sets))


def test_a_missing_tokens_file_is_one_message_and_exit_2(tmp_path):
    recipe = tmp_path / "ja.yaml"
    text = (RECIPES / "japanese.yaml").read_text(encoding="utf-8")
    recipe.write_text(text.replace("samples/", str(RECIPES / "samples") + "/").replace("    add: 13043", "    tokens_file: ja_tokens.txt"), encoding="utf-8")
    (tmp_path / "ja_token.txt").write_text("防災\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", str(recipe)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "cpt.vocabulary.tokens_file: ja_tokens.txt (did you mean 'ja_token.txt'?)" in out.stderr


def test_listed_tokens_are_added_and_proved(tmp_path):
    from finetune import vocab

    tok = _tokenizer("byte_level")
    listed = tmp_path / "tokens.txt"
    one = next(w for w in ("the", "he", "e") if len(tok.encode(w, add_special_tokens=False)) == 1)
    listed.write_text(f"避難所\n防災\n\n防災\n{one}\n", encoding="utf-8")  # a repeat, an empty line and a token the base has are skipped
    words = vocab.listed_tokens(listed, tok)
    assert words == ["避難所", "防災"]
    ext, entries = vocab.listed(tok, words)
    vocab.check_ids(tok, ext)
    proof = vocab.prove(tok, ext, _docs())
    assert proof["corpus_tokens"]["after"] < proof["corpus_tokens"]["before"]
    assert [e["id"] for e in entries] == [len(tok), len(tok) + 1] and all(len(e["pieces"]) >= 2 for e in entries)


# --------------------------------------------------------------------------------------------------
# The whole [cpt, sft] run


@pytest.fixture(scope="module")
def ja_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ja") / "run"
    cmd = [sys.executable, "-m", "finetune.cli", "run", str(RECIPES / "japanese.yaml"), "--smoke", "--run-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)  # run twice: nothing to redo
    return run, out, again


def test_cpt_sft_run_with_a_grown_vocabulary_evaluates_merges_and_publishes(ja_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.run import RunDir, read_json

    root, _, again = ja_run
    run = RunDir(root)
    assert again.returncode == 0 and "ran" not in [line.split()[-1] for line in again.stdout.splitlines() if line.split()], again.stdout
    v = read_json(run.data / "provenance.json")["vocabulary"]
    assert v["added"] > 50 and v["size"] == v["base_tokens"] + v["added"]
    assert v["tokens_per_byte"]["after"] < v["tokens_per_byte"]["before"] and v["corpus_tokens"]["after"] < v["corpus_tokens"]["before"]
    base_tok = AutoTokenizer.from_pretrained(run.base)
    ext = AutoTokenizer.from_pretrained(run.tokenizer)
    assert len(ext) == v["size"] and all(ext.get_vocab()[t] == i for t, i in base_tok.get_vocab().items())
    # CPT trained the embeddings and lm_head whole (the new rows with them), and SFT carried them on
    cpt = read_json(run.cpt / "training_summary.json")
    assert cpt["vocabulary"]["rows"] == len(ext) and cpt["vocabulary"]["subword_mean"] == v["added"]
    assert set(read_json(run.adapter / "adapter_config.json")["modules_to_save"]) == {"embed_tokens", "lm_head"}
    from safetensors.torch import load_file

    after_cpt, after_sft = load_file(run.cpt / "adapter_model.safetensors"), load_file(run.adapter / "adapter_model.safetensors")
    embeddings = [k for k in after_cpt if "embed_tokens" in k or "lm_head" in k]
    assert embeddings and all(torch.equal(after_cpt[k], after_sft[k]) for k in embeddings)  # SFT leaves them as CPT trained them
    assert any(not torch.equal(after_cpt[k], after_sft[k]) for k in after_cpt if "lora_B" in k)  # while the LoRA trained on
    assert "## Vocabulary" in (run.data / "datacard.md").read_text(encoding="utf-8")
    # eval: the base read with its own tokenizer, the same text, compared per byte
    report = read_json(run.eval / "report.json")
    ppl = [t for t in report["tasks"] if t["type"] == "perplexity"]
    assert ppl and all(t["metric"] == "bits_per_byte" and {"base", "tuned", "merged"} <= set(t) for t in ppl)
    items = [json.loads(line) for line in (run.eval / "items" / "heldout.jsonl").read_text().splitlines()]
    assert items and all(i["base"]["bytes"] == i["tuned"]["bytes"] == i["merged"]["bytes"] for i in items)
    assert sum(i["tuned"]["tokens"] for i in items) < sum(i["base"]["tokens"] for i in items)  # each read its own tokenization
    # merged: a plain transformers model with the grown vocabulary and its tokenizer
    merged = AutoModelForCausalLM.from_pretrained(run.merged)
    mtok = AutoTokenizer.from_pretrained(run.merged)
    assert merged.config.vocab_size == len(mtok) == len(ext) and mtok.get_vocab() == ext.get_vocab()
    text = _docs()[0]
    assert len(mtok.encode(text)) < len(base_tok.encode(text))
    assert read_json(run.merge_check)["passed"]
    # published: the adapter with its tokenizer, and the merged model
    from finetune.publish import latest_revision

    rev = latest_revision(run.root / "hub")
    assert json.loads((rev / "tokenizer.json").read_text()) == json.loads((run.tokenizer / "tokenizer.json").read_text())
    assert (rev / "merged" / "model.safetensors").exists()
    card = (rev / "README.md").read_text(encoding="utf-8")
    assert "tokens per byte" in card.lower()


def test_the_published_adapter_loads_with_peft_alone_on_the_grown_vocabulary(ja_run, tmp_path):
    """A user with the published folder and the base: peft's AutoPeftModelForCausalLM finds the tokenizer beside the adapter,
    grows the base's embeddings to it, and computes what the run trained."""
    import shutil

    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoTokenizer

    from finetune.merge import logits, max_diff, probe_batch
    from finetune.publish import latest_revision
    from finetune.run import RunDir
    from finetune.runbase import load, tokenizer

    run = RunDir(ja_run[0])
    recipe, _ = run.load_recipe()
    copy = tmp_path / "published"
    shutil.copytree(latest_revision(run.root / "hub"), copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(run.base)  # the smoke stand-in, where the Hub id of a real base would be
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    theirs = AutoPeftModelForCausalLM.from_pretrained(copy).eval()
    ours = PeftModel.from_pretrained(load(recipe, run, quantized=False, dtype=torch.float32)[0], str(run.adapter)).eval()
    ids, mask, _ = probe_batch(run, 4, tokenizer(recipe, run).pad_token_id)
    assert int(ids.max()) >= len(AutoTokenizer.from_pretrained(run.base))  # the probes use new tokens
    assert max_diff(logits(theirs, ids, mask), logits(ours, ids, mask), mask) <= 1e-5


def test_the_grown_vocabulary_exports_to_gguf_with_the_same_token_ids(ja_run, tmp_path):
    from finetune.export import export

    got = export(ja_run[0], "gguf", "f16", out=tmp_path / "gguf")
    check = json.loads(next((tmp_path / "gguf").glob("*.json")).read_text())["files"][got["file"]]
    assert check["passed"] and check["tokenizer_same_ids"] and check["tokenizer_texts"] >= 4, check["failures"]


def test_finetune_eval_on_the_run_reads_the_grown_vocabulary_and_refuses_the_bare_adapter(ja_run, tmp_path):
    from finetune.publish import latest_revision

    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"tasks:\n  - {{name: ja, type: perplexity, path: {RECIPES / 'samples' / 'ja_eval.jsonl'}}}\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "finetune.cli", "eval", str(ja_run[0]), "--tasks", str(tasks), "--out", str(tmp_path / "e")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    task = json.loads((tmp_path / "e" / "report.json").read_text())["tasks"][0]
    assert task["metric"] == "bits_per_byte" and task["tuned"]["score"] < task["base"]["score"]
    bare = subprocess.run([sys.executable, "-m", "finetune.cli", "eval", str(ja_run[0] / "base"), "--adapter", str(latest_revision(ja_run[0] / "hub")),
                           "--tasks", str(tasks), "--out", str(tmp_path / "f")], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert bare.returncode == 2 and "grown vocabulary" in bare.stderr, bare.stderr[-2000:]


def test_the_listed_tokens_are_part_of_prepare_fingerprint(tmp_path):
    """Editing tokens_file reruns prepare (it is read there, like a source file)."""
    from finetune import stages
    from finetune.pipeline import make_context

    listed = tmp_path / "tokens.txt"
    listed.write_text("避難所\n", encoding="utf-8")
    sets = ["cpt.vocabulary.add=null", f"cpt.vocabulary.tokens_file={listed}"]
    ctx, _ = make_context(str(RECIPES / "japanese.yaml"), sets, True, str(tmp_path / "run"), [])
    before = stages.get("prepare").inputs(ctx)[1]
    listed.write_text("避難所\n防災\n", encoding="utf-8")
    after = stages.get("prepare").inputs(ctx)[1]
    assert str(listed) in before and before[str(listed)] != after[str(listed)]
