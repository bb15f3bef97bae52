"""The tuning stage of ``fedsim bench`` (fedsim.bench_tuning): per-method grids on tuning
seeds and a validation split, the best mean chosen, the final runs on fresh seeds with it."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsim.bench import BenchSpec, rerender_bench, run_bench
from fedsim.bench_tuning import Tuning, at_edge, choose, grid_points, method_scores, override, tuning_lines
from fedsim.config import ConfigError, load_config
from fedsim.outputs.results import RunDir
from fedsim.sim.components import federated_data

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def _spec(tmp_path, **tuning):
    return {"name": "tuned", "configs": [str(QUICKSTART)], "seeds": [0],
            "common": ["sim.backend=inprocess", "partition.num_clients=2", "rounds=1", "eval.federated=false",
                       "client.local_epochs=1"],
            "variants": [{"label": "FedAvg", "set": ["strategy.name=fedavg"]},
                         {"label": "FedProx", "set": ["strategy.name=fedprox"]}],
            "out": str(tmp_path / "results"),
            "tuning": {"seeds": [7], "validation_fraction": 0.25,
                       "grids": {"FedAvg": {"client.lr": [0.0001, 0.05]},
                                 "FedProx": {"client.lr": [0.05], "strategy.mu": [0.001, 1.0]}}, **tuning}}


def test_each_setting_is_tuned_on_a_validation_split_and_runs_its_chosen_values(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(tmp_path)))
    md = run_bench(spec_path, runs_dir=str(tmp_path / "runs"))
    stored = json.loads((tmp_path / "results" / "tuned.json").read_text())
    for label in ("FedAvg", "FedProx"):
        record = stored["tuning"][label]
        scores = [p["score"] for p in record["points"]]
        for point in record["points"]:  # a point's score is the mean of its tuning runs' validation accuracy
            assert point["score"] == pytest.approx(np.mean([r["final_accuracy"] for r in point["runs"]]))
            for run in point["runs"]:
                cfg = RunDir.open(run["run"]).config()
                assert (run["seed"], cfg.data.validation_fraction) == (7, 0.25)
        assert record["index"] == int(np.argmax(scores))
        [row] = [r for r in stored["table"] if r["setting"] == label]
        assert row["tuned"] == record["chosen"]
        final = RunDir.open(row["runs"][0]["run"]).config()
        assert (row["runs"][0]["seed"], final.data.validation_fraction) == (0, 0.0)  # the test set, fresh seed
        assert final.client.lr == record["chosen"]["client.lr"]
    assert stored["tuning"]["FedAvg"]["chosen"] == {"client.lr": 0.05}  # lr 1e-4 hardly moves in one epoch
    assert "## Tuning" in md.read_text() and "| FedProx | client.lr=0.05, strategy.mu=" in md.read_text()
    written = md.read_text()
    assert rerender_bench(spec_path).read_text().split("Environment")[1] == written.split("Environment")[1]
    changed = _spec(tmp_path)
    changed["common"].append("client.batch_size=16")  # other runs: the stored ones no longer match
    spec_path.write_text(yaml.safe_dump(changed))
    with pytest.raises(ConfigError, match="spec_hash differs"):
        rerender_bench(spec_path)


def test_the_validation_split_comes_from_the_training_pool_and_leaves_the_test_set_alone(tmp_path):
    plain = federated_data(load_config(QUICKSTART, ["partition.num_clients=2"]))
    held = federated_data(load_config(QUICKSTART, ["partition.num_clients=2", "data.validation_fraction=0.25"]))
    assert len(held.train) + len(held.test) == len(plain.train)
    assert len(held.test) == pytest.approx(0.25 * len(plain.train), abs=1)
    pool = {row.tobytes() for row in plain.train.x}
    assert all(row.tobytes() in pool for row in held.test.x)  # validation rows are training-pool rows
    assert not {row.tobytes() for row in held.test.x} & {row.tobytes() for row in held.train.x}


@pytest.mark.parametrize(("change", "message"), [
    ({"seeds": [0]}, "tuning.seeds and seeds share 0"),
    ({"grids": {"FedAvg": {"client.lr": [0.1, 0.2, 0.3]}, "FedProx": {"strategy.mu": [0.01, 0.1]}}},
     r"same budget.*\(FedAvg 3, FedProx 2\)"),
    ({"grids": {"FedAvg": {"client.lr": [0.1]}}}, "tuning.grids: no grid for FedProx"),
    ({"grids": {"FedAvg": {"client.lr": [0.1]}, "FedProx": {"client.lr": [0.1]}, "Scaffold": {"client.lr": [0.1]}}},
     "tuning.grids: Scaffold is not a method of the variants; known: FedAvg, FedProx"),
])
def test_a_tuning_stage_that_is_not_a_fair_comparison_is_refused(tmp_path, change, message):
    spec = _spec(tmp_path)
    spec["tuning"].update(change)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        BenchSpec.load(path)


def test_grid_helpers_choose_the_first_best_and_flag_an_unbracketed_choice():
    assert grid_points({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert choose([0.5, None, 0.7, 0.7], lower_is_better=False) == 2
    assert choose([None, 3.0, 2.0], lower_is_better=True) == 2
    assert at_edge({"lr": [0.01, 0.03, 0.1], "mu": [0.1, 1.0]}, {"lr": 0.1, "mu": 1.0}) == ["lr"]
    assert override("client.lr", 1e-5) == "client.lr=1.0e-05"


def test_a_tuning_metric_no_run_reports_is_refused_not_read_as_a_tie(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(tmp_path, metric="final_acuracy")))
    with pytest.raises(ConfigError, match="tuning.metric 'final_acuracy': no tuning run of FedAvg has a finite value"):
        run_bench(spec_path, runs_dir=str(tmp_path / "runs"))


def test_a_method_without_the_tuning_metric_is_scored_by_the_fallback_metric_and_marked():
    tuning = Tuning(seeds=[7], metric="final_personal_accuracy_mean", fallback_metric="final_federated_accuracy",
                    grids={"FedAvg": {"client.lr": [0.05, 0.2]}, "Ditto": {"client.lr": [0.05, 0.2]}})
    fedavg = [[{"final_federated_accuracy": 0.6}, {"final_federated_accuracy": 0.8}],
              [{"final_federated_accuracy": 0.9}, {"final_federated_accuracy": 0.7}]]
    ditto = [[{"final_personal_accuracy_mean": 0.9, "final_federated_accuracy": 0.1}],
             [{"final_personal_accuracy_mean": 0.8, "final_federated_accuracy": 0.9}]]
    assert method_scores(fedavg, tuning, 5.0) == (pytest.approx([0.7, 0.8]), "final_federated_accuracy")
    assert method_scores(ditto, tuning, 5.0) == ([0.9, 0.8], "final_personal_accuracy_mean")  # its own metric first
    assert method_scores(fedavg, tuning.model_copy(update={"fallback_metric": None}), 5.0)[0] == [None, None]
    record = {"chosen": {"client.lr": 0.2}, "at_edge": [], "index": 1, "metric": "final_federated_accuracy",
              "points": [{"values": {"client.lr": 0.05}, "score": 0.7}, {"values": {"client.lr": 0.2}, "score": 0.8}]}
    lines = tuning_lines({"FedAvg": record}, tuning)
    assert "(where a method has none, final_federated_accuracy: marked *)" in lines[2]
    assert lines[-1].startswith("| FedAvg | client.lr=0.2 * | 0.8000 |")



def test_a_tuning_point_with_a_run_whose_loss_exploded_loses_like_a_stopped_one():
    # a run can finish its rounds with a huge finite loss (the loop stops only on a NaN model or
    # a loss growing step over step): the write-up lists it as diverged, so its point loses too
    tuning = Tuning(seeds=[7, 8], grids={"FedAvg": {"client.lr": [0.1, 0.3, 1.0]}})
    trial_runs = [[{"final_accuracy": 0.80, "final_loss": 0.6}, {"final_accuracy": 0.82, "final_loss": 0.5}],
                  [{"final_accuracy": 0.90, "final_loss": 0.4}, {"final_accuracy": 0.86, "final_loss": 3e36}],
                  [{"final_accuracy": 0.95, "final_loss": 0.3}, {"final_accuracy": 0.1, "status": "diverged",
                                                                 "rounds_completed": 4, "final_loss": None}]]
    scores, _ = method_scores(trial_runs, tuning, 5.0)
    assert scores == [pytest.approx(0.81), None, None] and choose(scores, lower_is_better=False) == 0
    assert method_scores(trial_runs, tuning, 1e37)[0] == [pytest.approx(0.81), pytest.approx(0.88), None]

def test_a_diverging_run_is_a_result_of_the_grid_and_its_tuning_point_loses(tmp_path):
    spec = _spec(tmp_path, grids={"FedAvg": {"strategy.server_opt.lr": [1e39, 1.0]},
                                  "FedProx": {"strategy.server_opt.lr": [1.0, 1e39]}})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    md = run_bench(spec_path, runs_dir=str(tmp_path / "runs")).read_text()  # it goes on past every divergence
    stored = json.loads((tmp_path / "results" / "tuned.json").read_text())
    assert stored["diverged_tuning"] == [f"- {label} at strategy.server_opt.lr=1e+39, seed 7: stopped as diverging "
                                         "at round 1" for label in ("FedAvg", "FedProx")]
    assert "Diverged tuning runs (the same test, on the validation split): 2" in md
    for label in ("FedAvg", "FedProx"):
        record = stored["tuning"][label]
        [diverged] = [p for p in record["points"] if p["values"]["strategy.server_opt.lr"] == 1e39]
        assert [r["status"] for r in diverged["runs"]] == ["diverged"] and diverged["score"] is None
        assert record["chosen"] == {"strategy.server_opt.lr": 1.0}
    plain = {**spec, "name": "plain", "tuning": None,
             "variants": [{"label": "FedAvg"}, {"label": "FedAvg-1e39", "set": ["strategy.server_opt.lr=1e39"]}]}
    spec_path.write_text(yaml.safe_dump(plain))
    md = run_bench(spec_path, runs_dir=str(tmp_path / "runs")).read_text()
    stored = json.loads((tmp_path / "results" / "plain.json").read_text())
    [row] = [r for r in stored["table"] if r["setting"] == "FedAvg-1e39"]
    assert row["runs"][0]["status"] == "diverged"
    assert stored["diverged"] == ["- FedAvg-1e39, seed 0: stopped as diverging at round 1"]
    assert "Diverged runs (stopped as diverging, or final test loss not finite or above 5): 1" in md
    spec["tuning"]["grids"]["FedAvg"] = {"strategy.server_opt.lr": [1e39, 1e38]}
    spec_path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="every grid point of FedAvg diverged on a tuning seed"):
        run_bench(spec_path, runs_dir=str(tmp_path / "runs"))


def test_a_method_with_a_base_tunes_its_knob_at_the_base_methods_chosen_values(tmp_path):
    spec = _spec(tmp_path, grids={"FedAvg": {"client.lr": [0.0001, 0.05]}, "FedProx": {"strategy.mu": [0.001, 1.0]}},
                 base={"FedProx": "FedAvg"})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    md = run_bench(spec_path, runs_dir=str(tmp_path / "runs")).read_text()
    stored = json.loads((tmp_path / "results" / "tuned.json").read_text())
    assert list(stored["tuning"]) == ["FedAvg", "FedProx"]  # grid order, though FedAvg was tuned first
    assert stored["tuning"]["FedAvg"]["chosen"] == {"client.lr": 0.05}
    prox = stored["tuning"]["FedProx"]
    assert prox["base"] == {"client.lr": 0.05}
    for point in prox["points"]:  # every FedProx tuning run used FedAvg's chosen lr
        for run in point["runs"]:
            cfg = RunDir.open(run["run"]).config()
            assert (cfg.client.lr, cfg.strategy.mu) == (0.05, point["values"]["strategy.mu"])
    [row] = [r for r in stored["table"] if r["setting"] == "FedProx"]
    final = RunDir.open(row["runs"][0]["run"]).config()
    assert (final.client.lr, final.strategy.mu) == (0.05, prox["chosen"]["strategy.mu"])
    assert row["tuned"] == {"client.lr": 0.05, **prox["chosen"]}
    assert f"| FedProx | strategy.mu={prox['chosen']['strategy.mu']} at client.lr=0.05 |" in md


@pytest.mark.parametrize(("base", "message"), [
    ({"FedProx": "Scaffold"}, "tuning.base: Scaffold has no grid"),
    ({"FedProx": "FedAvg", "FedAvg": "FedProx"}, "bases are one level deep"),
])
def test_a_base_that_cannot_be_tuned_first_is_refused(tmp_path, base, message):
    spec = _spec(tmp_path, base=base, grids={"FedAvg": {"client.lr": [0.1]}, "FedProx": {"strategy.mu": [0.1]}})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        BenchSpec.load(path)
    spec["tuning"]["grids"]["FedProx"] = {"client.lr": [0.1]}
    spec["tuning"]["base"] = {"FedProx": "FedAvg"}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="FedProx and its base FedAvg both tune client.lr"):
        BenchSpec.load(path)
