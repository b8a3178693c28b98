"""Self-instruct as Stanford Alpaca ran it (Taori et al. 2023; Wang et al. 2022): each request shows the teacher
the generation prompt and 3 seed tasks sampled at random, and asks it to continue the numbered list; new tasks are
kept when they pass Alpaca's filters and are novel (ROUGE-L F1 < 0.7 against every instruction kept so far,
seeds included).

The generation prompt is the user's (e.g. Alpaca's prompt.txt; Alpaca's data is CC BY-NC 4.0),
and so are the seeds: nothing of Alpaca's is shipped here. Numbers below are Alpaca's settings.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..jsonl import lines as jsonl_lines
from .journal import Journal
from .teacher import Teacher

SEEDS_PER_PROMPT = 3  # Alpaca: 3 seed tasks per request
NOVELTY = 0.7  # Alpaca: drop when ROUGE-L with an existing instruction is above 0.7
MIN_WORDS, MAX_WORDS = 4, 150  # Alpaca: instructions of 3 words or fewer, or over 150, are dropped
# Alpaca's keyword filter: tasks a language model cannot do (images, files, audio ...)
BLOCKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
             "go to", "video", "audio", "music", "flowchart", "diagram")
NO_INPUT = "<noinput>"


@dataclass
class SeedTask:
    instruction: str
    input: str
    output: str


def load_seeds(path: Path) -> list[SeedTask]:
    """Seed tasks in Alpaca's layout: {instruction, instances: [{input, output}]} (or flat {instruction, input, output})."""
    seeds = []
    try:
        lines = jsonl_lines(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read seed tasks ({e})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            t = json.loads(line)
            inst = t["instances"][0] if "instances" in t else t
            seeds.append(SeedTask(t["instruction"], inst.get("input", "") or "", inst["output"]))
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise DataError(f"{path} row {n}: not a seed task ({type(e).__name__}: {e}); expected {{instruction, instances: [{{input, output}}]}}") from None
    if len(seeds) < SEEDS_PER_PROMPT:
        raise DataError(f"{path}: {len(seeds)} seed tasks; at least {SEEDS_PER_PROMPT} are needed")
    return seeds


def render_prompt(header: str, tasks: list[SeedTask]) -> str:
    """The request: the generation prompt, then the sampled tasks as a numbered list, ending where the teacher
    should continue ("4. Instruction:")."""
    parts = [header.rstrip("\n") + "\n"]
    for i, t in enumerate(tasks, start=1):
        parts.append(f"###\n{i}. Instruction: {t.instruction.strip()}\n{i}. Input:\n{t.input.strip() or NO_INPUT}\n{i}. Output:\n{t.output.strip()}\n")
    parts.append(f"###\n{len(tasks) + 1}. Instruction:")
    return "".join(parts)


_TASK = re.compile(r"^\s*\d+\s*\.\s*Instruction:(?P<instruction>.*?)\n\s*\d+\s*\.\s*Input:(?P<input>.*?)\n\s*\d+\s*\.\s*Output:(?P<output>.*)$", re.S)


def parse_response(text: str, first_number: int, truncated: bool) -> list[SeedTask]:
    """Split the continuation into tasks; the last one is dropped when the teacher hit its token limit."""
    blocks = re.split(r"\n?###\n?", f"{first_number}. Instruction:" + text)
    if truncated:
        blocks = blocks[:-1]
    tasks = []
    for b in blocks:
        m = _TASK.match(b.strip("\n"))
        if not m:
            continue
        inp = m["input"].strip()
        tasks.append(SeedTask(m["instruction"].strip(), "" if inp.lower() == NO_INPUT else inp, m["output"].strip()))
    return tasks


def keyword_filter(t: SeedTask) -> str | None:
    """Alpaca's filters; the reason a task is dropped, or None."""
    words = t.instruction.split()
    if len(words) < MIN_WORDS or len(words) > MAX_WORDS:
        return "instruction length"
    low = t.instruction.lower()
    if any(re.search(rf"\b{re.escape(w)}\b", low) for w in BLOCKLIST):
        return "blocked keyword"
    if low.startswith("write a program"):
        return "asks for a program"
    if t.instruction[0] in string.punctuation:
        return "starts with punctuation"
    if not t.instruction[0].isascii():
        return "starts with a non-ASCII character"
    if not t.output:
        return "empty output"
    return None


class Novelty:
    """ROUGE-L F1 of a new instruction against all kept ones (rouge-score, the scorer Alpaca used)."""

    def __init__(self, instructions: list[str], threshold: float = NOVELTY):
        from rouge_score import rouge_scorer

        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.pool = list(instructions)
        self.threshold = threshold

    def closest(self, instruction: str) -> float:
        return max((self.scorer.score(p, instruction)["rougeL"].fmeasure for p in self.pool), default=0.0)

    def admit(self, instruction: str) -> bool:
        if self.closest(instruction) >= self.threshold:
            return False
        self.pool.append(instruction)
        return True


def self_instruct(teacher: Teacher, seeds: list[SeedTask], header: str, out: Path, *, num: int, seed: int = 42,
                  temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 3072, max_requests: int | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Generate until `num` tasks are kept (or `max_requests` is reached). Each request's seed sample comes from
    Random(seed, request number), so a restarted run asks exactly what an uninterrupted one would have asked."""
    journal = Journal(out, {"kind": "self-instruct", "seed": seed, "temperature": temperature, "top_p": top_p,
                            "max_tokens": max_tokens, "seeds": len(seeds), "header_chars": len(header)})
    novelty = Novelty([s.instruction for s in seeds] + [r["instruction"] for r in journal.rows])
    limit = max_requests if max_requests is not None else max(10, 4 * num)  # a teacher that yields nothing must not loop forever
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num, initial=min(num, len(journal.rows)), desc="self-instruct", unit=" tasks")
    request = len(journal.done)
    while len(journal.rows) < num and request < limit:
        rng = random.Random(f"{seed}:{request}")
        shown = rng.sample(seeds, SEEDS_PER_PROMPT)
        got = teacher.complete(render_prompt(header, shown), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               stop=["\n20", "20."])  # Alpaca asks for 20 tasks; stop at the 20th
        counts: Counter = Counter(requests=1)
        kept = []
        for t in parse_response(got.text, SEEDS_PER_PROMPT + 1, got.truncated):
            counts["generated"] += 1
            reason = keyword_filter(t)
            if reason is None and not novelty.admit(t.instruction):
                reason = f"ROUGE-L >= {NOVELTY}"
            if reason:
                counts[f"dropped: {reason}"] += 1
                continue
            if len(journal.rows) + len(kept) >= num:
                break
            kept.append({"instruction": t.instruction, "input": t.input, "output": t.output,
                         "origin": {"method": "self-instruct", "teacher": teacher.name, "request": request}})
        counts["kept"] += len(kept)
        journal.commit(f"request-{request}", kept, counts)
        if bar is not None:
            bar.update(len(kept))
        request += 1
    if bar is not None:
        bar.close()
    return {"out": str(out), "rows": len(journal.rows), "requests": len(journal.done), **dict(journal.counts)}
