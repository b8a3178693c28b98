"""Document-grounded instructions, the way SaulLM built legal instructions from legal text: the documents are cut
into chunks, and for each chunk the teacher writes instruction/answer pairs that the chunk alone answers. Pairs
whose answer shares too few words with the chunk are dropped as ungrounded."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, RowError
from ..sources.readers import open_path
from .journal import Journal
from .teacher import Teacher

PROMPT = """You are helping build training data for a {domain} assistant.

Below is an excerpt from the document "{doc}". Write {k} diverse instruction-answer pairs that a {domain} professional
might ask about it. Every answer must be fully supported by the excerpt; do not use outside knowledge. Use the "input"
field for any text the instruction refers to (it may be empty).

Reply with a JSON list only, in this form:
[{{"instruction": "...", "input": "", "output": "..."}}]

Excerpt:
\"\"\"
{chunk}
\"\"\"
"""

_WORD = re.compile(r"\w+")


def chunks(text: str, words: int, overlap: int) -> list[str]:
    """Cut at paragraph boundaries into pieces of about `words` words; a paragraph longer than that is cut by words,
    with `overlap` words repeated so a statement split across the cut is whole in one of the pieces."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paras:
        n = len(p.split())
        if n > words:
            if cur:
                out.append("\n\n".join(cur))
                cur, size = [], 0
            w = p.split()
            step = max(1, words - overlap)
            out.extend(" ".join(w[i : i + words]) for i in range(0, max(1, len(w) - overlap), step))
            continue
        if size + n > words and cur:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += n
    if cur:
        out.append("\n\n".join(cur))
    return out


def document_chunks(folder: Path, words: int, overlap: int) -> Iterator[tuple[str, str, str]]:
    """(unit id, document name, chunk text) for every chunk of every .txt/.md document, in a stable order."""
    opened = open_path(Path(folder), "documents")
    for _, doc in opened.rows:
        if isinstance(doc, RowError):
            raise DataError(f"{folder}: {doc}")
        for i, c in enumerate(chunks(doc["text"], words, overlap)):
            yield f"{doc['id']}#{i}", doc["id"], c


def parse_pairs(text: str) -> list[dict[str, str]]:
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        raise RowError("no JSON list in the answer")
    try:
        items = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise RowError(f"invalid JSON ({e.msg})") from None
    if not isinstance(items, list):
        raise RowError("not a list")
    return [i for i in items if isinstance(i, dict)]


def grounding(answer: str, chunk: str) -> float:
    """Share of the answer's words (3+ letters) that occur in the chunk."""
    words = [w for w in _WORD.findall(answer.lower()) if len(w) >= 3]
    if not words:
        return 0.0
    have = set(_WORD.findall(chunk.lower()))
    return sum(w in have for w in words) / len(words)


def grounded(teacher: Teacher, docs: Path, out: Path, *, domain: str = "domain", per_chunk: int = 3, chunk_words: int = 350,
             overlap: int = 40, min_grounding: float = 0.5, temperature: float = 0.7, max_tokens: int = 2048,
             limit: int | None = None, progress: bool = False) -> dict[str, Any]:
    journal = Journal(out, {"kind": "grounded", "per_chunk": per_chunk, "chunk_words": chunk_words, "overlap": overlap,
                            "min_grounding": min_grounding, "temperature": temperature, "max_tokens": max_tokens, "domain": domain})
    todo = list(document_chunks(docs, chunk_words, overlap))
    if limit is not None:
        todo = todo[:limit]
    it = [t for t in todo if t[0] not in journal.done]
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(todo), initial=len(todo) - len(it), desc="grounded", unit=" chunks")
    for unit, doc, chunk in it:
        counts: Counter = Counter(requests=1)
        got = teacher.complete(PROMPT.format(domain=domain, doc=doc, k=per_chunk, chunk=chunk), max_tokens=max_tokens,
                               temperature=temperature)
        kept = []
        try:
            pairs = parse_pairs(got.text)
        except RowError as e:
            counts[f"dropped: {e}"] += 1
            pairs = []
        digest = hashlib.sha256(chunk.encode()).hexdigest()[:16]
        for p in pairs:
            counts["generated"] += 1
            inst, inp, outp = p.get("instruction"), p.get("input", "") or "", p.get("output")
            if not (isinstance(inst, str) and inst.strip() and isinstance(outp, str) and outp.strip() and isinstance(inp, str)):
                counts["dropped: missing or non-string field"] += 1
                continue
            g = grounding(outp, chunk + "\n" + inp)
            if g < min_grounding:
                counts["dropped: ungrounded"] += 1
                continue
            kept.append({"instruction": inst.strip(), "input": inp.strip(), "output": outp.strip(),
                         "origin": {"method": "grounded", "teacher": teacher.name, "document": doc, "chunk_sha256": digest,
                                    "grounding": round(g, 3)}})
        counts["kept"] += len(kept)
        journal.commit(unit, kept, counts)
    return {"out": str(out), "rows": len(journal.rows), "chunks": len(todo), "chunks_done": len(journal.done & {t[0] for t in todo}),
            **dict(journal.counts)}
