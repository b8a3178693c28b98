"""Errors the CLI maps to exit codes (README.md: 1 a check failed, 2 bad input, 3 publish refused by a gate). Each
derives from data_prep's FinetuneError and carries its code."""

from data_prep.errors import FinetuneError


class UserError(FinetuneError):
    """Bad usage, recipe or data: one clear message, exit code 2, no traceback."""

    exit_code = 2


class PublishRefused(FinetuneError):
    """A publish gate said no: exit code 3."""

    exit_code = 3


class QuantizationError(UserError):
    """QLoRA was asked for but the base model did not end up (mostly) 4-bit."""


class StageFailed(FinetuneError):
    """A stage ran and failed a check (merge verification, non-finite loss ...): exit code 1, one clear message."""

    exit_code = 1
