"""finetune: turn a YAML recipe into a published domain specialist.

Importing this package must stay cheap: no torch, no transformers (the CLI's --help depends on it).
"""

__version__ = "0.1.0"
