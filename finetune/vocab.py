"""Vocabulary extension for continued pretraining (issue 20; ELYZA's Japanese Llama 2 and Chinese-LLaMA did this before
their CPT): text in a language or notation the base tokenizer splits badly costs several tokens per character, so the
same context window holds less of it and every step of training and generation does more work per byte.

1. New tokens: learned from the CPT corpus with the tokenizers library (`train_new_from_iterator` trains a BPE of the
   base tokenizer's own kind: its normalizer, pre-tokenizer and byte handling), taken in merge order (most frequent
   first), keeping only strings the base splits into two or more pieces and that decode to whole characters; or read
   from `tokens_file`. A share of the corpus (`held_out`, by content hash) is kept out of the learning.
2. They are appended to the base tokenizer (`add_tokens`), so every existing token keeps its id; checked, not assumed.
3. The extended tokenizer must shorten the corpus and decode every document back to the bytes the base tokenizer gives
   back (`prove`): the run stops before any training otherwise.
4. Embeddings and lm_head grow (`fit`): each new row is the mean of the rows of the pieces the base tokenizer split the
   token into (its meaning as the base model read it); a token without pieces gets transformers' `mean_resizing` draw
   (seeded). The CPT stage trains both matrices (peft `modules_to_save`), and SFT continues them.

The comparison across vocabularies is per byte (tokens per byte here, bits per byte in the eval), never per token.
What prepare writes: RUN/data/tokenizer/ (the extended tokenizer) with new_tokens.json (each token, its id and its base
pieces: what `fit` initialises from, so later loads need no base tokenizer), and `vocabulary` in provenance.json.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from data_prep.errors import DataError

from .errors import UserError

log = logging.getLogger("finetune")

NEW_TOKENS = "new_tokens.json"
# Merges are learned from at most this much text (SentencePiece samples its input the same way): enough for tens of
# thousands of merges, and learning stays in minutes and a few GB for a corpus of any size. The proofs and the tokens
# per byte still read every document.
LEARN_BYTES = 256 * 2**20


def held_out(texts: list[str], share: float) -> tuple[list[str], list[str]]:
    """(learn, held out): the `share` of the documents (at least one, when there are two or more) with the smallest
    content hashes is held out, so the split does not depend on the order of the corpus."""
    if share <= 0 or len(texts) < 2:
        return texts, []
    order = sorted(range(len(texts)), key=lambda i: hashlib.sha256(texts[i].encode("utf-8")).digest())
    held = set(order[: max(1, round(share * len(texts)))])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def within(texts: list[str], budget: int) -> list[str]:
    """The documents, in content-hash order, up to `budget` bytes (at least one): what the merges are learned from."""
    out, used = [], 0
    for t in sorted(texts, key=lambda t: hashlib.sha256(t.encode("utf-8")).digest()):
        size = len(t.encode("utf-8"))
        if out and used + size > budget:
            break
        out.append(t)
        used += size
    return out


def _pieces(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _words(backend, texts: list[str]) -> list[str]:
    """The words of `texts` as the tokenizer's BPE model sees them (its own normalizer and pre-tokenizer decide)."""
    out = []
    for text in texts:
        norm = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        if backend.pre_tokenizer is not None:
            out += [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(norm)]
        else:  # SentencePiece as transformers converts it (Llama 2, Mistral): its pieces never span a `▁` word start
            out += re.split("(?=\u2581)", norm)
    return [w for w in out if w]


def _units(backend, words: list[str]) -> list[list[str]]:
    """Each word as the BPE model spells it: a list of token strings."""
    return [[t.value for t in backend.model.tokenize(w)] for w in words]


