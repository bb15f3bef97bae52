"""Central DP for the aggregators with their own weights or records (SCAFFOLD, FedNova, FedAU):
without noise and clipping the private run is the plain one, number for number; the noise has
the std their sensitivity says; clipped contributions stay within the clip norm; a resumed
private run continues exactly. And SCAFFOLD's control deltas through secure aggregation."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.config import ConfigError, load_config
from fedsim.loops.sync import build_strategy
from fedsim.outputs.results import RunDir
from fedsim.params import ParamSpec
from fedsim.privacy.accounting import GaussianRelease, epsilon
from fedsim.privacy.noise import gaussian_noise
from fedsim.privacy.server import ServerPrivacy
from fedsim.runner import run_experiment
from fedsim.secagg.engine import round_material
from fedsim.secagg.protocol import run_round
from fedsim.secagg.quantization import dequantize_sum, quantize
from fedsim.strategies.replies import ClientUpdate

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
RUN = ("partition.num_clients=6", "output.plots=false", "eval.federated=false", "model.hidden=[16]",
       "sim.backend=batched")
CENTRAL = ("privacy.mechanism=central", "privacy.noise_multiplier=1.2", "privacy.accountant=rdp")
# FedNova's private weights are its own when every client takes part (m = N); the clients' step
# counts differ with their data sizes (one epoch each), so its normalisation is exercised
ALGORITHMS = {
    "scaffold": ("strategy.name=scaffold", "strategy.fraction_train=0.5", "client.local_steps=2"),
    "fednova": ("strategy.name=fednova", "strategy.fraction_train=1.0", "client.local_epochs=1"),
    "fedau": ("strategy.name=fedau", "strategy.fraction_train=0.5", "client.local_steps=2", "strategy.K=4"),
}


def _rows(path, drop=("wall_time_s",)):
    return [{k: v for k, v in row.items() if k not in drop} for row in RunDir.open(path).rows()]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_private_run_without_noise_or_clipping_is_the_plain_run(tmp_path, monkeypatch, name):
    common = (*RUN, *ALGORITHMS[name], "rounds=3")
    plain, _ = run_experiment(load_config(QUICKSTART, [f"output.dir={tmp_path / 'plain'}", *common]))
    monkeypatch.setattr(ServerPrivacy, "noise_std", lambda self: 0.0)  # noise_multiplier 0 (the config wants > 0)
    private, _ = run_experiment(load_config(QUICKSTART, [f"output.dir={tmp_path / 'dp'}", *common, *CENTRAL,
                                                          "privacy.clip_norm=1e9"]))
    assert _rows(private, ("wall_time_s", "epsilon")) == _rows(plain)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_resumed_private_run_continues_exactly(tmp_path, name):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *RUN, *ALGORITHMS[name], *CENTRAL, "rounds=4",
                                   "output.checkpoint_every=2", "privacy.clip_norm=0.5"])
    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    (RunDir.open(interrupted).checkpoint_dir / "round-00004.pt").unlink()  # as if killed during round 3
    run_experiment(cfg, resume=interrupted)
    rows = _rows(interrupted)
    assert rows == _rows(reference) and rows[-1]["epsilon"] > rows[0]["epsilon"] > 0


# ------------------------------------------------------------------ the mechanism, one round
N, DIM = 10, 20_000
SIZES = [10 * (k + 1) for k in range(N)]  # n_k; with batch 32 and one epoch, a_k = 1,1,1,2,2,2,3,3,3,4


def _strategy(name, *sets):
    """A strategy of 10 clients, 3 per round (m = 3, fixed-size: S = 2 C), z = 1.2, C = 0.5."""
    cfg = load_config(QUICKSTART, [f"strategy.name={name}", f"partition.num_clients={N}", "strategy.fraction_train=0.3",
                                   "client.local_epochs=1", "client.momentum=0", *CENTRAL, "privacy.clip_norm=0.5",
                                   *sets])
    strategy = build_strategy(cfg, ParamSpec(("w",), ((DIM,),)), {i: i for i in range(N)}, None)
    strategy.privacy = ServerPrivacy(cfg, SIZES)
    return strategy


def _updates(rows, clients=(2, 5, 9)):
    return [ClientUpdate(c, SIZES[c], row, 4 * DIM, {"steps": float(math.ceil(SIZES[c] / 32))})
            for c, row in zip(clients, rows, strict=True)]


def _scaffold(rows, controls):
    strategy = _strategy("scaffold")
    strategy.control = torch.zeros(DIM)
    updates = _updates(rows)
    strategy._deltas = {u.partition_id: (dc, 4 * DIM) for u, dc in zip(updates, controls, strict=True)}
    return strategy, updates


def _fedau(rows):
    """Round 3 of FedAU (K = 4) after client 2 took part in round 1 and client 5 in round 2:
    omega = 1 (one gap of 1), 2 (one gap of 2), 1 (first participation) for clients 2, 5, 9."""
    strategy = _strategy("fedau", "strategy.K=4")
    updates = _updates(rows)
    strategy.observe(1, updates[:1])
    strategy.observe(2, updates[1:2])
    strategy.observe(3, updates)
    assert [strategy._omega[c] for c in (2, 5, 9)] == [1.0, 2.0, 1.0]
    return strategy, updates


def _noise_std_ok(noise, std):
    # the sample std of 20,000 normal draws is within 3% of the true one (5 standard errors)
    return noise.std() == pytest.approx(std, rel=0.03) and abs(noise.mean()) < 5 * std / DIM**0.5


def test_scaffold_noises_both_means_with_the_joint_sensitivity():
    zeros = [torch.zeros(DIM)] * 3
    strategy, updates = _scaffold(zeros, zeros)
    model = strategy.private_aggregate(1, updates).double().numpy()
    control = strategy.control.double().numpy()
    # joint sum noised with z S = 1.2 x 2 x 0.5 = 1.2: the model mean /m = 3, c's step /N = 10
    assert _noise_std_ok(model, 0.4) and _noise_std_ok(control, 0.12)
    # one noise vector on the joint sum, the run's seeded stream of the round (pinned)
    joint = gaussian_noise(2 * DIM, 1.2, "privacy", 0, "central", 1).double().numpy()
    assert np.allclose(model * 3, joint[:DIM], atol=1e-5) and np.allclose(control * N, joint[DIM:], atol=1e-5)


def test_fednova_noise_is_tau_eff_times_the_largest_weight():
    strategy = _strategy("fednova")
    noise = strategy.private_aggregate(1, _updates([torch.zeros(DIM)] * 3)).double().numpy()
    tau_eff = sum(n * math.ceil(n / 32) for n in SIZES) / sum(SIZES)  # 1480 / 550
    beta = max(SIZES) / sum(SIZES) * N / 3  # the largest p_i = n_max N / (m sum n)
    assert _noise_std_ok(noise, tau_eff * beta * 1.2)


def test_fedau_noise_is_k_over_n_of_the_sum_noise():
    strategy, updates = _fedau([torch.zeros(DIM)] * 3)
    # online weights reveal past participation: accounted as public (add or remove one, S = C = 0.5);
    # the bound is the largest weight any client can have, K = 4, not this round's largest (2)
    assert strategy.privacy.sampling.kind == "none"
    assert _noise_std_ok(strategy.private_aggregate(3, updates).double().numpy(), 4 / N * 1.2 * 0.5)


def test_fedau_known_weights_are_bounded_by_the_largest_inverse_probability():
    strategy = _strategy("fedau", "strategy.weights=known")
    updates = _updates([torch.zeros(DIM)] * 3)
    strategy.observe(1, updates)
    # uniform 3 of 10: omega = 1 / p = 10 / 3 for everyone, fixed in advance (S = 2 C: replace one)
    assert strategy.privacy.sampling.kind == "fixed"
    assert _noise_std_ok(strategy.private_aggregate(1, updates).double().numpy(), 10 / 3 / N * 1.2)


@pytest.mark.parametrize(("weights", "release"), [
    ("online", GaussianRelease(1.2)),  # no amplification: the weights carry who took part before
    ("known", GaussianRelease(1.2, "fixed", 0.5, 3, 6)),  # 1 / p = 2 for everyone, fixed in advance
])
def test_fedau_is_accounted_with_amplification_only_for_weights_fixed_in_advance(tmp_path, weights, release):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *RUN, *ALGORITHMS["fedau"], *CENTRAL, "rounds=2",
                                   f"strategy.weights={weights}"])
    rows = _rows(run_experiment(cfg)[0])
    assert [row["epsilon"] for row in rows] == [epsilon({release: r}, 1e-5, "rdp") for r in (1, 2)]


def _huge(seed):
    return 1e3 * torch.randn(DIM, generator=torch.Generator().manual_seed(seed))


def _no_noise(strategy, monkeypatch):
    monkeypatch.setattr(strategy.privacy, "noise_std", lambda: 0.0)
    return strategy


@pytest.mark.parametrize("client", [0, 1, 2])
def test_a_scaffold_client_moves_the_joint_sum_by_at_most_the_clip_norm(monkeypatch, client):
    rows = [torch.zeros(DIM)] * 3
    controls = [torch.zeros(DIM)] * 3
    rows[client], controls[client] = _huge(1), _huge(2)
    strategy, updates = _scaffold(rows, controls)
    model = _no_noise(strategy, monkeypatch).private_aggregate(1, updates)
    joint = torch.cat([model.double() * 3, strategy.control.double() * N])
    assert float(joint.norm()) == pytest.approx(0.5, rel=1e-5)
    direction = torch.cat([rows[client], controls[client]]).double()
    assert torch.allclose(joint / joint.norm(), direction / direction.norm(), atol=1e-6)


@pytest.mark.parametrize("client", [0, 1, 2])
def test_a_fednova_client_moves_the_sum_by_at_most_its_weight_times_the_clip_norm(monkeypatch, client):
    rows = [torch.zeros(DIM)] * 3
    rows[client] = _huge(client)
    strategy = _no_noise(_strategy("fednova"), monkeypatch)
    updates = _updates(rows)
    moved = float(strategy.private_aggregate(1, updates).double().norm())
    tau_eff = sum(n * math.ceil(n / 32) for n in SIZES) / sum(SIZES)
    p = updates[client].num_examples / sum(SIZES) * N / 3
    assert moved == pytest.approx(tau_eff * p * 0.5, rel=1e-5)
    assert moved <= tau_eff * max(SIZES) / sum(SIZES) * N / 3 * 0.5


@pytest.mark.parametrize("client", [0, 1, 2])
def test_a_fedau_client_moves_the_sum_by_at_most_k_over_n_times_the_clip_norm(monkeypatch, client):
    rows = [torch.zeros(DIM)] * 3
    rows[client] = _huge(client)
    strategy, updates = _fedau(rows)
    moved = float(_no_noise(strategy, monkeypatch).private_aggregate(3, updates).double().norm())
    assert moved == pytest.approx(strategy._omega[updates[client].partition_id] / N * 0.5, rel=1e-5)
    assert moved <= 4 / N * 0.5


def test_coefficients_above_the_bound_of_their_noise_are_refused():
    privacy = _strategy("fedavg").privacy
    rows = torch.ones(3, 4)
    with pytest.raises(ValueError, match=r"coefficients outside \[0, 0.5\]"):
        privacy.noisy_sum(1, rows, torch.tensor([0.5, 0.6, 0.1], dtype=torch.float64), 0.5)


# ------------------------------------------------------------------------------- validate
def _central(*sets):
    return load_config(QUICKSTART, [*CENTRAL, "strategy.fraction_train=0.5", *sets])


@pytest.mark.parametrize("name", ["scaffold", "fednova", "fedau"])
def test_central_dp_validates_with_the_aggregators_of_bounded_weights(name):
    assert _central(f"strategy.name={name}").strategy.name == name


@pytest.mark.parametrize(("sets", "keys"), [
    (["strategy.name=median"], ("privacy.mechanism", "strategy.name 'median'")),
    (["strategy.name=krum"], ("privacy.mechanism", "strategy.name 'krum'")),
    (["strategy.name=flag"], ("privacy.mechanism", "strategy.name 'flag'")),
    (["strategy.name=scaffold", "secagg.enabled=true", "secagg.value_range=4"],
     ("secagg.enabled", "privacy.mechanism central", "strategy.name 'scaffold'")),
    (["strategy.name=fedau", "strategy.weights=known", "participation.model=bernoulli",
      "participation.tied_to_labels=true"], ("strategy.weights", "participation.tied_to_labels",
                                             "privacy.mechanism central")),
])
def test_what_central_dp_cannot_bound_is_refused_in_one_line(sets, keys):
    with pytest.raises(ConfigError) as refused:
        _central(*sets)
    lines = [line for line in str(refused.value).splitlines() if keys[0] in line]
    assert len(lines) == 1 and all(key in lines[0] for key in keys), str(refused.value)


# ---------------------------------------------------------------------- secure aggregation
def test_scaffold_control_deltas_go_through_the_masked_sum_bit_for_bit():
    cfg = load_config(QUICKSTART, ["strategy.name=scaffold", f"partition.num_clients={N}",
                                   "strategy.fraction_train=0.3", "secagg.enabled=true", "secagg.bits=20"])
    dim = 300
    strategy = build_strategy(cfg, ParamSpec(("w",), ((dim,),)), {i: i for i in range(N)}, None)
    strategy.control = 0.01 * torch.ones(dim)
    g = torch.Generator().manual_seed(3)
    updates = [ClientUpdate(c, 50, 0.1 * torch.randn(dim, generator=g), 4 * dim) for c in (2, 5, 9)]
    deltas = {u.partition_id: (0.2 * torch.randn(dim, generator=g), 4 * dim) for u in updates}
    strategy._deltas = dict(deltas)
    strategy.report.sampled = strategy.report.accepted = [2, 5, 9]
    model = strategy.secure_aggregate(4, updates, None)
    # the plain modular sum of the same quantised joint inputs (each weighed 1/3 of the max: 1)
    levels = {u.partition_id: quantize(torch.cat([u.update, deltas[u.partition_id][0]]).double().numpy(), 1.0, 20)
              for u in updates}
    plain = np.zeros(2 * dim, dtype=np.uint32)
    for x in levels.values():
        plain += x  # uint32 arithmetic: the sum modulo 2^32
    masked = run_round(levels, [], degree=None, threshold=cfg.secagg.threshold, material=round_material(0, 4))
    assert np.array_equal(masked.total, plain)
    mean = torch.from_numpy(dequantize_sum(plain, 3, 1.0, 20) * (1 / 3)).float()
    assert torch.equal(model, mean[:dim])
    assert torch.equal(strategy.control, 0.01 * torch.ones(dim) + (mean[None, dim:] * 3).sum(0) / N)
    assert strategy.report.secagg["secagg_bytes_per_client"] > 4 * 2 * dim  # the masked (dy, dc) vector


def test_a_secure_scaffold_run_counts_the_masked_uploads_only(tmp_path):
    small = ("sim.backend=inprocess", "partition.num_clients=4", "output.plots=false", "eval.federated=false",
             "client.local_steps=2", "strategy.fraction_train=0.75", "rounds=2", "model.hidden=[16]",
             "secagg.enabled=true")
    rows = {name: _rows(run_experiment(load_config(QUICKSTART, [f"output.dir={tmp_path / name}", *small,
                                                                f"strategy.name={name}"]))[0])
            for name in ("fedavg", "scaffold")}
    dim = 64 * 16 + 16 + 16 * 10 + 10  # the MLP's parameters
    for fedavg, scaffold in zip(rows["fedavg"], rows["scaffold"], strict=True):
        assert scaffold["bytes_up"] == 3 * scaffold["secagg_bytes_per_client"]
        # the same protocol with a vector twice as long: dc_i rides in the masked upload
        assert scaffold["secagg_bytes_per_client"] - fedavg["secagg_bytes_per_client"] == 4 * dim
        assert not scaffold["skipped"] and scaffold["secagg_recovered"] == 0


def test_a_secure_scaffold_client_whose_delta_missed_c_goes_back_to_its_control_variate(tmp_path):
    # client 1 moves c_1 then crashes in rounds 1 and 3: the plain server resends its copy of c_1,
    # the secure one (which has none) tells client 1 to go back; both keep c the mean of the c_i,
    # so the runs differ by the quantisation only (2^-16 of the range per coordinate)
    small = ("sim.backend=inprocess", "partition.num_clients=4", "output.plots=false", "eval.federated=false",
             "client.local_steps=3", "strategy.name=scaffold", "rounds=4", "model.hidden=[16]", "faults.crash=[1]",
             "faults.rounds=[1,3]")
    plain, secure = (
        [row["centralised_loss"] for row in _rows(run_experiment(load_config(
            QUICKSTART, [f"output.dir={tmp_path / name}", *small, *sets]))[0])]
        for name, sets in (("plain", ()), ("secure", ("secagg.enabled=true",))))
    assert plain == pytest.approx(secure, abs=1e-6)
