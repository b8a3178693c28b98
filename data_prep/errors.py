"""Errors of the data layer, and the one base every error of this project derives from.

The CLI dispatches on `FinetuneError.exit_code` (README.md: 1 a check failed, 2 bad input, 3 publish refused by a
gate), so a new error class picks its code where it is defined and no list in the CLI has to learn about it.
"""


class FinetuneError(Exception):
    """A failure the user gets as one line and an exit code, without a traceback."""

    exit_code = 1


class DataError(FinetuneError):
    """A data problem that stops the build: a missing or unreadable file, a wrong column name, an empty source,
    a reject rate past the threshold. The message names the file, row or key."""

    exit_code = 2


class RowError(Exception):
    """One row cannot be used; it goes to rejects.jsonl with this reason and the build goes on."""
