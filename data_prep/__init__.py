"""Alpaca-style instruction set building. Importable without torch.

    spec.py            the data schema (a recipe's `data:` section; with `name:`, a standalone spec)
    sources/readers.py JSONL, JSON, CSV/TSV, Parquet, document folders, save_to_disk folders, Hub datasets
    sources/adapters.py GSM8K, PubMedQA, LegalBench, MMLU CSV, ShareGPT (and how to add one)
    sources/load.py    one source -> validated rows + rejects with row numbers
    formats.py         row layouts, field checks, hashes
    quality/           dedupe (exact, MinHash LSH), decontam (n-gram), pii (patterns)
    split.py           train/validation by content hash
    build.py           collect (what the prepare stage calls) and build (`finetune data build`)
    datacard.py        provenance.json, datacard.md, lengths.png
    synth/             self-instruct and document-grounded generation from a teacher endpoint or local model
"""
