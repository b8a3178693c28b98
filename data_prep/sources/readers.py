"""Readers: each yields (row number, raw row) from one kind of input, streaming where the format allows
(JSONL line by line, CSV/TSV record by record, Parquet batch by batch, Hugging Face datasets memory-mapped).
A row that cannot be decoded is yielded as a RowError, so it is rejected with its row number instead of
stopping the build; a file that cannot be read at all raises DataError.

Row numbers: the line for JSONL, the record (header excluded) for CSV/TSV, the item for JSON and Parquet, the
file (in sorted order) for document folders.

Importable without torch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, RowError

log = logging.getLogger("finetune")

DOCUMENT_SUFFIXES = (".txt", ".md")


@dataclass
class Opened:
    """An input ready to iterate: its rows, the columns known up front (a header or a schema), and provenance."""

    rows: Iterator[tuple[int, Any]]
    columns: list[str] | None
    info: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_folder(files: list[Path], root: Path) -> str:
    """One hash for a folder: the sorted relative paths with their contents' hashes."""
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def has_surrogates(s: str) -> bool:
    """True when a string holds bytes that were not valid UTF-8 (decoded with errors='surrogateescape') or a lone
    surrogate from a JSON escape: such text cannot be written back as UTF-8."""
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def detect_reader(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "hf_disk"
        return "documents"
    suffix = path.suffix.lower()
    kinds = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
             ".txt": "documents", ".md": "documents"}
    if suffix not in kinds:
        raise DataError(f"{path}: cannot tell how to read a {suffix or 'extension-less'} file; set `reader:` "
                        "(jsonl, json, csv, tsv, parquet, documents, hf_disk)")
    return kinds[suffix]


