"""Cleaning after validation: exact and near deduplication, decontamination against eval sets, PII."""