def _split_at_bytes(units: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for u in units:
        if len(u) == 6 and u.startswith("<0x") and u.endswith(">"):
            out.append([])
        else:
            out[-1].append(u)
    return [p for p in out if p]


def _private(i: int) -> str:
    """The i-th private-use character: a stand-in for one base token while the tokenizers library learns merges."""
    return chr(0xE000 + i) if i < 6400 else chr(0xF0000 + i - 6400)


def learn_merges(tok, texts: list[str], n: int, min_frequency: int) -> tuple[Any, list[dict[str, Any]]]:
    """The base tokenizer grown by up to `n` tokens learned from `texts`, and each new token's entry (new_tokens.json).

    BPE is continued, not restarted: every word is first spelled in the base's own tokens, and the tokenizers library's
    BpeTrainer learns merges over those (each base token stands in as one private-use character). The merges are appended
    after the base's, so the base's merges run first and unchanged, and each new merge only joins two adjacent pieces of
    that result: a text can only get shorter, and it decodes to the same bytes. With byte fallback (Llama 2, Mistral),
    characters the base spells as bytes first become tokens of their own, the most bytes saved first."""
    import tempfile

    from tokenizers import Tokenizer, models, trainers
    from transformers import AutoTokenizer

    if not getattr(tok, "is_fast", False):
        raise UserError("cpt.vocabulary.add learns tokens with a fast (tokenizers) tokenizer; this base has a slow one: give "
                        "cpt.vocabulary.tokens_file instead")
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError(f"cpt.vocabulary.add extends BPE tokenizers (Llama, Mistral, Qwen, SmolLM, GPT-2 style); this base's is "
                        f"{model.get('type')}: give cpt.vocabulary.tokens_file instead")
    vocab: dict[str, int] = model["vocab"]
    # The tokenizers library numbers added tokens (<pad>, chat markers) after the model's vocabulary when it loads one: grown
    # in place, they would move. Written into the model's vocabulary at their own ids, they stay (they are still matched
    # as added tokens first, and no merge produces them).
    taken = set(vocab.values())
    for a in spec.get("added_tokens", []):
        if a["id"] not in taken:
            vocab.setdefault(a["content"], a["id"])
    next_id = max(vocab.values()) + 1
    old_ids = dict(vocab)
    pieces: dict[str, list[int]] = {}  # new token string -> the base ids it replaces
    entries: list[dict[str, Any]] = []

    def add(token: str, replaces: list[int]) -> None:
        nonlocal next_id
        vocab[token] = next_id
        pieces[token] = replaces
        entries.append({"token": token, "id": next_id, "pieces": replaces})
        next_id += 1

    backend = tok.backend_tokenizer
    word_counts = Counter(_words(backend, texts))  # each distinct word is spelled once, however often it occurs
    if model.get("byte_fallback"):  # characters spelled in bytes first: each saves (bytes - 1) tokens wherever it occurs
        counts: Counter[str] = Counter()
        for w, c in word_counts.items():
            for ch in w:
                if ch not in vocab:
                    counts[ch] += c
        spelled = {ch: [old_ids[u.value] for u in backend.model.tokenize(ch)] for ch, c in counts.items() if c >= min_frequency}
        for ch in sorted(spelled, key=lambda c: (-(counts[c] * (len(spelled[c]) - 1)), c))[:n]:
            if len(spelled[ch]) > 1:
                add(ch, spelled[ch])
    words: Counter[tuple[str, ...]] = Counter()
    if len(entries) < n:
        model["vocab"] = vocab
        grown = Tokenizer.from_str(json.dumps(spec))  # with the new characters, as the merges will see them
        for w, c in word_counts.items():
            spelled_w = _units(grown, [w])[0]
            # with byte fallback a merged "<0xE5><0xBE>" would decode as those characters: bytes stay apart
            for part in _split_at_bytes(spelled_w) if model.get("byte_fallback") else [spelled_w]:
                words[tuple(part)] += c
    if words:
        units = sorted({u for w in words for u in w})
        code = {u: _private(i) for i, u in enumerate(units)}
        back = {c: u for u, c in code.items()}
        learner = Tokenizer(models.BPE())
        # ~1.5x the merges needed: some of them only rebuild a token the base already has (no new row, still a saving)
        trainer = trainers.BpeTrainer(vocab_size=len(units) + int(1.5 * (n - len(entries))) + 50, min_frequency=min_frequency,
                                      initial_alphabet=list(code.values()), limit_alphabet=len(units), show_progress=False)
        coded = {w: "".join(code[u] for u in w) for w in words}
        learner.train_from_iterator((coded[w] for w, c in words.items() for _ in range(c)), trainer)
        merges = model["merges"]
        as_text = bool(merges) and isinstance(merges[0], str)
        for m in json.loads(learner.to_str())["model"]["merges"]:
            a, b = (m.split(" ", 1) if isinstance(m, str) else m)
            a, b = "".join(back[c] for c in a), "".join(back[c] for c in b)
            if len(entries) >= n:
                break
            merges.append(f"{a} {b}" if as_text else [a, b])
            if a + b not in vocab:
                add(a + b, [*pieces.get(a, [old_ids[a]] if a in old_ids else []), *pieces.get(b, [old_ids[b]] if b in old_ids else [])])
    model["vocab"] = vocab
    with tempfile.TemporaryDirectory() as d:  # the same tokenizer class and settings, with the grown tokenizer.json
        tok.save_pretrained(d)
        Path(d, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        ext = AutoTokenizer.from_pretrained(d)
    for e in entries:
        e["text"] = ext.convert_tokens_to_string([e["token"]])
    return ext, entries


def listed_tokens(path: Path, tok) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cpt.vocabulary.tokens_file {path}: cannot read it as UTF-8 text ({e})") from None
    out, seen = [], set()
    for line in lines:
        t = line.rstrip("\r\n")
        if not t.strip() or t in seen or len(_pieces(tok, t)) < 2:
            continue
        seen.add(t)
        out.append(t)
    if not out:
        raise UserError(f"cpt.vocabulary.tokens_file {path}: no token to add (every line is empty or already one token)")
    return out


def listed(tok, tokens: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    """A copy of `tok` with `tokens` added as they are (`add_tokens`: each matches wherever its text occurs)."""
    ext = copy.deepcopy(tok)
    ext.add_tokens(tokens)
    return ext, [{"token": t, "text": t, "id": ext.convert_tokens_to_ids(t), "pieces": _pieces(tok, t)} for t in tokens]


def check_ids(tok, ext) -> None:
    """Refuse if any existing token's id moved."""
    before, after = tok.get_vocab(), ext.get_vocab()
    moved = [t for t, i in before.items() if after.get(t) != i]
    if moved:
        raise DataError(f"cpt.vocabulary: adding tokens moved the id of {len(moved)} existing tokens (e.g. {moved[0]!r}); refusing to train")
    return ext


def _encode_all(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False)["input_ids"] if texts else []  # batched: the fast tokenizer runs in parallel


def tokens_per_byte(tok, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return sum(map(len, _encode_all(tok, texts))) / n_bytes if n_bytes else float("nan")


def prove(base, ext, docs: list[str]) -> dict[str, Any]:
    """The proofs at start: every document decodes back to what the base tokenizer gives back, and the corpus gets shorter."""
    old_ids, new_ids = _encode_all(base, docs), _encode_all(ext, docs)
    for i, (want, got) in enumerate(zip(base.batch_decode(old_ids), ext.batch_decode(new_ids))):
        if got != want:
            at = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise DataError(f"cpt.vocabulary: document {i + 1} of the corpus does not decode back to its text with the extended "
                            f"tokenizer (first difference at character {at}: {want[max(0, at - 10):at + 10]!r} became "
                            f"{got[max(0, at - 10):at + 10]!r}); refusing to train")
    old_n, new_n = sum(map(len, old_ids)), sum(map(len, new_ids))
    if new_n >= old_n:
        raise DataError(f"cpt.vocabulary: the extended tokenizer does not shorten the corpus ({old_n} tokens before, {new_n} after); "
                        "the new tokens do not occur in it")
    return {"documents_round_trip": len(docs), "corpus_tokens": {"before": old_n, "after": new_n}}


def build(recipe, recipe_dir: Path, tok, docs_by_source: list[list[str]]) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    """The extended tokenizer, the report for provenance.json, and new_tokens.json's entries."""
    from data_prep.spec import resolve_path

    v = recipe.cpt.vocabulary
    corpus = docs_by_source[0] if v.from_ == "corpus" else [d for docs in docs_by_source for d in docs]
    learn, held = held_out(corpus, v.held_out)
    if v.add is not None:
        ext, entries = learn_merges(tok, within(learn, LEARN_BYTES), v.add, v.min_frequency)
        if not entries:
            raise DataError(f"cpt.vocabulary.add: the corpus ({len(learn)} documents) yields no new token (none occurs "
                            f"cpt.vocabulary.min_frequency={v.min_frequency} times)")
        if len(entries) < v.add:
            log.warning("cpt.vocabulary: %d new tokens found of the %d asked for (the corpus is small)", len(entries), v.add)
    else:
        ext, entries = listed(tok, listed_tokens(resolve_path(recipe_dir, v.tokens_file), tok))
    check_ids(tok, ext)
    proof = prove(tok, ext, corpus)
    tokens = [e["text"] for e in entries]
    measured = held or corpus
    report = {
        "base_tokens": len(tok), "added": len(entries), "how": "learned merges" if v.add is not None else "added tokens",
        "size": len(ext), "learned_from": v.from_ if v.add is not None else "tokens_file",
        "learned_on_documents": len(within(learn, LEARN_BYTES)) if v.add is not None else 0,
        "tokens_per_byte": {"sample": "held_out" if held else "corpus", "documents": len(measured),
                            "before": round(tokens_per_byte(tok, measured), 4), "after": round(tokens_per_byte(ext, measured), 4)},
        "tokens_per_byte_corpus": {"before": round(tokens_per_byte(tok, corpus), 4), "after": round(tokens_per_byte(ext, corpus), 4)},
        # whole-character tokens for people to read (byte-level BPE also learns pieces of a character's UTF-8 bytes)
        **proof, "examples": [t for t in tokens if "\ufffd" not in t][:20], "init": "subword_mean",
    }
    log.info("cpt.vocabulary: %d tokens added (%d -> %d); tokens per byte on %d held-out documents %.3f -> %.3f", len(tokens), len(tok),
             len(ext), len(measured), report["tokens_per_byte"]["before"], report["tokens_per_byte"]["after"])
    return ext, report, entries


def save(folder: Path, ext, entries: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ext.save_pretrained(folder)
    (folder / NEW_TOKENS).write_text(json.dumps(entries, ensure_ascii=False, indent=1), encoding="utf-8")


def new_tokens(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / NEW_TOKENS).read_text(encoding="utf-8"))


def fit(model, entries: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """Grow the input embeddings and lm_head to `size` rows and initialise each new token's row as the mean of its base
    pieces' rows (module docstring, step 4). Deterministic: every load of the run's base gets the same rows."""
    import torch

    rows = model.get_input_embeddings().weight.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the mean_resizing draw for tokens without pieces
        model.resize_token_embeddings(max(rows, size), mean_resizing=True)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    fallback = 0
    with torch.no_grad():
        for e in entries:
            if not e["pieces"]:
                fallback += 1
                continue
            idx = torch.tensor(e["pieces"], device=emb.device)
            emb[e["id"]] = emb[idx].float().mean(0).to(emb.dtype)
            if head is not None and not tied:
                head.weight[e["id"]] = head.weight[idx].float().mean(0).to(head.weight.dtype)
    return {"rows": max(rows, size), "subword_mean": len(entries) - fallback, "mean_resizing": fallback, "tied": tied}


def datacard_lines(prov: dict[str, Any]) -> list[str]:
    """The data card's section on the grown vocabulary (provenance.json `vocabulary`)."""
    v = prov.get("vocabulary")
    if not v:
        return []
    tpb = v["tokens_per_byte"]
    return ["## Vocabulary", "", f"The base tokenizer ({v['base_tokens']:,} tokens) grew by {v['added']:,} "
            f"({'BPE merges learned from' if v['how'] == 'learned merges' else 'tokens listed for'} the CPT corpus) to {v['size']:,}; "
            f"every existing id is unchanged and all {v['documents_round_trip']} corpus documents decode back to their text "
            f"(tokenizer in tokenizer/). Tokens per byte on {tpb['documents']} {'held-out ' if tpb['sample'] == 'held_out' else ''}"
            f"documents {tpb['before']:.3f} -> {tpb['after']:.3f}; whole corpus {v['tokens_per_byte_corpus']['before']:.3f} -> "
            f"{v['tokens_per_byte_corpus']['after']:.3f}. Lengths above are in tokens of the grown tokenizer.", ""]
