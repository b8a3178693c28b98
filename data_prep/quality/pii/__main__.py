"""`python -m data_prep.quality.pii`: the detectors table as docs/pii.md shows it."""

from .detectors import markdown_table

print(markdown_table())
