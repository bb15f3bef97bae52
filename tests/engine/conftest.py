"""Shared helpers for the engine tests: small configs that run fast on 2 cores."""

from pathlib import Path

import pytest

from fedsim.config import load_config

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture
def small_config(tmp_path):
    """A factory of quickstart-based configs writing into tmp_path."""

    def make(*overrides: str):
        return load_config(QUICKSTART, [f"output.dir={tmp_path / 'runs'}", *overrides])

    return make
