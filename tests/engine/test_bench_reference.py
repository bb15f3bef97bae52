"""A published leaderboard beside a grid (fedsim.bench_reference): each published pair of
methods against this grid's paired seeds, replications told from analogues."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from fedsim.bench import BenchSpec, run_bench, write_bench
from fedsim.bench_reference import compare_orders

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
NIID = Path(__file__).parents[2] / "benchmarks" / "specs" / "niid.yaml"


def _seeds(*values):
    return dict(enumerate(values))


def test_each_published_pair_agrees_reverses_or_is_undecided_by_the_paired_seeds():
    published = {"A": 0.9, "B": 0.8, "C": 0.7, "D": 0.6}
    seeds = {"A": _seeds(0.80, 0.82, 0.81, 0.83, 0.79),
             "B": _seeds(0.70, 0.71, 0.72, 0.69, 0.70),
             "C": _seeds(0.85, 0.86, 0.84, 0.87, 0.85),  # above A and B in every seed: both pairs reversed
             "D": _seeds(0.72, 0.69, 0.70, 0.71, 0.71)}  # B - D: -0.02, 0.02, 0.02, -0.02, -0.01: undecided
    row = compare_orders(published, seeds, alpha=0.05)
    assert row["published"] == [("A", 0.9), ("B", 0.8), ("C", 0.7), ("D", 0.6)]
    assert [m for m, _ in row["grid"]] == ["C", "A", "D", "B"]
    assert row["grid"][0][1] == pytest.approx(0.854)
    assert row["agree"] == [("A", "B"), ("A", "D"), ("C", "D")]
    assert row["reversed"] == [("A", "C"), ("B", "C")]
    assert row["undecided"] == [("B", "D")] and row["tied"] == []


def test_a_published_pair_equal_in_every_seed_is_tied_not_an_agreement():
    # FedNova coincides with FedAvg where every client runs the same steps: the paired test
    # ("at least as good") holds on all-zero differences, but the published strict order is not shown
    row = compare_orders({"FedProx": 0.693, "FedAvg": 0.689, "FedNova": 0.685},
                         {"FedProx": _seeds(0.95, 0.96, 0.97), "FedAvg": _seeds(0.93, 0.94, 0.95),
                          "FedNova": _seeds(0.93, 0.94, 0.95)}, alpha=0.05)
    assert row["agree"] == [("FedProx", "FedAvg"), ("FedProx", "FedNova")]
    assert row["tied"] == [("FedAvg", "FedNova")] and not row["reversed"] and not row["undecided"]


def test_published_ties_and_methods_the_grid_lacks_are_left_out():
    row = compare_orders({"A": 0.844, "B": 0.844, "C": 0.84, "E": 0.9},
                         {"A": _seeds(0.9, 0.91, 0.92), "B": _seeds(0.5, 0.52, 0.51), "C": _seeds(0.1, 0.12, 0.11),
                          "E": {}}, alpha=0.05)
    assert [m for m, _ in row["published"]] == ["A", "B", "C"]
    assert row["agree"] == [("A", "C"), ("B", "C")] and not row["reversed"] and not row["undecided"]


def _spec(tmp_path, value, **reference):
    return BenchSpec(name="ref", configs=[str(QUICKSTART)], variants=[{"label": "FedAvg"}, {"label": "FedProx"}],
                     axes={"data": {"digits": ["data.name=digits"]}, "partition": {"iid": [], "k1": []}},
                     out=str(tmp_path),
                     reference={"source": "Table 3", "setting": "10 parties.", "axis": "data", "value": value,
                                "cells": [{"at": {"partition": "k1"}, "published": {"FedProx": 0.5, "FedAvg": 0.4}}],
                                **reference})


def test_the_write_up_tells_a_replication_from_an_analogue(tmp_path):
    results = {f"{m} data=digits partition={p}": [{"seed": s, "run": str(tmp_path / "gone"), "wall_time_s": 1.0,
                                                   "final_accuracy": v + 0.01 * s} for s in range(3)]
               for m, p, v in [("FedAvg", "iid", 0.9), ("FedProx", "iid", 0.9), ("FedAvg", "k1", 0.3),
                               ("FedProx", "k1", 0.2)]}
    md = write_bench(_spec(tmp_path, "cifar10"), results, tmp_path, command="fedsim bench x",
                     source={"spec_hash": None}).read_text()
    assert ("| partition=k1 | digits | no (analogue on digits) | FedProx 0.5 > FedAvg 0.4 | FedAvg 0.31 > FedProx 0.21 "
            "| 0 / 1 / 0 / 0 | FedAvg above FedProx |") in md
    assert "No cell of this grid replicates the published setting: its data axis has no 'cifar10'" in md
    stored = json.loads((tmp_path / "ref.json").read_text())
    assert stored["reference"][0]["reversed"] == [["FedProx", "FedAvg"]]
    md = write_bench(_spec(tmp_path, "digits"), results, tmp_path, command="fedsim bench x",
                     source={"spec_hash": None}).read_text()
    assert "| partition=k1 | digits | yes |" in md and "No cell of this grid replicates" not in md


@pytest.mark.parametrize(("change", "message"), [
    ({"axis": "dataset"}, "reference.axis 'dataset' is not an axis; known: data, partition"),
    ({"cells": [{"at": {}, "published": {"FedAvg": 0.4, "FedProx": 0.5}}]}, "name every axis but 'data'"),
])
def test_a_reference_the_grid_cannot_place_is_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        _spec(tmp_path, "cifar10", **change)


def _cifar_like(path, n=300):
    """A CIFAR-10-shaped Hugging Face dataset on disk: 32x32 RGB images, 10 labels."""
    rng = np.random.default_rng(0)
    labels = [i % 10 for i in range(n)]
    pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    split = datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels], "label": labels},
                                       features=datasets.Features({"img": datasets.Image(),
                                                                   "label": datasets.ClassLabel(num_classes=10)}))
    datasets.DatasetDict({"train": split, "test": split.select(range(100))}).save_to_disk(str(path))


def test_the_niid_suite_on_cifar10_replicates_its_leaderboard_cells_and_skips_the_digits_checks(tmp_path):
    _cifar_like(tmp_path / "cifar")
    overrides = [f"out={tmp_path / 'results'}", "name=niid_cifar10", "seeds=[0, 1]", "tuning=null",
                 "common=[sim.backend=batched, rounds=1, partition.num_clients=10, client.local_epochs=1]",
                 "variants=[{label: FedAvg, set: [strategy.name=fedavg]},"
                 " {label: FedProx, set: [strategy.name=fedprox]}]",
                 "axes.partition={'#C=2': [partition.scheme=pathological, partition.classes_per_client=2]}",
                 f"axes.data={{cifar10: [data.name=hf, data.path={tmp_path / 'cifar'}, data.hf_image_key=img, "
                 "model.name=lenet5]}"]
    md = run_bench(NIID, runs_dir=str(tmp_path / "runs"), overrides=overrides).read_text()
    assert "| partition=#C=2 | cifar10 | yes | FedProx 0.507 > FedAvg 0.498 |" in md
    assert "Published cells outside this grid: partition=dir(0.5), partition=noise, partition=quantity." in md
    assert "Published methods this grid does not run: FedNova, SCAFFOLD-w." in md
    assert "No cell of this grid replicates" not in md
    spec = BenchSpec.load(NIID)
    assert f"Checks on settings outside this grid (skipped): {len(spec.checks) + len(spec.winners)}" in md
    [row] = json.loads((tmp_path / "results" / "niid_cifar10.json").read_text())["reference"]
    assert len(row["agree"]) + len(row["reversed"]) + len(row["tied"]) + len(row["undecided"]) == 1


def test_the_niid_spec_transcribes_niid_benchs_cifar10_leaderboard():
    spec = BenchSpec.load(NIID)
    assert (spec.reference.axis, spec.reference.value) == ("data", "cifar10")
    cells = {cell.at["partition"]: cell.published for cell in spec.reference.cells}
    assert cells["quantity"] == {"FedAvg": 0.720, "FedProx": 0.712, "SCAFFOLD-w": 0.624, "FedNova": 0.100}
    assert sorted(cells) == ["#C=2", "dir(0.5)", "noise", "quantity"]
