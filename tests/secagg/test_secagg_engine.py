"""Secure aggregation in fedsim's engine: the aggregators it serves, its rows, its refusals,
and runs that resume exactly."""

import logging
from pathlib import Path

import pytest
import torch

from fedsim.algorithms import registry
from fedsim.config import ConfigError, SecAggConfig, load_config
from fedsim.outputs.results import RunDir
from fedsim.privacy.server import ServerPrivacy
from fedsim.runner import run_experiment
from fedsim.secagg.engine import SecureAggregation
from fedsim.strategies.replies import ClientUpdate

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
SMALL = ("sim.backend=inprocess", "partition.num_clients=4", "output.plots=false", "eval.federated=false",
         "client.local_steps=3", "secagg.enabled=true")


def _updates(n=5, dim=40, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(i, 10 + 7 * i, scale * torch.randn(dim, generator=g), 4 * dim, {"steps": float(3 + i)})
            for i in range(n)]


def _strategy(name):
    strategy = registry.get(name)()
    if name == "fedau":
        strategy._nodes = list(range(8))  # N: the clients connected
        strategy._omega = {i: 1.0 + 0.5 * i for i in range(5)}
    return strategy


def _coefficients(u):
    return _strategy("fedavg").sum_coefficients(1, u)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fednova", "fedau", "scaffold"])
def test_sum_coefficients_give_the_aggregators_own_aggregate(name):
    strategy, updates = _strategy(name), _updates()
    c = strategy.sum_coefficients(1, updates)
    weighted_sum = (c.to(torch.float32)[:, None] * torch.stack([u.update for u in updates])).sum(0)
    torch.testing.assert_close(weighted_sum, strategy.aggregate_updates(1, updates), rtol=1e-6, atol=1e-7)


def test_the_secure_sum_is_the_weighted_mean_to_the_quantisation_step():
    cfg = SecAggConfig(enabled=True, bits=20, value_range=1.0)
    updates = _updates()
    delta, costs, nbytes, relayed = SecureAggregation(cfg, seed=0).aggregate(1, updates, [], _coefficients)
    expected = _strategy("fedavg").aggregate_updates(1, updates)
    step = 2 / (2**20 - 1)
    assert (delta - expected).abs().max() <= len(updates) * step  # half a step per input, times max c_i <= 1
    # 5 clients, 4 neighbours each: keys 64 + shares 4 x (2 x 38 + 36) + vector 4 x 40 + unmask shares 4 x 38
    assert costs == {"secagg_message_rounds": 4, "secagg_out_of_range": 0, "secagg_clipped": 0, "secagg_withheld": 0,
                     "secagg_recovered": 0, "secagg_bytes_per_client": 64 + 4 * 112 + 160 + 4 * 38,
                     "secagg_bytes_down_per_client": 4 * 64 + 4 * 112}
    assert nbytes == 5 * costs["secagg_bytes_per_client"] and relayed == 5 * costs["secagg_bytes_down_per_client"]


def test_out_of_range_coordinates_are_clipped_and_reported(caplog):
    updates = _updates()
    updates[2].update[7] = 3.0
    with caplog.at_level(logging.WARNING):
        delta, costs, *_ = SecureAggregation(SecAggConfig(enabled=True), 0).aggregate(1, updates, [], _coefficients)
    assert costs["secagg_out_of_range"] == costs["secagg_clipped"] == 1 and costs["secagg_withheld"] == 0
    assert ("round 1: secure aggregation: 1 coordinates of 1 clients outside secagg.value_range [-1, 1]: "
            "0 clients withheld their inputs, 1 coordinates clipped") in caplog.messages
    # the quantiser's input w_i u_i (w_i = n_i / max n) is clipped to [-1, 1]
    c = _coefficients(updates).float()
    inputs = torch.stack([(c_i / c.max() * u.update).clamp(-1, 1) for c_i, u in zip(c, updates, strict=True)])
    assert (delta - c.max() * inputs.sum(0)).abs().max() < 1e-5


