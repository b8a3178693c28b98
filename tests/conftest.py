"""Test-suite settings: offline, deterministic, small. Tiny models are built in the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

# Set before anything imports huggingface_hub / wandb, which read them at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
SHARED = ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """../shared/datasets, which a user's clone does not have: skip there, but fail in CI (.ci/run sets
    FINETUNE_REQUIRE_SHARED=1) so the tests that read real data always run."""
    if not SHARED.is_dir():
        if os.environ.get("FINETUNE_REQUIRE_SHARED") == "1":
            pytest.fail(f"{SHARED} is missing but FINETUNE_REQUIRE_SHARED=1 (CI must run the shared-data tests)")
        pytest.skip(f"{SHARED} not found: the shared datasets live beside the project checkout, not in it")
    return SHARED


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """Each shipped recipe run once with --smoke (shared by the end-to-end tests)."""
    from finetune.pipeline import make_context, run_stages, start

    out = {}
    for name in ("legal", "medical", "math"):
        run_dir = tmp_path_factory.mktemp(f"smoke-{name}")
        ctx, resolved = make_context(str(RECIPES / f"{name}.yaml"), [], True, str(run_dir), [])
        start(ctx, resolved)
        outcome = run_stages(ctx)
        out[name] = (run_dir, outcome)
    return out


# Fixtures that train a model (a smoke run, an adapter, a two-process run): a test using one, directly or through
# another fixture, is in the slow tier. `pytest -m "not slow"` is the fast loop (README, "Tests"); tests that start a
# training from the command line carry @pytest.mark.slow themselves.
TRAINING_FIXTURES = {"smoke_runs", "cpt_run", "expanded_run", "ja_run", "pair", "legal_run", "adapters", "moe_adapters", "legal", "prepared", "reference",
                     "tracked_run", "traced", "after_sft_runs", "sft_run", "dpo_sft_done"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
