"""Every committed benchmark result records the hash of the spec and configs that made it,
and that hash is its spec's hash now (fedsim.outputs.spec_hash)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsim.bench import BenchSpec
from fedsim.outputs.spec_hash import spec_hash

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"

UNHASHED: set[str] = set()
"""Grid results made before spec hashes, not yet run again: stale until they are (the README
says which of their numbers it quotes). The list may only shrink."""


def _grid_results() -> list[Path]:
    return sorted(p for p in RESULTS.glob("*.json") if "spec" in json.loads(p.read_text()))


@pytest.mark.parametrize("result", _grid_results(), ids=lambda p: p.stem)
def test_a_committed_result_records_the_hash_of_its_spec_as_it_is_now(result):
    stored = json.loads(result.read_text())
    if result.stem in UNHASHED:
        assert stored.get("spec_hash") is None, f"{result.name} has a spec hash now: take it off UNHASHED"
        return
    assert stored.get("spec_hash"), f"{result.name}: no spec_hash (runs older than spec hashes): run its grid again"
    spec_file = ROOT / stored["spec_file"]
    spec = BenchSpec.load(spec_file, stored["overrides"])
    assert spec.hash(spec_file.parent) == stored["spec_hash"], (
        f"{result.name} was made by another version of {stored['spec_file']} or its configs: run it again")


def test_the_hash_covers_run_fields_and_config_text_not_checks_or_notes(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("rounds: 2\n")
    spec = {"name": "g", "configs": ["c.yaml"], "seeds": [0], "notes": "a", "checks": []}
    base = spec_hash(spec, {"c.yaml": config})
    assert spec_hash({**spec, "notes": "b", "checks": [{"claim": "x"}]}, {"c.yaml": config}) == base
    assert spec_hash({**spec, "seeds": [0, 1]}, {"c.yaml": config}) != base
    config.write_text("rounds: 3\n")
    assert spec_hash(spec, {"c.yaml": config}) != base