def test_a_client_out_of_range_withholds_its_input_and_is_recovered_as_dropped():
    updates = _updates()
    updates[2].update[7] = -3.0
    cfg = SecAggConfig(enabled=True, out_of_range="withhold")
    delta, costs, *_ = SecureAggregation(cfg, 0).aggregate(1, updates, [], _coefficients)
    assert costs["secagg_withheld"] == costs["secagg_recovered"] == 1 and costs["secagg_clipped"] == 0
    others = [u for u in updates if u.partition_id != 2]
    assert (delta - _strategy("fedavg").aggregate_updates(1, others)).abs().max() < 1e-5


def test_too_many_dropouts_refuse_the_round_in_one_line(caplog):
    with caplog.at_level(logging.WARNING):
        delta, costs, *_ = SecureAggregation(SecAggConfig(enabled=True), 0).aggregate(
            2, _updates(n=2), [7, 8, 9], _coefficients)
    assert delta is None and costs["secagg_recovered"] == 0
    assert ("round 2 refused: secure aggregation cannot unmask: client 0 sent its input and 1 of its 4 neighbours "
            "replied; 3 shares rebuild its masks (secagg.threshold 0.5)") in caplog.messages


@pytest.mark.parametrize(("sets", "line"), [
    (["strategy.name=median"], "secagg.enabled: the server learns only the weighted sum of the updates; "
                               "strategy.name is 'median', whose server reads each client's reply"),
    (["strategy.name=krum"], "strategy.name is 'krum', whose server reads each client's reply"),
    (["strategy.name=fedlex"], "strategy.name is 'fedlex', whose server reads each client's reply"),
    (["strategy.name=fedbuff"], "secagg.enabled: secure aggregation sums a synchronous round's updates; "
                                "strategy.name is 'fedbuff' (async)"),
    (["strategy.name=gossip"], "strategy.name is 'gossip' (gossip)"),
    (["quant.uplink.codec=topk", "quant.uplink.fraction=0.1"],
     "secagg.enabled: masked uploads are dense uint32 vectors; quant.uplink.codec 'topk' cannot compress them"),
    (["secagg.bits=28", "partition.num_clients=20"], "secagg.bits: 28 bits per input and up to 20 clients per round"),
    (["secagg.degree=3"], "secagg.degree: a Harary graph's degree is even (k/2 neighbours on either side); got 3"),
])
def test_what_cannot_combine_with_secure_aggregation_is_refused_at_validate(sets, line):
    with pytest.raises(ConfigError) as refused:
        load_config(QUICKSTART, ["secagg.enabled=true", *sets])
    assert any(line in problem for problem in str(refused.value).splitlines()), str(refused.value)


def test_secagg_options_without_secagg_are_refused():
    with pytest.raises(ConfigError, match="secagg.bits: 16 is not read with secagg.enabled false"):
        load_config(QUICKSTART, ["secagg.bits=16"])


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fednova", "fedau", "scaffold"])
def test_aggregators_of_weighted_sums_validate_with_secure_aggregation(name):
    cfg = load_config(QUICKSTART, ["secagg.enabled=true", f"strategy.name={name}", "strategy.server_opt.name=adam"])
    assert cfg.secagg.enabled


def _rows(path):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in RunDir.open(path).rows()]


def test_a_run_whose_dropouts_exceed_the_threshold_skips_those_rounds(tmp_path):
    # degree 2: a client's secrets need both its neighbours; a crashed client leaves two unrecoverable
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *SMALL, "rounds=2", "faults.crash=[1]",
                                   "faults.rounds=[2]", "secagg.degree=2"])
    rows = _rows(run_experiment(cfg)[0])
    assert [row["skipped"] for row in rows] == [False, True]
    assert rows[0]["secagg_recovered"] == 0 and rows[1]["num_failed"] == 1


