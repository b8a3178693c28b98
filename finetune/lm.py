"""A causal LM behind the three calls the eval harness makes: log-likelihood of continuations, greedy generation with
stop sequences, and token-level loss. Any object with these methods can be evaluated (tests use stand-ins that
know the answers, to check the harness end to end).

Tokenisation follows training (templates.encode): prompt and continuation are tokenised as separate segments, with
one BOS in front when the tokenizer adds one, so the boundary the model is scored at is the one it was trained at.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from .templates import token_ids


class LM(Protocol):
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]: ...
    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]: ...
    def nll(self, examples: list[list[tuple[str, bool]]]) -> list[tuple[float, int]]: ...


LOG_EVERY_S = 30.0  # off a terminal, one progress line per this many seconds: a long eval is not silent, a log stays short


def _progress(it: Iterable, total: int, desc: str, show: bool):
    import sys

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

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _ids(self, text: str, bos: bool) -> list[int]:
        return token_ids(self.tok, text, bos)

    def _forward_logprobs(self, seqs: list[list[int]]):
        """Log-softmax over the vocabulary for a right-padded batch."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            attn[j, : len(s)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
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
            logp = self._forward_logprobs(seqs)
            for j, i in enumerate(batch):
                ids, mask = pairs[i]
                pos = [t for t in range(1, len(ids)) if mask[t]]
                if not pos:
                    out[i] = (0.0, 0)
                    continue
                p = torch.tensor(pos, device=logp.device)
                tgt = torch.tensor([ids[t] for t in pos], device=logp.device)
                out[i] = (float(-logp[j, p - 1, tgt].sum()), len(pos))
        return out

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        pairs = []
        for ctx, cont in requests:
            c = self._ids(ctx, bos=True)
            k = self.tok(cont, add_special_tokens=False)["input_ids"]
            pairs.append((c + k, [False] * len(c) + [True] * len(k)))
        return [-s for s, _ in self._scored(pairs, f"{self.desc} loglik")]

    def nll(self, examples: list[list[tuple[str, bool]]]) -> list[tuple[float, int]]:
        pairs = []
        for segs in examples:
            ids: list[int] = []
            mask: list[bool] = []
            for n, (text, scored) in enumerate(segs):
                piece = self._ids(text, bos=(n == 0))
                ids += piece
                mask += [scored] * len(piece)
            if segs and segs[-1][1] and self.tok.eos_token_id is not None and ids[-1:] != [self.tok.eos_token_id] and len(segs) > 1:
                ids.append(self.tok.eos_token_id)  # instruction rows: the response ends with EOS, as in training
                mask.append(True)
            pairs.append((ids, mask))
        return self._scored(pairs, f"{self.desc} loss")

    def nll_encoded(self, examples: list[dict]) -> list[tuple[float, int]]:
        """Loss of already tokenised rows (RUN/data/val.jsonl): their labels say which tokens are scored."""
        return self._scored([(e["input_ids"], [x != -100 for x in e["labels"]]) for e in examples], f"{self.desc} loss")

    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        """Greedy, batched with left padding; each output is cut at its first stop sequence."""
        import torch

        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out = [""] * len(prompts)
        self.model.eval()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        eos = stop_ids(self.tok)
        for batch in _progress(batches, len(batches), f"{self.desc} generate", self.progress):
            seqs = [self._ids(prompts[i], bos=True) for i in batch]
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
            for j, i in enumerate(batch):
                text = self.tok.decode(gen[j, width:], skip_special_tokens=True)
                out[i] = cut_at_stop(text, stop)
        return out
