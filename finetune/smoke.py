"""`--smoke`: any recipe end to end on a CPU in a couple of minutes, offline.

The base model becomes a tiny randomly initialised model of the same family (families.py), with a tokenizer of the
real base's kind (`samples.tokenizer`: byte-level BPE, or SentencePiece-style) trained in milliseconds on the recipe's
sample data; data and eval come from the recipe's `samples`; steps are capped; 4-bit quantisation still runs; publish goes to file://RUN/hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_prep.jsonl import lines as jsonl_lines

from .errors import UserError
from .families import check_family, infer_family
from .recipe import PREFERENCE_STAGES, Recipe, apply_overrides, parse_recipe, resolve_path
from .run import RunDir

SMOKE_STEPS = 20  # enough for the loss to move and a checkpoint to be written, ~1 s of training on 2 cores
SMOKE_MAX_LENGTH = 256
SMOKE_VOCAB = 1000
SENTENCEPIECE_FAMILIES = {"llama", "mistral", "mixtral"}  # families whose real bases include SentencePiece vocabularies

# A ChatML-style template with generation markers (so assistant masks work with any tool that asks for them).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def smoke_recipe(recipe: Recipe, recipe_dir: Path, run: RunDir, overrides: list[str] | None = None) -> Recipe:
    """The recipe as --smoke runs it; what changes is visible in RUN/recipe.yaml. The user's `--set` overrides are
    applied again on top, so an explicit `--set training.max_steps=5` wins over the smoke cap."""
    if recipe.samples is None:
        raise UserError("--smoke needs a `samples:` section (samples.data: a small JSONL written for this recipe)")
    family = check_family(infer_family(recipe.base_model.id, recipe.base_model.family))
    d = recipe.model_dump()
    d["base_model"].update(id=str(run.base.resolve()), family=family, revision="main", dtype="float32")
    sample_data = resolve_path(recipe_dir, recipe.samples.data)
    # Sample data is written for this project, under the project's licence.
    d["data"]["sources"] = [{"path": str(sample_data), "format": "auto", "license": "apache-2.0"}]
    # The recipe's extra eval sets are the real ones (often on the Hub); the smoke run checks against its sample eval set.
    d["data"]["quality"]["decontaminate"]["against"] = []
    d["data"]["max_length"] = min(recipe.data.max_length, SMOKE_MAX_LENGTH)
    d["data"].update(val_fraction=0.15, val_max=16)
    # Sample files hold 16 to 40 rows; a smoke run checks the pipeline, not the model. Still far from one row.
    d["data"]["min_rows"] = min(recipe.data.min_rows, 8)
    d["training"].update(
        max_steps=SMOKE_STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        # A random 100k-parameter model needs a far larger step than a 7B one to move visibly in 20 steps.
        learning_rate=2e-3,
        warmup_steps=0,
        activation_checkpointing=False,
        logging_steps=1,
        save_steps=10,
        eval_steps=None,
        optim="adamw_torch",
    )
    d["quantization"]["compute_dtype"] = "float32"
    # The recipe's tasks read the real eval sets (often on the Hub); the smoke run scores the sample tasks written for it,
    # of the same types, plus perplexity on the sample held-out rows.
    tasks = []
    for t in recipe.samples.tasks:
        task = t.model_dump(exclude_none=True)
        task["path"] = str(resolve_path(recipe_dir, t.path))
        for key in ("prompt_file", "include_ids", "exclude_ids"):
            if task.get(key):
                task[key] = str(resolve_path(recipe_dir, task[key]))
        tasks.append(task)
    if recipe.samples.eval:
        tasks.append({"name": f"{recipe.domain}-samples", "type": "perplexity", "path": str(resolve_path(recipe_dir, recipe.samples.eval))})
    d["eval"].update(tasks=tasks, batch_size=8)
    if recipe.cpt is not None:
        if "cpt" in recipe.stages and len(recipe.samples.cpt) < len(recipe.cpt.sources):
            raise UserError(f"--smoke with stages [cpt, sft] needs samples.cpt: one sample document file per cpt source ({len(recipe.cpt.sources)})")
        d["cpt"]["sources"] = [{"path": str(resolve_path(recipe_dir, p)), "format": "text", "license": "apache-2.0", "weight": s.weight}
                               for p, s in zip(recipe.samples.cpt, recipe.cpt.sources)] or d["cpt"]["sources"]
        d["cpt"].update(block_size=min(recipe.cpt.block_size, 64), max_steps=SMOKE_STEPS // 2, learning_rate=2e-3, val_fraction=0.1)
    if recipe.preference is not None:
        if recipe.stages[-1] in PREFERENCE_STAGES and not recipe.samples.pairs:
            raise UserError(f"--smoke with stages {recipe.stages} needs samples.pairs: a small JSONL of {{prompt, chosen, rejected}} rows")
        if recipe.samples.pairs:
            d["preference"]["sources"] = [{"path": str(resolve_path(recipe_dir, recipe.samples.pairs)), "format": "pairs", "license": "apache-2.0"}]
        # A random tiny model moves only with a large step; beta as the recipe says
        d["preference"].update(max_steps=SMOKE_STEPS // 2, learning_rate=2e-3, warmup_steps=0, val_fraction=0.25, val_max=8)
    if recipe.grpo is not None:
        d["grpo"].update(max_steps=4, learning_rate=2e-3, num_generations=4, max_completion_length=12, val_prompts=4, max_prompts=16)
    if recipe.expand is not None:  # the stand-in's layer count, not the real base's
        from .expand import stand_in_blocks
        from .families import _TINY

        d["expand"]["blocks"] = stand_in_blocks(_TINY["num_hidden_layers"])
    if recipe.cpt is not None and recipe.cpt.vocabulary is not None and recipe.cpt.vocabulary.add:
        d["cpt"]["vocabulary"]["add"] = min(recipe.cpt.vocabulary.add, SMOKE_VOCAB // 4)  # sample documents hold a few hundred new tokens at most
    d["merge"].update(enabled=True, probes=4)
    d["publish"].update(to=f"file://{(run.root / 'hub').resolve()}", what=["adapter", "merged"], private=True)
    # A random 100k-parameter model's scores are noise: the regression gate would refuse at random. The licence and
    # PII gates still run.
    d["publish"]["gate"]["max_regression"] = None
    d["samples"] = None
    # `samples.*` overrides were applied to the recipe this started from, and the smoke recipe has no samples section.
    again = [o for o in overrides or [] if not o.split("=", 1)[0].strip().startswith("samples.")]
    return parse_recipe(apply_overrides(d, again), "recipe (--smoke)")


def _corpus(sample_files: list[Path]) -> list[str]:
    """Text the tiny tokenizer is trained on: the sample rows plus the template's fixed strings."""
    from .templates import ALPACA_PROMPT, ALPACA_PROMPT_INPUT

    texts = [ALPACA_PROMPT, ALPACA_PROMPT_INPUT]
    for path in sample_files:
        if not path.is_file():  # a folder or a missing file: the data build says what is wrong with it
            continue
        # undecodable bytes only weaken the stand-in's vocabulary; the build rejects those rows with their row numbers
        for line in jsonl_lines(path.read_bytes().decode("utf-8", errors="replace")):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            texts.extend(_strings(row))
    # The stand-in's vocabulary is published with it (RUN/hub): learn it from text with personal data redacted, as
    # the training rows are, so no name or number of the samples survives as a merged token.
    from data_prep.quality.pii import Scanner

    return [t for t, _ in Scanner().scan_texts(texts)]


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def build_tokenizer(texts: list[str], kind: str = "byte_level"):
    """A tokenizer trained on `texts`: byte-level BPE, or with kind="sentencepiece" one shaped like Llama 2's and Mistral's."""
    if kind == "sentencepiece":
        return build_sentencepiece_tokenizer(texts)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SMOKE_VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    bos = tk.token_to_id("<s>")
    # Like Llama/Mistral tokenizers: every encoded sequence starts with BOS.
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_sentencepiece_tokenizer(texts: list[str]):
    """The layout of Llama 2's and Mistral-7B v0.1's tokenizer.json (what transformers converts their tokenizer.model to):
    ids 0-2 `<unk>` `<s>` `</s>`, then the 256 byte tokens `<0x00>`..`<0xFF>` that byte fallback spells unknown
    characters with, then the learned pieces, words marked by a leading `▁`; a space is prepended to each text (and to
    each piece of text after a special token). The chat and pad tokens are added after the base vocabulary, as a
    fine-tune adds them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    base = ["<unk>", "<s>", "</s>"]
    learn = Tokenizer(models.BPE(unk_token="<unk>"))
    # Pieces never cross a word boundary (SentencePiece's default): learn on words, each with its leading `▁`.
    learn.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    learn.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=SMOKE_VOCAB - 256, special_tokens=base, show_progress=False))
    learned = json.loads(learn.to_str())["model"]
    vocab = {t: i for i, t in enumerate(base)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in base])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_base(recipe: Recipe, recipe_dir: Path, run: RunDir, family: str, seed: int = 0) -> None:
    """Write the tiny stand-in (safetensors + tokenizer) to RUN/base, unless an identical one is there."""
    import torch
    from transformers import AutoModelForCausalLM

    from .families import tiny_config

    files = [resolve_path(recipe_dir, p) for p in [recipe.samples.data, recipe.samples.eval, *[t.path for t in recipe.samples.tasks if t.path],
                                                   *recipe.samples.cpt] if p]
    key = {"family": family, "samples": [str(p) for p in files], "sizes": [p.stat().st_size if p.exists() else -1 for p in files], "seed": seed, "version": 2}
    # Only Llama 2 and Mistral-family bases have SentencePiece vocabularies; a recipe run as another family (--set
    # base_model.family=qwen2) gets that family's byte-level kind (transformers also loads a qwen2 folder's tokenizer
    # with Qwen2's byte-level pre-tokenizer, whatever tokenizer.json says).
    kind = recipe.samples.tokenizer if family in SENTENCEPIECE_FAMILIES else "byte_level"
    if kind != "byte_level":  # stand-ins built before the field existed keep their key
        key["tokenizer"] = kind
    stamp = run.base / "standin.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        return
    tok = build_tokenizer(_corpus(files), kind)
    cfg = tiny_config(family, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with run.staged("base") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "standin.json").write_text(json.dumps(key))