@pytest.mark.parametrize("name", ["fedavg", "scaffold"])
def test_a_run_with_a_dropped_client_recovers_it_and_resumes_exactly(tmp_path, name):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *SMALL, "rounds=4", "output.checkpoint_every=2",
                                   "faults.crash=[1]", "faults.rounds=[1,3]", f"strategy.name={name}"])
    reference, _ = run_experiment(cfg)
    rows = _rows(reference)
    assert [row["secagg_recovered"] for row in rows] == [1, 0, 1, 0]
    assert all(row["secagg_message_rounds"] == 4 and row["secagg_out_of_range"] == 0 for row in rows)
    assert rows[1]["bytes_up"] == 4 * rows[1]["secagg_bytes_per_client"]
    interrupted, _ = run_experiment(cfg)
    run = RunDir.open(interrupted)
    (run.checkpoint_dir / "round-00004.pt").unlink()
    run_experiment(cfg, resume=interrupted)
    assert _rows(interrupted) == rows


@pytest.mark.parametrize("sets", [["strategy.name=fednova"], ["strategy.name=fedau"], ["strategy.name=scaffold"],
                                  ["sim.backend=batched", "strategy.server_opt.name=adam"]])
def test_what_validates_with_secure_aggregation_runs(tmp_path, sets):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *SMALL, "rounds=2", "strategy.fraction_train=0.75", *sets])
    rows = _rows(run_experiment(cfg)[0])
    assert [row["num_success"] for row in rows] == [3, 3] and not any(row["skipped"] for row in rows)
    assert all(row["secagg_bytes_per_client"] > 0 for row in rows)


def _private(*sets):
    return load_config(QUICKSTART, ["secagg.enabled=true", "secagg.value_range=4", "privacy.mechanism=central",
                                    "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5", *sets])


def test_distributed_dp_gives_the_sum_the_calibrated_noise_std():
    # 10 of 10 clients (m = 10) clip to C = 0.5 and each adds N(0, (z C)^2 / m) before quantising;
    # the aggregate (sum + noise) / m carries the central mechanism's std z C / m = 0.05
    cfg = _private()
    privacy = ServerPrivacy(cfg, [100] * 10)
    dim = 20_000
    g = torch.Generator().manual_seed(1)
    updates = [ClientUpdate(i, 100, 0.02 * torch.randn(dim, generator=g), 4 * dim) for i in range(10)]
    updates[3].update *= 100  # beyond the clip norm: clipped by its client
    delta, costs, *_ = SecureAggregation(cfg.secagg, cfg.seed).aggregate(1, updates, [], _coefficients, privacy)
    clipped = torch.stack([u.update * min(1.0, 0.5 / float(u.update.norm())) for u in updates])
    noise = (delta.double() - clipped.double().sum(0) / 10).numpy()
    assert privacy.noise_std() == pytest.approx(0.05)
    # the sample std of 20,000 normal draws is within 3% of the true one (5 standard errors)
    assert noise.std() == pytest.approx(0.05, rel=0.03) and abs(noise.mean()) < 5 * 0.05 / dim**0.5
    assert costs["secagg_out_of_range"] == 0


def test_adaptive_clipping_is_refused_with_secure_aggregation():
    with pytest.raises(ConfigError, match="secagg.enabled: the server sees no client's update norm; "
                                          "privacy.clipping 'adaptive'"):
        _private("privacy.clipping=adaptive")


def test_a_distributed_dp_run_resumes_exactly(tmp_path):
    cfg = _private(f"output.dir={tmp_path}", *SMALL, "rounds=4", "output.checkpoint_every=2")
    reference, _ = run_experiment(cfg)
    rows = _rows(reference)
    assert all(row["epsilon"] > 0 and row["secagg_out_of_range"] == 0 for row in rows)
    interrupted, _ = run_experiment(cfg)
    (RunDir.open(interrupted).checkpoint_dir / "round-00004.pt").unlink()
    run_experiment(cfg, resume=interrupted)
    assert _rows(interrupted) == rows
