"""A causal LM behind the three calls the eval harness makes: log-likelihood of continuations, greedy generation with
stop sequences, and token-level loss. Any object with these methods can be evaluated (tests use stand-ins that
know the answers, to check the harness end to end).

Tokenisation follows training (templates.encode): prompt and continuation are tokenised as separate segments, with
one BOS in front when the tokenizer adds one, so the boundary the model is scored at is the one it was trained at.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Protocol

from .templates import token_ids


class LM(Protocol):
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]: ...
    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]: ...
    def nll(self, examples: list[list[tuple[str, bool]]]) -> list[tuple[float, int]]: ...


LOG_EVERY_S = 30.0  # off a terminal, one progress line per this many seconds: a long eval is not silent, a log stays short


def _progress(it: Iterable, total: int, desc: str, show: bool):
    if not show:
        return it
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(it, total=total, desc=desc, unit=" batch", leave=False)  # items per second and ETA, redrawn
    return _logged(it, total, desc)


def _logged(it: Iterable, total: int, desc: str):
    from .progress import Progress

    bar = Progress(f"eval {desc}", total, "batch", seconds=LOG_EVERY_S)
    bar.last_line = bar.t0  # the first line after LOG_EVERY_S, not at batch 1: short evals stay quiet
    for k, x in enumerate(it, start=1):
        yield x
        bar.update(k)


def stop_ids(tok) -> list[int]:
    """EOS, and the end-of-turn token of ChatML-style templates, which some tokenizers do not call EOS."""
    ids = [tok.eos_token_id]
    if "<|im_end|>" in tok.get_vocab():
        ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
    return [t for t in dict.fromkeys(ids) if t is not None]


def cut_at_stop(text: str, stop: list[str]) -> str:
    idx = [text.find(s) for s in stop if s and s in text]
    return text[: min(idx)] if idx else text


class HFLM:
    """A transformers model (optionally a PeftModel) and its tokenizer."""

    def __init__(self, model, tok, batch_size: int = 8, progress: bool = True, desc: str = ""):
        self.model, self.tok, self.batch_size, self.progress, self.desc = model, tok, batch_size, progress, desc
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Throughput: the real (non-pad) tokens this model processed, generated ones included, and the time it took.
        self.tokens, self.seconds = 0, 0.0

    def throughput(self) -> dict[str, float]:
        return {"tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else None}

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode(self, text: str, bos: bool) -> list[int]:
        """The token ids of `text` as scoring sees them (one BOS when `bos` and the model uses one)."""
        return token_ids(self.tok, text, bos)

    def _forward_logprobs(self, seqs: list[list[int]], keep: list[int]):
        """Log-softmax over the vocabulary at positions `keep` (sorted) of a right-padded batch.

        Only the positions that predict a scored token go through lm_head and the softmax: over a 49k-token vocabulary
        the full [batch, width, vocab] log-softmax took more time than the transformer itself on a CPU."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            attn[j, : len(s)] = 1
        self.tokens += sum(len(s) for s in seqs)
        kept = torch.tensor(keep, dtype=torch.long, device=self.device)
        with torch.no_grad():
            try:
                logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), logits_to_keep=kept).logits
            except TypeError:  # a model class without logits_to_keep: all positions, then the ones asked for
                logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits[:, kept]
        return torch.log_softmax(logits.float(), dim=-1)

    def _scored(self, pairs: list[tuple[list[int], list[bool]]], desc: str) -> list[tuple[float, int]]:
        """(sum of -log p over the scored tokens, number of scored tokens) for each (ids, scored-mask) sequence."""
        import torch

        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))  # long first: padding waste is small
        out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
        self.model.eval()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in _progress(batches, len(batches), desc, self.progress):
            seqs = [pairs[i][0] for i in batch]
            scored = [[t for t in range(1, len(pairs[i][0])) if pairs[i][1][t]] for i in batch]
            keep = sorted({t - 1 for pos in scored for t in pos})
            if not keep:
                continue
            column = {t: k for k, t in enumerate(keep)}
            logp = self._forward_logprobs(seqs, keep)
            for j, i in enumerate(batch):
                pos = scored[j]
                if not pos:
                    continue
                p = torch.tensor([column[t - 1] for t in pos], device=logp.device)
                tgt = torch.tensor([pairs[i][0][t] for t in pos], device=logp.device)
                out[i] = (float(-logp[j, p, tgt].sum()), len(pos))
        return out

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        t0 = time.perf_counter()
        try:
            return self._loglikelihood(requests)
        finally:
            self.seconds += time.perf_counter() - t0

    def _loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        """log p(continuation | context). Contexts asked with several continuations (the labels of a classification
        item, the options of a multiple-choice one) are run once, and the continuations scored from their KV cache:
        with 5-shot prompts and five labels that is about a fifth of the work."""
        groups: dict[str, list[int]] = {}
        for i, (ctx, _) in enumerate(requests):
            groups.setdefault(ctx, []).append(i)
        out = [0.0] * len(requests)
        single = [idx[0] for idx in groups.values() if len(idx) == 1]
        pairs = []
        for i in single:
            c = self.encode(requests[i][0], bos=True)
            k = self.tok(requests[i][1], add_special_tokens=False)["input_ids"]
            pairs.append((c + k, [False] * len(c) + [True] * len(k)))
        for i, (s, _) in zip(single, self._scored(pairs, f"{self.desc} loglik")):
            out[i] = -s
        shared = [(ctx, idx) for ctx, idx in groups.items() if len(idx) > 1]
        self.model.eval()
        for ctx, idx in _progress(shared, len(shared), f"{self.desc} loglik", self.progress):
            for i, v in zip(idx, self._shared_context(ctx, [requests[i][1] for i in idx])):
                out[i] = v
        return out

    def _shared_context(self, ctx: str, conts: list[str]) -> list[float]:
        import torch

        c = self.encode(ctx, bos=True)
        ks = [self.tok(k, add_special_tokens=False)["input_ids"] for k in conts]
        out = []
        for start in range(0, len(ks), self.batch_size):
            chunk = ks[start : start + self.batch_size]
            self.tokens += len(c) + sum(len(k) for k in chunk)
            with torch.no_grad():
                first = self.model(input_ids=torch.tensor([c], device=self.device), use_cache=True, logits_to_keep=1)
                cache = first.past_key_values
                cache.batch_repeat_interleave(len(chunk))
                width = max(len(k) for k in chunk)
                ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
                attn = torch.zeros((len(chunk), len(c) + width), dtype=torch.long)
                attn[:, : len(c)] = 1
                for j, k in enumerate(chunk):
                    ids[j, : len(k)] = torch.tensor(k)
                    attn[j, len(c) : len(c) + len(k)] = 1
                rest = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), past_key_values=cache, use_cache=True)
            head = torch.log_softmax(first.logits[0, -1].float(), dim=-1)  # predicts each continuation's first token
            tail = torch.log_softmax(rest.logits.float(), dim=-1)  # position t predicts token t + 1
            for j, k in enumerate(chunk):
                if not k:
                    out.append(0.0)
                    continue
                total = head[k[0]] + sum(tail[j, t - 1, k[t]] for t in range(1, len(k)))
                out.append(float(total))
        return out

    def nll(self, examples: list[list[tuple[str, bool]]]) -> list[tuple[float, int]]:
        pairs = []
        t0 = time.perf_counter()
        for segs in examples:
            ids: list[int] = []
            mask: list[bool] = []
            for n, (text, scored) in enumerate(segs):
                piece = self.encode(text, bos=(n == 0))
                ids += piece
                mask += [scored] * len(piece)
            if segs and segs[-1][1] and self.tok.eos_token_id is not None and ids[-1:] != [self.tok.eos_token_id] and len(segs) > 1:
                ids.append(self.tok.eos_token_id)  # instruction rows: the response ends with EOS, as in training
                mask.append(True)
            pairs.append((ids, mask))
        try:
            return self._scored(pairs, f"{self.desc} loss")
        finally:
            self.seconds += time.perf_counter() - t0

    def nll_encoded(self, examples: list[dict]) -> list[tuple[float, int]]:
        """Loss of already tokenised rows (RUN/data/val.jsonl): their labels say which tokens are scored."""
        t0 = time.perf_counter()
        try:
            return self._scored([(e["input_ids"], [x != -100 for x in e["labels"]]) for e in examples], f"{self.desc} loss")
        finally:
            self.seconds += time.perf_counter() - t0

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        """Greedy, batched with left padding; each output is cut at its first stop sequence."""
        t0 = time.perf_counter()
        try:
            return self._generate(prompts, max_new_tokens, stop)
        finally:
            self.seconds += time.perf_counter() - t0

    def _generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        import torch

        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out = [""] * len(prompts)
        self.model.eval()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        eos = stop_ids(self.tok)
        for batch in _progress(batches, len(batches), f"{self.desc} generate", self.progress):
            seqs = [self.encode(prompts[i], bos=True) for i in batch]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
            attn = torch.zeros((len(seqs), width), dtype=torch.long)
            for j, s in enumerate(seqs):
                ids[j, width - len(s) :] = torch.tensor(s)
                attn[j, width - len(s) :] = 1
            kwargs = {"stop_strings": stop, "tokenizer": self.tok} if stop else {}
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), max_new_tokens=max_new_tokens,
                                          do_sample=False, pad_token_id=self.pad, eos_token_id=eos or None, **kwargs)
            self.tokens += int(attn.sum()) + int((gen[:, width:] != self.pad).sum())
            for j, i in enumerate(batch):
                text = self.tok.decode(gen[j, width:], skip_special_tokens=True)
                out[i] = cut_at_stop(text, stop)
        return out
