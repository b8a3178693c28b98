"""Bare personal names through a spaCy pipeline, when the user has one: `pip install finetune[pii]` brings spaCy,
and a trained pipeline with an `ner` component (en_core_web_sm, or any other language's) is found among the
installed packages and used. No pipeline installed, or spaCy missing: names are found by title, label and role
only (names.py), and the provenance and data card say so.

`quality.pii.ner`: `auto` (the first installed pipeline with an NER component), `off`, or a pipeline's package
name or folder (a pipeline saved with `nlp.to_disk`, which is how the tests build one without a download).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

from ...errors import DataError

log = logging.getLogger("finetune")

# Entity labels that mean a person in spaCy's pipelines: PERSON (OntoNotes: English, Chinese), PER (WikiNER:
# French, German, Spanish, Italian, Dutch, Portuguese ...).
PERSON_LABELS = {"PERSON", "PER"}
# The pipelines tried first by `auto`, largest first; any other installed pipeline with an `ner` pipe comes after.
PREFERRED = ("en_core_web_trf", "en_core_web_lg", "en_core_web_md", "en_core_web_sm")


@dataclass
class Ner:
    nlp: Any
    info: dict[str, Any]

    def persons(self, texts: list[str]) -> Iterator[list[tuple[int, int]]]:
        """For each text, the character spans of the people the pipeline names. A long text (a pretraining document)
        goes through in pieces cut at whitespace: spaCy refuses texts over `nlp.max_length` (10^6 characters)."""
        pieces, owners = [], []
        for i, text in enumerate(texts):
            for offset, piece in _pieces(text):
                pieces.append(piece)
                owners.append((i, offset))
        out: list[list[tuple[int, int]]] = [[] for _ in texts]
        for (i, offset), doc in zip(owners, self.nlp.pipe(pieces, batch_size=64)):
            out[i] += [(offset + e.start_char, offset + e.end_char) for e in doc.ents if e.label_ in PERSON_LABELS]
        yield from out


PIECE = 100_000  # characters: well under spaCy's limit, and a trained pipeline's memory stays small


def _pieces(text: str) -> Iterator[tuple[int, str]]:
    start = 0
    while len(text) - start > PIECE:
        cut = text.rfind(" ", start + PIECE // 2, start + PIECE)
        cut = cut if cut > start else start + PIECE
        yield start, text[start:cut]
        start = cut
    yield start, text[start:]


def _spacy():
    try:
        import spacy
    except ImportError:
        return None
    return spacy


def _open(spacy, name: str) -> Ner:
    # Only the entity recogniser (and what it listens to) runs: the parser and tagger would triple the time.
    nlp = spacy.load(name)
    keep = {"ner", "entity_ruler", "tok2vec", "transformer"}
    for pipe in list(nlp.pipe_names):
        if pipe not in keep:
            nlp.disable_pipe(pipe)
    if not {"ner", "entity_ruler"} & set(nlp.pipe_names):
        raise DataError(f"quality.pii.ner: the spaCy pipeline {name!r} has no ner or entity_ruler component")
    meta = nlp.meta
    return Ner(nlp, {"detector": "spacy", "spacy": spacy.__version__, "model": f"{meta.get('lang', '?')}_{meta.get('name', '?')}",
                     "model_version": meta.get("version"), "labels": sorted(PERSON_LABELS)})


def installed_pipelines(spacy) -> list[str]:
    names = list(spacy.util.get_installed_models())
    return sorted(names, key=lambda n: (PREFERRED.index(n) if n in PREFERRED else len(PREFERRED), n))


def load(setting: str) -> tuple[Ner | None, str]:
    """The recogniser for `quality.pii.ner`, and a line saying which (or why none) for provenance."""
    if setting == "off":
        return None, "off (quality.pii.ner: off)"
    spacy = _spacy()
    if spacy is None:
        if setting != "auto":
            raise DataError(f"quality.pii.ner: {setting!r} needs spaCy: pip install 'finetune[pii]'")
        return None, "none: spaCy is not installed (pip install 'finetune[pii]' and a pipeline such as en_core_web_sm)"
    if setting != "auto":
        try:
            ner = _open(spacy, setting)
        except OSError as e:
            raise DataError(f"quality.pii.ner: cannot load the spaCy pipeline {setting!r} ({str(e).splitlines()[0]})") from None
        return ner, f"spaCy {ner.info['spacy']}, pipeline {ner.info['model']} {ner.info['model_version']}"
    for name in installed_pipelines(spacy):
        try:
            ner = _open(spacy, name)
        except (OSError, DataError) as e:
            log.warning("PII: skipping the spaCy pipeline %s (%s)", name, str(e).splitlines()[0])
            continue
        return ner, f"spaCy {ner.info['spacy']}, pipeline {ner.info['model']} {ner.info['model_version']}"
    return None, f"none: spaCy {spacy.__version__} has no pipeline installed (python -m spacy download en_core_web_sm)"
