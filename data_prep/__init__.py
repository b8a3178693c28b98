"""Alpaca-style instruction set building. Importable without torch."""
