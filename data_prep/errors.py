"""Errors of the data layer. The `finetune` CLI maps DataError to exit code 2 (bad input, one clear message)."""


class DataError(Exception):
    """A data problem that stops the build: a missing or unreadable file, a wrong column name, an empty source,
    a reject rate past the threshold. The message names the file, row or key."""

    exit_code = 2


class RowError(Exception):
    """One row cannot be used; it goes to rejects.jsonl with this reason and the build goes on."""