def open_path(path: Path, reader: str, columns: list[str] | None = None, split: str = "train",
              default_columns: tuple[str, ...] | None = None) -> Opened:
    """Open a local input. `default_columns`: an adapter's column names for CSVs that may lack a header (MMLU's);
    they apply when the first row is not exactly those names."""
    if not path.exists():
        raise DataError(f"{path}: not found")
    kind = detect_reader(path) if reader == "auto" else reader
    if kind == "hf_disk":
        return _hf_disk(path, split)
    if kind == "documents":
        return _documents(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, but reader {kind!r} reads a file")
    info = {"path_kind": kind, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    try:
        if kind == "jsonl":
            return Opened(_jsonl(path), None, info)
        if kind == "json":
            return Opened(_json(path), None, info)
        if kind in ("csv", "tsv"):
            header, rows = _delimited(path, "\t" if kind == "tsv" else ",", columns, default_columns)
            return Opened(rows, header, info)
        if kind == "parquet":
            return _parquet(path, info)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    raise DataError(f"{path}: unknown reader {kind!r}")


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield n, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield n, RowError(f"invalid UTF-8 (byte {e.start} of the line)")
            except json.JSONDecodeError as e:
                yield n, RowError(f"invalid JSON ({e.msg} at column {e.colno})")


def _json(path: Path) -> Iterator[tuple[int, Any]]:
    """A JSON list of rows, an object holding one such list, or an object of records keyed by id (PubMedQA's
    {PMID: {...}}); the key becomes the row's `id`. JSON is parsed whole: use JSONL for files that do not fit in memory."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if isinstance(data, dict):
        if data and all(isinstance(v, dict) for v in data.values()):
            for n, (key, rec) in enumerate(data.items(), start=1):
                yield n, {"id": key, **rec} if "id" not in rec else rec
            return
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows, an object of records keyed by id, or an object with one list "
                            f"(found keys: {', '.join(list(data)[:8])})")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _delimited(path: Path, delimiter: str, columns: list[str] | None,
               default_columns: tuple[str, ...] | None = None) -> tuple[list[str], Iterator[tuple[int, Any]]]:
    csv.field_size_limit(sys.maxsize)  # legal documents run to megabytes per cell
    # surrogateescape keeps undecodable bytes, so a bad row is rejected on its own instead of failing the file
    f = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(f, delimiter=delimiter)
    try:
        first = next(reader, None)
    except csv.Error as e:
        f.close()
        raise DataError(f"{path}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} ({e})") from None
    if first is None:
        f.close()
        raise DataError(f"{path}: empty file")
    if not columns and default_columns and [c.strip().lower() for c in first] != [c.lower() for c in default_columns]:
        columns = list(default_columns)  # no header row: the first row is data
    header = list(columns) if columns else [c.strip() for c in first]
    if not columns and len(set(header)) != len(header):
        f.close()
        raise DataError(f"{path}: repeated column names in the header: {header}")

    def rows() -> Iterator[tuple[int, Any]]:
        with f:
            n = 0
            pending = [first] if columns else []
            while True:
                try:
                    rec = pending.pop() if pending else next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    n += 1
                    yield n, RowError(f"malformed record ({e})")
                    continue
                n += 1
                if not any(c.strip() for c in rec):
                    continue  # blank line
                if len(rec) != len(header):
                    yield n, RowError(f"has {len(rec)} fields, expected {len(header)} ({', '.join(header)})")
                    continue
                bad = [h for h, v in zip(header, rec) if has_surrogates(v)]
                if bad:
                    yield n, RowError(f"invalid UTF-8 in column '{bad[0]}'")
                    continue
                yield n, dict(zip(header, rec))

    return header, rows()


def _parquet(path: Path, info: dict[str, Any]) -> Opened:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None

    def rows() -> Iterator[tuple[int, Any]]:
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                n += 1
                yield n, rec

    return Opened(rows(), list(pf.schema_arrow.names), {**info, "rows_in_file": pf.metadata.num_rows})


def _documents(path: Path) -> Opened:
    root = path if path.is_dir() else path.parent
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .txt or .md documents in this folder")

    def rows() -> Iterator[tuple[int, Any]]:
        for n, p in enumerate(files, start=1):
            rel = p.relative_to(root).as_posix()
            try:
                yield n, {"id": rel, "text": p.read_bytes().decode("utf-8")}
            except UnicodeDecodeError as e:
                yield n, RowError(f"{rel}: invalid UTF-8 at byte {e.start}")

    return Opened(rows(), ["id", "text"], {"path_kind": "documents", "files": len(files), "sha256": sha256_folder(files, root)})


def _pick_split(ds, split: str, where: str):
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            from ..schema import did_you_mean

            close = did_you_mean(split, list(ds))
            raise DataError(f"{where}: no split {split!r}" + (f"; did you mean '{close}'?" if close else f"; splits: {', '.join(ds)}"))
        return ds[split]
    return ds


def _dataset_rows(ds) -> Iterator[tuple[int, Any]]:
    yield from enumerate(ds, start=1)


def _hf_disk(path: Path, split: str) -> Opened:
    import datasets

    try:
        ds = _pick_split(datasets.load_from_disk(str(path)), split, str(path))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable `save_to_disk` folder ({type(e).__name__}: {e})") from None
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return Opened(_dataset_rows(ds), list(ds.column_names), {"path_kind": "hf_disk", "split": split, "rows_in_file": len(ds),
                                                              "sha256": sha256_folder(files, path), "fingerprint": ds._fingerprint})


PARQUET_BRANCH = "refs/convert/parquet"  # the Hub's automatic Parquet export of a dataset repository


def open_hub(hub: str, config: str | None, split: str, revision: str | None) -> Opened:
    """A Hugging Face dataset by id. Needs the network the first time (then the local cache); offline, the message
    says so and points at `path:` with a local copy."""
    import datasets

    where = f"hf://{hub}"
    try:
        try:
            ds = datasets.load_dataset(hub, config, split=split, revision=revision)
        except RuntimeError as e:
            # datasets >= 4 no longer runs loading scripts; repositories that still ship one (nguha/legalbench,
            # isaacus/open-australian-legal-qa) load from the Parquet export the Hub keeps of them.
            if "scripts are no longer supported" not in str(e) or revision not in (None, "main"):
                raise
            log.warning("%s ships a loading script, which datasets no longer runs: reading its Parquet export (revision %s)", where, PARQUET_BRANCH)
            revision = PARQUET_BRANCH
            ds = datasets.load_dataset(hub, config, split=split, revision=revision)
    except Exception as e:  # network, missing dataset, bad config: all the user's to fix
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where}: cannot load the dataset ({type(e).__name__}: {msg}); offline, download it once and use "
                        "`path:` with a local file or a `save_to_disk` folder") from None
    return Opened(_dataset_rows(ds), list(ds.column_names), {"hub": hub, "config": config, "split": split, "revision": revision or "main",
                                                             "fingerprint": getattr(ds, "_fingerprint", None), "rows_in_file": len(ds)})
