"""Readers (files, folders, Hugging Face datasets) and adapters for public schemas."""
