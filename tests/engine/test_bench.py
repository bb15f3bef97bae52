"""``fedsim bench``: claim checks as differences or factors, and a small grid end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsim.bench import (
    BenchSpec,
    Cell,
    Check,
    Figure,
    WinnerCheck,
    cells,
    distribution_panels,
    figure_panels,
    heatmap_tables,
    run_bench,
    verdicts,
    write_bench,
)
from fedsim.config import ConfigError, load_config
from fedsim.outputs.results import RunDir

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def _check(**kw) -> Check:
    return Check(**{"claim": "c", "setting": "s", "baseline": "b", **kw})


def test_difference_check_with_a_negative_by_allows_that_loss():
    allowed_loss = _check(by=-0.005)
    assert allowed_loss.margin(0.930, 0.934) == pytest.approx(0.001)
    assert allowed_loss.margin(0.928, 0.934) < 0
    assert _check(by=0.01).margin(0.95, 0.94) >= 0 > _check(by=0.01).margin(0.945, 0.94)


def test_ratio_check_asks_for_a_factor_fewer_when_lower_is_better():
    four_x_fewer = _check(metric="bytes_up_total", ratio=4, lower_is_better=True)
    assert four_x_fewer.margin(1_000, 4_000) == 0
    assert four_x_fewer.margin(1_001, 4_000) == -4
    assert _check(ratio=2).margin(10.0, 5.0) == 0 and _check(ratio=2).margin(9.9, 5.0) < 0


def test_check_takes_a_difference_or_a_ratio_not_both(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "configs": ["a.yaml"], "checks": [
        {"claim": "both", "setting": "s", "baseline": "b", "by": 0.1, "ratio": 2}]}))
    with pytest.raises(ConfigError, match="by .* or ratio"):
        BenchSpec.load(spec)
    with pytest.raises(ValueError, match="greater than 0"):
        _check(ratio=0)


def test_verdict_line_shows_the_measured_factor_and_the_required_one():
    spec = BenchSpec(name="x", configs=["a.yaml"], checks=[
        _check(claim="int8: 4x fewer bytes", metric="bytes_up_total", ratio=4, lower_is_better=True)])
    results = {"s": [{"bytes_up_total": 9768}, {"bytes_up_total": 9768}],
               "b": [{"bytes_up_total": 38446}, {"bytes_up_total": 38446}]}
    [line] = verdicts(spec, results)
    assert line.startswith("- DOES NOT HOLD: int8: 4x fewer bytes")  # the same in both seeds: no spread to weigh
    assert "3.94x fewer, needs 4x; held in 0/2 seeds" in line


def test_small_grid_runs_every_cell_and_writes_table_and_checks(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "tiny",
        "configs": [str(QUICKSTART)],
        "variants": [{"label": "float32"},
                     {"label": "qsgd int8", "set": ["quant.uplink.codec=qsgd", "quant.uplink.bits=8"]}],
        "seeds": [0, 1],
        "common": ["sim.backend=inprocess", "partition.num_clients=2", "rounds=1", "eval.federated=false"],
        "extra": ["bytes_up_total"],
        "out": str(tmp_path / "results"),
        "checks": [{"claim": "int8 sends 3x fewer bytes", "setting": "qsgd int8", "baseline": "float32",
                    "metric": "bytes_up_total", "ratio": 3, "lower_is_better": True}],
    }))
    md = run_bench(spec_path, runs_dir=str(tmp_path / "runs"))
    text = md.read_text()
    assert "| float32 |" in text and "| qsgd int8 |" in text and "x fewer)" in text
    assert "- HOLDS: int8 sends 3x fewer bytes" in text  # the same bytes in both seeds
    assert "Diverged runs (stopped as diverging, or final test loss not finite or above 5): none" in text
    table = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert [row["setting"] for row in table["table"]] == ["float32", "qsgd int8"]
    assert table["spec_hash"] == BenchSpec.load(spec_path).hash(tmp_path) and f"Spec hash: {table['spec_hash']}" in text
    assert (tmp_path / "results" / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_seed_that_never_reached_the_target_counts_as_never():
    from fedsim.bench import BenchSpec, Check, verdicts

    spec = BenchSpec(name="t", configs=["x.yaml"], checks=[
        Check(claim="A is faster", setting="A", baseline="B", metric="rounds_to_target", lower_is_better=True),
        Check(claim="B within 10 rounds", setting="B", value=10, metric="rounds_to_target", lower_is_better=True)])
    results = {"A": [{"seed": s, "rounds_to_target": 3 if s == 0 else None} for s in range(5)],
               "B": [{"seed": s, "rounds_to_target": 8 + s % 2} for s in range(5)]}
    lines = verdicts(spec, results)
    # 4 seeds never reached it: they count (as never), they are not left out
    assert lines[0].startswith("- INCONCLUSIVE: A is faster (rounds_to_target: A inf vs B 8.4; held in 1/5 seeds")
    assert lines[1].startswith("- HOLDS") and "vs bar 10" in lines[1]  # 2, 1, 2, 1, 2 rounds to spare
    never_both = {"A": [{"seed": s, "rounds_to_target": None} for s in range(5)],
                  "B": [{"seed": s, "rounds_to_target": None} for s in range(5)]}
    assert verdicts(spec, never_both)[0].startswith("- DOES NOT HOLD")  # never is not fewer, in all 5 seeds


def _run_with_rows(tmp_path, rows) -> str:
    run = RunDir.create(load_config(QUICKSTART, [f"output.dir={tmp_path}"]))
    for row in rows:
        run.append(row)
    return str(run.path)


def test_figure_panels_average_seeds_per_axis_cell_and_per_layer(tmp_path):
    grid = {"A n=20": Cell("A n=20", QUICKSTART, [], "A", {"n": "20"}),
            "B n=20": Cell("B n=20", QUICKSTART, [], "B", {"n": "20"}),
            "A n=50": Cell("A n=50", QUICKSTART, [], "A", {"n": "50"})}
    results = {
        "A n=20": [{"run": _run_with_rows(tmp_path, [{"t": 1, "acc": 0.2}, {"t": 2, "acc": 0.4}, {"t": 3, "acc": 0.9}])},
                   {"run": _run_with_rows(tmp_path, [{"t": 1, "acc": 0.4}, {"t": 2, "acc": 0.6}])}],
        "B n=20": [{"run": _run_with_rows(tmp_path, [{"t": 1, "acc": 0.5}])}],
        "A n=50": [{"run": _run_with_rows(tmp_path, [{"t": 1, "acc": 0.0}])}],
    }
    panels = figure_panels(Figure(file="f.png", key="acc", x_key="t"), results, grid)
    # one panel per axis cell, one curve per method; x=3 is missing from one seed, so dropped
    # the seeds' lowest and highest value beside the mean: the band the curves shade
    assert panels == {"n=20": {"A": [{"t": 1, "acc": pytest.approx(0.3), "acc_min": 0.2, "acc_max": 0.4},
                                     {"t": 2, "acc": pytest.approx(0.5), "acc_min": 0.4, "acc_max": 0.6}],
                               "B": [{"t": 1, "acc": 0.5, "acc_min": 0.5, "acc_max": 0.5}]},
                      "n=50": {"A": [{"t": 1, "acc": 0.0, "acc_min": 0.0, "acc_max": 0.0}]}}
    kept = figure_panels(Figure(file="f.png", key="acc", x_key="t", settings="n=50"), results, grid)
    assert list(kept) == ["n=50"]

    variance = [{"round": 1, "v": {"w": 2.0, "b": 1.0}}, {"round": 2, "v": {"w": 4.0, "b": 1.0}}]
    runs = {"plain": [{"run": _run_with_rows(tmp_path, variance), "start": {"w": 2.0, "b": 0.5}}]}
    layered = figure_panels(Figure(file="v.png", key="v", layers=["w", "b"], relative_to="start"), runs,
                            {"plain": Cell("plain", QUICKSTART, [], "plain", {})})
    assert layered == {"w": {"plain": [{"round": 1, "v": 1.0, "v_min": 1.0, "v_max": 1.0},
                                       {"round": 2, "v": 2.0, "v_min": 2.0, "v_max": 2.0}]},
                       "b": {"plain": [{"round": 1, "v": 2.0, "v_min": 2.0, "v_max": 2.0},
                                       {"round": 2, "v": 2.0, "v_min": 2.0, "v_max": 2.0}]}}
    with pytest.raises(ValueError, match="relative_to needs layers"):
        Figure(file="v.png", key="v", relative_to="start")


def test_cells_split_labels_into_method_and_panel_and_take_labelled_axis_groups(tmp_path):
    spec = BenchSpec(name="x", configs=[str(QUICKSTART)], panel_by=" / ",
                     variants=[{"label": "fedavg / ipm 0.1", "set": ["strategy.name=fedavg"]}],
                     axes={"partition": {"k=1": ["partition.scheme=pathological", "partition.classes_per_client=1"],
                                         "iid": ["partition.scheme=iid"]}, "rounds": [3]})
    first, second = cells(spec, tmp_path)
    assert first.label == "fedavg / ipm 0.1 partition=k=1 rounds=3"
    assert first.sets == ["strategy.name=fedavg", "partition.scheme=pathological", "partition.classes_per_client=1",
                          "rounds=3"]
    assert (first.method, first.place) == ("fedavg", {"panel": "ipm 0.1", "partition": "k=1", "rounds": "3"})
    assert second.place["partition"] == "iid"


def test_heatmap_tables_are_methods_by_an_axis_one_per_remaining_cell():
    grid = {f"{m} p={p} d={d}": Cell(f"{m} p={p} d={d}", QUICKSTART, [], m, {"p": p, "d": d})
            for m in ("A", "B") for p in ("iid", "k1") for d in ("digits", "synth")}
    results = {label: [{"final_accuracy": 0.5 + 0.1 * i}, {"final_accuracy": 0.7 + 0.1 * i}]
               for i, label in enumerate(grid)}
    del results["B p=k1 d=synth"]
    tables = heatmap_tables(Figure(file="h.png", kind="heatmap", columns="p"), results, grid)
    assert list(tables) == ["d=digits", "d=synth"]
    rows, columns, matrix, spread = tables["d=digits"]
    assert (rows, columns) == (["A", "B"], ["iid", "k1"])
    np.testing.assert_allclose(matrix, [[0.6, 0.8], [1.0, 1.2]])  # A iid is setting 0, A k1 setting 2, ...
    np.testing.assert_allclose(spread, np.full((2, 2), 0.2 / np.sqrt(2)))  # two seeds 0.2 apart
    assert np.isnan(tables["d=synth"][2][1, 1])
    with pytest.raises(ValueError, match="columns 'q' is not an axis"):
        BenchSpec(name="x", configs=["a.yaml"], axes={"p": [1]},
                  figures=[{"file": "h.png", "kind": "heatmap", "columns": "q"}])


def test_a_partition_the_data_cannot_satisfy_stops_the_grid_before_any_run(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "refused", "configs": [str(QUICKSTART)], "seeds": [0],
        "common": ["sim.backend=inprocess", "rounds=1"],
        "variants": [{"label": "ok", "set": ["partition.num_clients=2"]},
                     {"label": "too many", "set": ["partition.num_clients=5000"]}],
        "out": str(tmp_path / "results")}))
    with pytest.raises(ConfigError, match=r"too many \(seed 0\): dirichlet: 5000 partitions need at least"):
        run_bench(spec_path, runs_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_a_check_against_several_baselines_must_beat_each_of_them():
    spec = BenchSpec(name="x", configs=["a.yaml"], checks=[
        _check(claim="#C=1 is the hardest", setting="k1", baseline=["iid", "dir", "k2"], lower_is_better=True)])
    def runs(*values):
        return [{"seed": s, "final_accuracy": v} for s, v in enumerate(values)]

    results = {"k1": runs(0.30, 0.32, 0.28), "iid": runs(0.90, 0.91, 0.89), "dir": runs(0.85, 0.8, 0.9),
               "k2": runs(0.35, 0.36, 0.34)}
    [line] = verdicts(spec, results)
    # margins against k2: 0.05, 0.04, 0.06: t = 0.05 / (0.01 / sqrt 3) = 8.66, p = P(T_2 >= 8.66) = 0.0065
    assert line == ("- HOLDS: #C=1 is the hardest (final_accuracy: k1 0.3 vs the lowest of 3, k2 0.35; "
                    "held in 3/3 seeds, p=0.0065)")
    results["k2"] = runs(0.25, 0.26, 0.24)
    assert verdicts(spec, results)[0].startswith("- DOES NOT HOLD: #C=1 is the hardest (final_accuracy: k1 0.3 vs "
                                                 "the lowest of 3, k2 0.25; held in 0/3 seeds")
    results["k2"] = runs(0.35, 0.25, 0.26)  # lower on the mean, higher in 2 of 3 seeds: the spread overlaps
    assert verdicts(spec, results)[0].startswith("- INCONCLUSIVE: #C=1 is the hardest (final_accuracy: k1 0.3 vs "
                                                 "the lowest of 3, k2 0.2867; held in 1/3 seeds")


def test_winner_checks_name_the_best_method_of_every_axis_value():
    grid = {f"{m} p={p}": Cell(f"{m} p={p}", QUICKSTART, [], m, {"p": p}) for m in ("A", "B") for p in ("iid", "k1")}
    spec = BenchSpec(name="x", configs=["a.yaml"], axes={"p": ["iid", "k1"]}, winners=[
        WinnerCheck(claim="no method wins everywhere", across="p"),
        WinnerCheck(claim="A wins everywhere", across="p", best="A")])
    def runs(*values):
        return [{"seed": s, "final_accuracy": v} for s, v in enumerate(values)]

    results = {"A p=iid": runs(0.9, 0.91, 0.89), "B p=iid": runs(0.8, 0.82, 0.81),
               "A p=k1": runs(0.3, 0.31, 0.29), "B p=k1": runs(0.4, 0.42, 0.41)}
    varies, a_wins = verdicts(spec, results, grid)
    assert varies == ("- HOLDS: no method wins everywhere (tied best final_accuracy per p, best mean first: "
                      "iid A 0.9, k1 B 0.41)")
    assert a_wins.startswith("- DOES NOT HOLD: A wins everywhere")
    results["A p=k1"] = runs(0.44, 0.37, 0.40)  # B ahead on the mean, behind in one seed: tied
    varies, a_wins = verdicts(spec, results, grid)
    assert varies.startswith("- INCONCLUSIVE") and "k1 B/A 0.41" in varies
    assert a_wins.startswith("- INCONCLUSIVE")
    results["A p=k1"] = runs(0.5, 0.52, 0.51)
    varies, a_wins = verdicts(spec, results, grid)
    assert varies.startswith("- DOES NOT HOLD") and a_wins.startswith("- HOLDS")


def test_set_replaces_a_field_of_the_spec_such_as_an_axis(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "x", "configs": ["a.yaml"],
                                         "axes": {"data": {"digits": ["data.name=digits"]}}}))
    spec = BenchSpec.load(spec_path, ["name=x_synthetic", "axes.data={synthetic: [data.name=synthetic]}"])
    assert spec.name == "x_synthetic" and spec.axes == {"data": {"synthetic": ["data.name=synthetic"]}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        BenchSpec.load(spec_path, ["name"])


def test_grid_figures_write_small_multiples_and_heatmaps_with_missing_cells(tmp_path):
    from fedsim.outputs.grid_figures import plot_heatmaps, plot_panels

    rows = [{"round": r, "centralised_accuracy": r / 10} for r in range(1, 6)]
    panels = {f"attack {i}": {f"rule {j}": rows for j in range(6)} for i in range(16)}
    plot_panels(panels, tmp_path / "p.png")
    matrix = np.array([[0.9, np.nan], [0.3, np.inf]])
    plot_heatmaps({"digits": (["A", "B"], ["iid", "#C=1"], matrix, np.full((2, 2), 0.01))}, tmp_path / "h.png",
                  label="final accuracy")
    for name in ("p.png", "h.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distribution_figures_draw_the_seed_mean_sorted_accuracy_curve_per_method_and_are_written(tmp_path):
    grid = {f"{m} p={p}": Cell(f"{m} p={p}", QUICKSTART, [], m, {"p": p}) for m in ("FedAvg", "Ditto")
            for p in ("k1", "k2")}
    quantiles = [0.1 * i for i in range(11)]
    results = {label: [{"seed": s, "run": str(tmp_path / "gone"), "final_accuracy": 0.5, "wall_time_s": 1.0,
                        "final_client_accuracy_quantiles": [q / 2 for q in quantiles],
                        **({"final_personal_accuracy_quantiles": [min(q + 0.1 * s, 1.0) for q in quantiles]}
                           if label.startswith("Ditto") else {})} for s in (0, 1)]
               for label in grid}
    figure = Figure(file="d.png", kind="distribution", metric="final_personal_accuracy_quantiles",
                    fallback="final_client_accuracy_quantiles")
    panels = distribution_panels(figure, results, grid)
    assert list(panels) == ["p=k1", "p=k2"]
    assert list(panels["p=k1"]) == ["FedAvg (client accuracy)", "Ditto"]  # FedAvg from its global model's
    ditto = panels["p=k1"]["Ditto"]
    assert [r["fraction_of_clients"] for r in ditto] == pytest.approx([i / 10 for i in range(11)])
    assert ditto[0] == pytest.approx({"fraction_of_clients": 0.0, "accuracy": 0.05, "accuracy_min": 0.0,
                                      "accuracy_max": 0.1})
    assert panels["p=k1"]["FedAvg (client accuracy)"][10]["accuracy"] == pytest.approx(0.5)
    assert "FedAvg" not in distribution_panels(figure.model_copy(update={"fallback": None}), results, grid)["p=k1"]
    with pytest.raises(ValueError, match="fallback is for kind distribution"):
        Figure(file="x.png", fallback="final_client_accuracy_quantiles")
    spec = BenchSpec(name="dist", configs=[str(QUICKSTART)], variants=[{"label": "FedAvg"}, {"label": "Ditto"}],
                     axes={"p": ["k1", "k2"]}, out=str(tmp_path), figures=[figure])
    write_bench(spec, results, tmp_path, command="fedsim bench x", source={"spec_hash": None})
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_takes_finished_runs_of_the_same_config_and_runs_the_rest(tmp_path, monkeypatch):
    import fedsim.bench as bench

    def spec(lrs):
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({
            "name": "resumed", "configs": [str(QUICKSTART)], "seeds": [0, 1], "out": str(tmp_path / "results"),
            "variants": [{"label": f"lr {lr}", "set": [f"client.lr={lr}"]} for lr in lrs],
            "common": ["sim.backend=inprocess", "partition.num_clients=2", "rounds=1", "eval.federated=false"]}))
        return path

    runs = str(tmp_path / "runs")
    first = json.loads(run_bench(spec([0.1]), runs_dir=runs).with_suffix(".json").read_text())
    (Path(first["table"][0]["runs"][1]["run"]) / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    ran = []
    real = bench._run_one
    monkeypatch.setattr(bench, "_run_one", lambda cfg: ran.append((cfg.seed, cfg.client.lr)) or real(cfg))
    second = json.loads(run_bench(spec([0.1, 0.05]), runs_dir=runs, resume=True).with_suffix(".json").read_text())
    # seed 0 at lr 0.1 finished before; seed 1's run was interrupted, lr 0.05 is a new config
    assert ran == [(1, 0.1), (0, 0.05), (1, 0.05)]
    kept, again = first["table"][0]["runs"], second["table"][0]["runs"]
    assert again[0]["run"] == kept[0]["run"] and again[1]["run"] != kept[1]["run"]
    assert [r["final_accuracy"] for r in again] == [r["final_accuracy"] for r in kept]
    with pytest.raises(ConfigError, match="--resume takes finished runs from --runs-dir"):
        run_bench(spec([0.1]), resume=True)
