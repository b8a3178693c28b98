"""`finetune export RUN_DIR --to gguf`: the verified merged model as one GGUF file (llama.cpp, Ollama, LM Studio),
written with the `gguf` package (pure Python: no llama.cpp build), checked by loading it back through transformers'
own GGUF reader, with an Ollama Modelfile beside it.

What is written (RUN/export/ unless --out):
- `<name>-<dtype>.gguf`: tensors renamed by gguf's own name map for the architecture; llama and mistral q/k
  projections permuted to llama.cpp's rotary layout (the inverse of what transformers undoes on load); norms and other
  1-D tensors in float32 as llama.cpp keeps them; 2-D weights in f16, bf16 or q8_0 (gguf quantizes Q8_0 itself). The
  tokenizer (tokens, types, and merges for a byte-level BPE or scores for a SentencePiece-style one), BOS/EOS/pad/unk
  ids and the chat template come from the run's own tokenizer.
- `<name>-<dtype>.Modelfile` (Ollama; modelfile.py): FROM, TEMPLATE, PARAMETER stop for every stop string, SYSTEM;
  and `Modelfile`, a copy of the latest export's.
- `export_check.json`: per GGUF file, what was compared and the result. A failed check refuses the export (exit 1, like a failed
  merge): the GGUF is written under a temporary name and renamed only when the check passed.

The check, on the merge stage's probe rows:
- every dtype: the GGUF's logits (transformers' reader) against the merged model with its 2-D weights rounded as the
  file stores them, in torch (f16, bf16, or Q8_0 by q8_0_round, written from the format's definition): an independent
  computation of what the file should hold, within the float32 rounding tolerance merge.derived_atol gives. The gap
  to the unrounded merged model is recorded too (what quantization cost).
- q8_0, also: greedy continuations agree token for token wherever the merged model's top-2 margin is larger than
  twice that gap.
- the tokenizer read back from the file encodes the probe rows' prompt and completion texts (and a rendered
  conversation) to the same ids, renders the chat template to the same text, and has the same BOS, EOS, pad and stop
  ids. For a SentencePiece vocabulary it is compared on the text between special tokens, and llama.cpp's own rule
  for the space after a special token is replayed with the run's BPE model (_llamacpp_space_prefix).
- when the `ollama` binary is on PATH, `ollama create finetune-check-<name> -f <Modelfile>` must succeed (recorded as
  skipped, with the reason, otherwise).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import StageFailed, UserError
from .run import RunDir

# model_type -> (gguf architecture, q/k permuted to llama.cpp's rotary layout). Mistral is written as llama, as
# llama.cpp's own converter does.
FAMILIES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}
# Families finetune trains that are refused, and why.
NOT_MAPPED = {
    # llama.cpp reads Mixtral as "llama" with stacked experts (ffn_gate_exps ...), but transformers' GGUF reader builds a
    # dense LlamaForCausalLM from such a file: nothing independent could read the export back, so it is not written.
    "mixtral": "transformers' GGUF reader cannot load a llama file with experts, so the export could not be verified",
}
DTYPES = ("f16", "bf16", "q8_0")
GREEDY_TOKENS = 8  # greedy continuation length compared per probe under q8_0


class ExportFailed(StageFailed):
    """The written file is not the merged model (exit 1); export_check.json says how."""


def _permute(w, n_head: int):
    """HF's q/k rows to llama.cpp's rotary layout (llama.cpp convert_hf_to_gguf's permute, which transformers reverses)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def merged_fingerprint(run: RunDir) -> str:
    """sha256 over the merged model's weight files: an export records it, and publish refuses an export of an older merge."""
    import hashlib

    from .run import sha256_file

    h = hashlib.sha256()
    for f in sorted(run.merged.glob("*.safetensors")):
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def read_checks(folder: Path) -> dict[str, dict[str, Any]]:
    """export_check.json's entries, by GGUF file name; none when the folder has no readable one."""
    try:
        return dict(json.loads((folder / "export_check.json").read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def published_exports(run: RunDir) -> list[tuple[Path, dict[str, Any]]]:
    """The GGUF files of RUN/export/ that passed their check, with their checks; UserError when one is of an older merge."""
    folder = run.root / "export"
    checks = read_checks(folder)
    current = merged_fingerprint(run) if checks else None
    out = []
    for name, check in sorted(checks.items()):
        path = folder / name
        if not (check.get("passed") and path.is_file()):
            continue
        if check.get("merged_sha256") != current:
            raise UserError(f"{path}: exported from an earlier merged model (RUN/merged changed since); run `finetune export {run.root} "
                            f"--dtype {check.get('dtype', 'f16')}` again before publishing it")
        out.append((path, check))
    return out


def check_exportable(run: RunDir) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(the merged model's config, its family, its tokenizer.json), or one clear message (cheap: no torch)."""
    from .artifacts import MergeCheck

    if not (run.merged / "config.json").is_file():
        raise UserError(f"{run.root}: no merged model to export (RUN/merged); run `finetune merge {run.root}` first")
    check = MergeCheck.read_if_present(run.merge_check)
    if check is None or not check.passed:
        raise UserError(f"{run.root}: the merged model did not pass its check (merge_check.json); a model that is not the adapter's is not exported")
    config = json.loads((run.merged / "config.json").read_text())
    family = config.get("model_type")
    if family not in FAMILIES:
        why = NOT_MAPPED.get(family, "its tensors are not mapped to llama.cpp's yet")
        raise UserError(f"{run.root}: a {family!r} model cannot be exported to GGUF ({why}); supported: {', '.join(FAMILIES)}")
    tj = run.merged / "tokenizer.json"
    spec = json.loads(tj.read_text()) if tj.is_file() else {}
    kind = tokenizer_kind(spec)
    if kind is None:
        raise UserError(f"{run.root}: the tokenizer (RUN/merged/tokenizer.json) is neither a byte-level BPE (Llama 3, Qwen2, SmolLM) nor a "
                        "SentencePiece-style BPE with byte fallback (Llama 2, Mistral); GGUF export supports those two")
    if kind == "gpt2" and bpe_pre(spec) is None:
        raise UserError(f"{run.root}: the tokenizer's pre-tokenizer (RUN/merged/tokenizer.json) is not one llama.cpp knows by name "
                        "(GPT-2's regex, Llama 3's, Qwen2's, ...): llama.cpp would split text differently from training")
    return config, family, spec


def tokenizer_kind(spec: dict[str, Any]) -> str | None:
    """llama.cpp's name for the tokenizer a tokenizer.json describes: "gpt2" (byte-level BPE), "llama" (SentencePiece BPE,
    as transformers converts Llama 2's and Mistral's tokenizer.model), or None (Unigram, WordPiece, ...: not mapped)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    if "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        return "gpt2"
    return "llama" if model.get("byte_fallback") else None


def bpe_pre(spec: dict[str, Any]) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for how a byte-level BPE splits text before merging, or None when its split
    is not one llama.cpp knows. llama.cpp picks its own regexes by that name; "default" is none of the real ones (it
    splits punctuation runs and digit groups its own way), so writing it would tokenize differently from training."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own regex, inside ByteLevel (GPT-2, SmolLM, the smoke stand-ins)
    if len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        # transformers' GGUF reader splits by these same regexes for these names (llama3 "llama-bpe", qwen2, ...)
        return next((name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == pattern), None)
    return None


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts `▁` before a text's first word (a Prepend normalizer, or Metaspace's prepend scheme)."""
    norm, pre = json.dumps(spec.get("normalizer")), spec.get("pre_tokenizer") or {}
    metaspaces = [p for p in [pre, *pre.get("pretokenizers", [])] if p.get("type") == "Metaspace"]
    return '"Prepend"' in norm or any(p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True) for p in metaspaces)


def _sentencepiece_scores(spec: dict[str, Any], n_vocab: int, by_id: dict[int, str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges, at each step, the adjacent pair whose joined piece has the highest score;
    the HF tokenizer merges the pair of lowest merge rank. Scoring each piece minus the rank of the first merge that makes
    it gives the same order (what Llama 2's tokenizer.model scores are: minus the piece's rank). Pieces no merge makes
    (characters, bytes, specials) score 0: they are never the result of a merge."""
    rank: dict[str, int] = {}
    for r, m in enumerate(spec["model"].get("merges") or []):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        rank.setdefault(a + b, r)
    return [-float(rank[by_id[i]] + 1) if i in by_id and by_id[i] in rank else 0.0 for i in range(n_vocab)]


def _rope_theta(config: dict[str, Any]) -> float:
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def write_gguf(path: Path, model, tok, config: dict[str, Any], family: str, dtype: str, name: str, merged_dir: Path,
               spec: dict[str, Any]) -> dict[str, int]:
    """Write `model` (float32, from RUN/merged) and `tok` (its tokenizer.json: `spec`) to `path`. Returns tensor counts by
    stored type."""
    import gguf
    import numpy as np

    from .lm import stop_ids

    arch_name, permute = FAMILIES[family]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_layer, n_head = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name)
    w.add_context_length(int(config.get("max_position_embeddings", 4096)))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_block_count(n_layer)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    if permute:
        w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    # tokenizer: every id's token (added ones included), its type, the merges or scores, special ids, chat template
    kind = tokenizer_kind(spec)
    n_vocab = max(len(tok), int(config.get("vocab_size", 0)))
    by_id = {i: t for t, i in tok.get_vocab().items()}
    special = set(tok.all_special_ids)
    added = set(tok.get_added_vocab().values())
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            if kind == "llama" and i == tok.unk_token_id:
                types.append(gguf.TokenType.UNKNOWN)
            elif i in special:
                types.append(gguf.TokenType.CONTROL)
            elif i in added:
                types.append(gguf.TokenType.USER_DEFINED)
            elif kind == "llama" and len(by_id[i]) == 6 and by_id[i].startswith("<0x") and by_id[i].endswith(">"):
                types.append(gguf.TokenType.BYTE)  # byte fallback's <0xNN>: llama.cpp spells unknown characters with these
            else:
                types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (a vocabulary padded to a multiple of 64)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre(bpe_pre(spec) if kind == "gpt2" else "default")  # SentencePiece has no pre-tokenizer: "default"
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kind == "llama":
        # No merges: llama.cpp's SentencePiece tokenizer works from scores (and transformers' reader rebuilds the merges
        # from them, so the check below tests the scores, not a copy of the merges).
        w.add_token_scores(_sentencepiece_scores(spec, n_vocab, by_id))
        w.add_add_space_prefix(_space_prefix(spec))
    # The end-of-turn token (ChatML's <|im_end|>) when it is not EOS: llama.cpp ends a generation at it (an EOG token).
    eot = [i for i in stop_ids(tok) if i != tok.eos_token_id]
    if eot:
        w.add_eot_token_id(eot[0])
    special_vocab = gguf.SpecialVocab(merged_dir, load_merges=kind == "gpt2", n_vocab=n_vocab)
    if tok.chat_template and not special_vocab.chat_template:
        special_vocab.chat_template = tok.chat_template
    special_vocab.add_to_gguf(w)
    names = gguf.get_tensor_name_map(arch, n_layer)
    stored: dict[str, int] = {}
    for hf_name, p in model.state_dict().items():
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue
            raise UserError(f"export: no GGUF name for tensor {hf_name!r} of a {family} model")
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp uses token_embd for the output when there is no output.weight
        data = p.detach().float().cpu().numpy()
        if permute and hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, n_head)
        elif permute and hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, n_kv)
        if data.ndim == 1:
            kind = "F32"
            w.add_tensor(new, data.astype(np.float32))
        elif dtype == "f16":
            kind = "F16"
            w.add_tensor(new, data.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
            if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
                kind = "F16"  # Q8_0 blocks are 32 wide: a row of another length stays f16
                w.add_tensor(new, data.astype(np.float16))
            else:
                kind = qtype.name
                q = gguf.quants.quantize(data, qtype)
                w.add_tensor(new, q, raw_shape=q.shape, raw_dtype=qtype)
        stored[kind] = stored.get(kind, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def q8_0_round(w):
    """`w` (float32, last dim a multiple of 32) through Q8_0 and back, computed here in torch from the format's definition
    (ggml-quants.c quantize_row_q8_0_ref): per block of 32, d = absmax / 127, q = roundf(x * (1 / d)) as int8, stored d
    in f16; the weight read back is q * d. roundf rounds halves away from zero (torch.round would round them to even)."""
    import torch

    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = blocks * inv
    a = x.abs()
    q = torch.sign(x) * (torch.floor(a) + torch.floor(2 * (a - torch.floor(a))))
    return (q * d.half().float()).reshape(w.shape)


def _rounded(model, dtype: str):
    """The merged model with its 2-D weights rounded as the file stores them (f16, bf16, or Q8_0 where rows are a multiple
    of 32 wide and f16 otherwise): what the GGUF should hold, computed independently of the gguf package."""
    import copy

    import torch

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim < 2:
                continue
            if dtype == "q8_0" and p.shape[-1] % 32 == 0:
                p.copy_(q8_0_round(p.float()))
            else:
                p.copy_(p.to(torch.bfloat16 if dtype == "bf16" else torch.float16).float())
    return ref


def _greedy(model, ids, mask, steps: int):
    """Greedy continuations of each probe prompt (left-aligned rows, no padding in a prompt), with each step's logits."""
    import torch

    outs = []
    for row, m in zip(ids, mask):
        x = row[: int(m.sum())].unsqueeze(0)
        steps_logits, toks = [], []
        with torch.no_grad():
            for _ in range(steps):
                logits = model(input_ids=x).logits[0, -1].float()
                t = int(logits.argmax())
                steps_logits.append(logits)
                toks.append(t)
                x = torch.cat([x, torch.tensor([[t]])], dim=1)
        outs.append((toks, steps_logits))
    return outs


def verify(gguf_path: Path, model, tok, run: RunDir, recipe, dtype: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Load the file back with transformers' GGUF reader and compare it with the merged model (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .lm import stop_ids
    from .merge import derived_atol, logits, max_diff, probe_rows, rows_batch
    from .templates import adds_bos

    hf_logging.disable_progress_bar()  # the reader's per-tensor bar, on every export
    back = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    back.eval()
    tok_back = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    rows = probe_rows(run, recipe.merge.probes)
    ids, mask, _ = rows_batch(rows, tok.pad_token_id)
    merged_logits = logits(model, ids, mask)
    file_logits = logits(back, ids, mask)
    absmax = float(merged_logits.abs()[mask.bool()].max())
    gap = max_diff(merged_logits, file_logits, mask)
    cfg = model.config
    out: dict[str, Any] = {"probes": int(ids.shape[0]), "probe_tokens": int(mask.sum()), "logits_absmax": absmax, "vs_merged_max_abs_diff": gap}
    failures = []
    ref_logits = logits(_rounded(model, dtype), ids, mask)
    atol = derived_atol(absmax, int(cfg.hidden_size), int(cfg.num_hidden_layers))
    ref_gap = max_diff(ref_logits, file_logits, mask)
    out.update(reference=f"merged model with its 2-D weights rounded to {dtype} in torch", vs_reference_max_abs_diff=ref_gap, atol=atol,
               vs_merged_share=gap / max(absmax, 1e-12))
    if not ref_gap <= atol:
        failures.append(f"logits differ from the {dtype}-rounded merged model by {ref_gap:.3g} > {atol:.3g}")
    if dtype == "q8_0":
        flips, compared, equal = 0, 0, 0
        for (a_toks, a_logits), (b_toks, _) in zip(_greedy(model, ids, mask, GREEDY_TOKENS), _greedy(back, ids, mask, GREEDY_TOKENS)):
            for a, b, lg in zip(a_toks, b_toks, a_logits):
                top2 = torch.topk(lg, 2).values
                compared += 1
                equal += a == b
                if a != b and float(top2[0] - top2[1]) > 2 * gap:
                    flips += 1
                if a != b:
                    break  # the continuations diverged: later steps condition on different text
        out.update(greedy_tokens_compared=compared, greedy_tokens_equal=equal, greedy_flips_beyond_margin=flips)
        if flips:
            failures.append(f"greedy continuations differ at {flips} step(s) where the merged model's top-2 margin exceeds twice the gap")
    # tokenizer, template, special ids, on the texts the run tokenizes: its probe rows' prompt and completion segments
    # (each encoded on its own, as training did) and a conversation rendered by the chat template
    texts = [t for r in rows for t in (r.get("prompt"), r.get("completion")) if t]
    texts = texts or [tok.decode(row[: int(m.sum())], skip_special_tokens=True) for row, m in zip(ids, mask)]
    template_same = None
    if tok.chat_template:
        conv = [{"role": "user", "content": "What is the limitation period?"}, {"role": "assistant", "content": "Six years."},
                {"role": "user", "content": "And for a deed?"}]
        rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        template_same = tok_back.chat_template is not None and tok_back.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == rendered
        texts.append(rendered)
    if tokenizer_kind(spec) == "llama":
        # transformers' reader rebuilds the merges from the file's scores (what llama.cpp tokenizes with): compare it on
        # the plain text between special tokens; how text after a special token is spaced is llama.cpp's own rule, below.
        added = tok.get_added_vocab()
        pieces = [f for t in texts for f in _split_keep(tok, t) if f not in added and f.strip()]
        same_ids = all(tok_back(f, add_special_tokens=False)["input_ids"] == tok(f, add_special_tokens=False)["input_ids"] for f in pieces)
        prefix = _llamacpp_space_prefix(tok, texts)
        out.update(llamacpp_add_space_prefix=prefix, llamacpp_rule_same_ids=prefix is not None)
        if prefix is None:
            failures.append("llama.cpp would tokenize the text after special tokens differently from the run's tokenizer, with or without "
                            "its space prefix (the chat markers' neighbours would be tokens the model never saw)")
        elif prefix != _space_prefix(spec):
            failures.append(f"the file says add_space_prefix={not prefix}, but llama.cpp matches the run's tokenizer with {prefix}")
    else:
        same_ids = all(tok_back(t, add_special_tokens=False)["input_ids"] == tok(t, add_special_tokens=False)["input_ids"] for t in texts)
    specials = {k: (getattr(tok, f"{k}_token_id"), getattr(tok_back, f"{k}_token_id")) for k in ("bos", "eos", "pad", "unk")}
    stops = (stop_ids(tok), stop_ids(tok_back))
    bos = (adds_bos(tok), adds_bos(tok_back))
    out.update(tokenizer_texts=len(texts), tokenizer_same_ids=same_ids, special_ids={k: v[0] for k, v in specials.items()},
               special_ids_same=all(a == b for a, b in specials.values()) and bos[0] == bos[1], adds_bos=bos[0],
               stop_ids=stops[0], stop_ids_same=stops[0] == stops[1], chat_template_same=template_same)
    if not same_ids:
        failures.append("the tokenizer read from the file encodes the probe texts differently")
    if not out["special_ids_same"] or not out["stop_ids_same"]:
        failures.append(f"special ids differ: {specials}, stops {stops}")
    if template_same is False:
        failures.append("the chat template read from the file renders a conversation differently")
    out["llama_cpp"] = llamacpp_check(gguf_path, tok, texts, ids, mask, ref_logits)
    failures += out["llama_cpp"].get("failures", [])
    out["failures"] = failures
    out["passed"] = not failures
    return out


def llamacpp_check(path: Path, tok, texts: list[str], ids, mask, ref_logits) -> dict[str, Any]:
    """The file as llama.cpp itself reads it, when llama-cpp-python is installed (skipped, with the reason, otherwise):
    its token ids for the probe texts (special tokens parsed, no BOS added) must be the run tokenizer's, its BOS and EOS
    the run's, and every stop id an end-of-generation token for it. Its logits are recorded, not judged: its CPU kernels
    round activations to f16 or Q8_0 for the dot products, so they differ from any float32 reference by more than
    rounding (the exact comparison is transformers' reader's, above)."""
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed"}
    import numpy as np

    from .lm import stop_ids

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, int(ids.shape[1]) + 8), logits_all=True, verbose=False)
    try:
        differ = [t for t in texts if llm.tokenize(t.encode(), add_bos=False, special=True) != tok(t, add_special_tokens=False)["input_ids"]]
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        not_eog = [i for i in stop_ids(tok) if not llama_cpp.llama_vocab_is_eog(vocab, i)]
        gap, agree, total = 0.0, 0, 0
        for row, m, want in zip(ids, mask, ref_logits):
            n = int(m.sum())
            llm.reset()
            llm.eval(row[:n].tolist())
            got = np.asarray(llm.scores[:n], dtype=np.float32)
            ref = want[:n].float().numpy()
            gap = max(gap, float(np.abs(got - ref).max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += n
        out: dict[str, Any] = {"version": llama_cpp.__version__, "texts": len(texts), "texts_same_ids": len(texts) - len(differ),
                               "bos_eos": [llm.token_bos(), llm.token_eos()], "stop_ids_not_eog": not_eog,
                               "logits_max_abs_diff": gap, "top_token_equal": agree, "top_token_compared": total}
    finally:
        close = getattr(llm, "close", None)  # llama-cpp-python >= 0.2.70 frees the model here; older ones on deletion
        if close is not None:
            close()
    failures = []
    if differ:
        first = differ[0]
        failures.append(f"llama.cpp tokenizes {len(differ)} of {len(texts)} probe texts differently from the run's tokenizer (first: {first[:60]!r})")
    if out["bos_eos"] != [tok.bos_token_id, tok.eos_token_id]:
        failures.append(f"llama.cpp reads BOS/EOS {out['bos_eos']}, the run's are {[tok.bos_token_id, tok.eos_token_id]}")
    if not_eog:
        failures.append(f"llama.cpp would not stop at the run's stop ids {not_eog}")
    out["failures"] = failures
    out["passed"] = not failures
    return out


def _llamacpp_space_prefix(tok, texts: list[str]) -> bool | None:
    """The add_space_prefix under which llama.cpp's SentencePiece rule gives the run tokenizer's ids on every text, or None.

    llama.cpp (llama-vocab.cpp, LLAMA_VOCAB_TYPE_SPM) cuts the text at special tokens, and with add_space_prefix puts a
    space before each raw fragment that starts the text or follows a special token, then writes spaces as `▁` and
    tokenizes the fragment as one piece of text. The run's BPE model, called on that string directly (no normalizer,
    no pre-tokenizer), stands in for the tokenization of one fragment; the scores are checked against transformers'
    reader separately."""
    model = tok.backend_tokenizer.model
    added = tok.get_added_vocab()

    def emulate(text: str, prefix: bool) -> list[int]:
        ids, prev_special = [], True
        for part in _split_keep(tok, text):
            if part in added:
                ids.append(added[part])
                prev_special = True
                continue
            s = (" " if prefix and prev_special else "") + part
            ids += [t.id for t in model.tokenize(s.replace(" ", "\u2581"))]
            prev_special = False
        return ids

    for prefix in (True, False):
        if all(emulate(t, prefix) == tok(t, add_special_tokens=False)["input_ids"] for t in texts):
            return prefix
    return None


def _split_keep(tok, text: str) -> list[str]:
    """`text` cut at the tokenizer's added tokens (kept, as their own parts), as llama.cpp cuts it before tokenizing."""
    import re

    added = sorted(tok.get_added_vocab(), key=len, reverse=True)
    return [p for p in (re.split("(" + "|".join(map(re.escape, added)) + ")", text) if added else [text]) if p]


def export(run_dir: Path, to: str = "gguf", dtype: str = "f16", out: Path | None = None) -> dict[str, Any]:
    """The whole command: checks, write to a temporary name, verify, rename, Modelfile, export_check.json."""
    import torch

    from data_prep.outputs import check_output, mark

    from .modelfile import write_modelfile
    from .models import load_model, load_tokenizer

    if to != "gguf":
        raise UserError(f"--to {to!r}: the export formats are: gguf")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    run = RunDir(run_dir)
    run.require()
    config, family, spec = check_exportable(run)
    out = Path(out) if out is not None else run.root / "export"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    check_output(out, "export", "--out")
    recipe, _ = run.load_recipe()
    t0 = time.perf_counter()
    tok = load_tokenizer(str(run.merged), recipe)
    model = load_model(str(run.merged), recipe, quantized=False, dtype=torch.float32)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    mark(out, "export")
    name = f"{recipe.name}-{dtype}.gguf"
    partial = out / f".{name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        stored = write_gguf(partial, model, tok, config, family, dtype, recipe.name, run.merged, spec)
        check = verify(partial, model, tok, run, recipe, dtype, spec)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    check.update(file=name, dtype=dtype, family=family, merged_sha256=merged_fingerprint(run), architecture=FAMILIES[family][0].lower(), tensors=stored,
                 bytes=partial.stat().st_size, seconds=round(time.perf_counter() - t0, 2),
                 verified_with="transformers' GGUF reader (transformers.modeling_gguf_pytorch_utils), not the writer")
    if not check["passed"]:
        partial.unlink(missing_ok=True)
        _record(out, name, check)
        raise ExportFailed(f"export check failed: {'; '.join(check['failures'])} (details: {out / 'export_check.json'})")
    os.replace(partial, out / name)
    check["modelfile"] = write_modelfile(out, name, tok, recipe)
    check["ollama"] = ollama_create(out, check["modelfile"]["file"], recipe.name)
    _record(out, name, check)
    if check["ollama"].get("passed") is False:
        raise ExportFailed(f"ollama create refused the Modelfile: {check['ollama']['error']} (details: {out / 'export_check.json'})")
    return check


def ollama_create(out: Path, modelfile: str, name: str) -> dict[str, Any]:
    """`ollama create` with the Modelfile, when the ollama binary is on PATH: the model as Ollama itself reads it."""
    import shutil
    import subprocess

    exe = shutil.which("ollama")
    if exe is None:
        return {"skipped": "the ollama binary is not on PATH"}
    tag = f"finetune-check-{name}".lower()
    try:
        done = subprocess.run([exe, "create", tag, "-f", modelfile], cwd=out, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"passed": False, "model": tag, "error": f"{type(e).__name__}: {e}"}
    if done.returncode != 0:
        return {"passed": False, "model": tag, "error": (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return {"passed": True, "model": tag, "binary": exe}


def _record(out: Path, name: str, check: dict[str, Any]) -> None:
    """export_check.json: one entry per GGUF file of the folder (an f16 and a q8_0 export sit side by side)."""
    path = out / "export_check.json"
    checks = read_checks(out)
    checks[name] = check
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({"files": checks}, indent=2) + "\n")
    os.replace(tmp, path)
