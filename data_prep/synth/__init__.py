"""Synthetic instructions from a teacher model: Alpaca's self-instruct from seed tasks, and document-grounded
pairs (SaulLM-style). Output is appended as it arrives; a restarted run continues where it stopped."""
