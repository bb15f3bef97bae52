"""Central DP for FedBuff per buffer (fedsim.privacy.buffered): the mechanism's numbers, the
unamplified per-client accountant against dp-accounting's, and whole runs (noise-free runs
equal plain FedBuff, rows carry epsilon, max_epsilon stops, resume is exact)."""

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

import fedsim.privacy.buffered as buffered
from fedsim.algorithms.fedbuff import FedBuffRule, staleness_scale
from fedsim.config import load_config
from fedsim.outputs.results import RunDir
from fedsim.privacy.buffered import BufferPrivacy
from fedsim.runner import run_experiment

FEDBUFF = Path(__file__).parents[2] / "configs" / "fedbuff.yaml"
QUICK = ("partition.num_clients=8", "client.local_steps=3", "model.hidden=[16]", "output.plots=false",
         "strategy={name: fedbuff, buffer_size: 3, horizon: 4, eval_every: 1}", "sim.concurrency=8")
CENTRAL = ("privacy.mechanism=central", "privacy.noise_multiplier=1.5", "privacy.clip_norm=0.5")


def _config(tmp_path, *overrides):
    return load_config(FEDBUFF, [f"output.dir={tmp_path / 'runs'}", *QUICK, *overrides])


def _rows(path, drop=("wall_time_s",)):
    return [{k: v for k, v in row.items() if k not in drop} for row in RunDir.open(path).rows()]


def _arrival(client, base_version=0):
    return SimpleNamespace(job=SimpleNamespace(partition_id=client, base_version=base_version), duration=1.0)


def _dp_accounting_epsilon(ledger, delta, accountant):
    """dp-accounting's epsilon of unsampled Gaussians composed: {noise multiplier: count}."""
    acc = (pld_privacy_accountant.PLDAccountant() if accountant == "pld"
           else rdp_privacy_accountant.RdpAccountant())
    for z, count in ledger.items():
        acc.compose(dp_accounting.GaussianDpEvent(z), count)
    return acc.get_epsilon(delta)


def test_a_buffer_is_the_staleness_weighted_mean_of_clipped_updates_plus_noise_of_std_z_c_over_k(tmp_path):
    dim, k, z, clip, eta_g = 200_000, 4, 1.5, 0.5, 2.0
    cfg = _config(tmp_path, *CENTRAL, f"strategy={{name: fedbuff, buffer_size: {k}, eta_g: {eta_g}}}")
    rule = FedBuffRule(cfg.strategy, None)
    rule.privacy = BufferPrivacy(cfg)
    generator = torch.Generator().manual_seed(0)
    updates = [torch.randn(dim, generator=generator) * scale for scale in (1e-3, 1.0, 3.0, 1e-4)]
    model = torch.zeros(dim)
    rule.server.version = 2  # the four arrivals are 0, 1, 2 and 0 versions stale
    bases = (2, 1, 0, 2)
    for client, (update, base) in enumerate(zip(updates, bases, strict=True)):
        new = rule.receive(model, SimpleNamespace(update=update), _arrival(client, base))
    assert rule.server.version == 3 and len(rule.server) == 0
    clipped = [u * min(1.0, clip / float(u.norm())) for u in updates]
    assert max(float(c.norm()) for c in clipped) <= clip * (1 + 1e-6)
    plain = sum(staleness_scale(2 - b) * c for b, c in zip(bases, clipped, strict=True)) / k
    noise = (new - eta_g * plain) / eta_g
    assert noise.mean().abs() < 5 * z * clip / k / math.sqrt(dim)
    assert float(noise.std()) == pytest.approx(z * clip / k, rel=0.01)
    assert rule.privacy.noise_std() == z * clip / k


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("z, delta", [(0.8, 1e-5), (2.0, 1e-3)])
def test_epsilon_is_dp_accountings_for_the_worst_clients_unamplified_gaussians(tmp_path, accountant, z, delta):
    cfg = _config(tmp_path, "privacy.mechanism=central", f"privacy.noise_multiplier={z}",
                  f"privacy.accountant={accountant}", f"privacy.delta={delta}")
    privacy = BufferPrivacy(cfg)
    buffers = [[0, 1, 2], [0, 3, 4], [5, 5, 1], [0, 1, 2], [5, 6, 7], [1, 2, 3]]
    for version, clients in enumerate(buffers, 1):
        privacy.release(clients, version, 4)
    # client 0: 3 buffers once, sum r^2 = 3; client 1: 4 once, 4; client 5: once twice and once once, 5
    assert privacy.appearances[5] == {2: 1, 1: 1} and privacy.appearances[1] == {1: 4}
    expected = _dp_accounting_epsilon({z / 2: 1, z: 1}, delta, accountant)
    assert privacy.epsilon() == pytest.approx(expected, rel=1e-9)
    assert privacy.epsilon() > _dp_accounting_epsilon({z: 4}, delta, accountant)


def test_a_noise_free_private_run_with_a_huge_clip_norm_is_plain_fedbuff(tmp_path, monkeypatch):
    plain, _ = run_experiment(_config(tmp_path, "name=plain"))
    monkeypatch.setattr(buffered, "gaussian_noise", lambda numel, std, *key: torch.zeros(numel))
    private, summary = run_experiment(_config(tmp_path, "name=private", *CENTRAL, "privacy.clip_norm=1e6"))
    rows = _rows(private)
    assert all(row["epsilon"] > 0 for row in rows) and summary["epsilon"] == rows[-1]["epsilon"]
    assert [{k: v for k, v in row.items() if k != "epsilon"} for row in rows] == _rows(plain)
    assert rows[-1]["model_version"] >= 3


def test_the_runs_epsilon_composes_each_clients_buffers_without_amplification(tmp_path):
    path, summary = run_experiment(_config(tmp_path, *CENTRAL, "privacy.delta=1e-4"))
    rows = _rows(path)
    assert [row["epsilon"] for row in rows] == sorted(row["epsilon"] for row in rows)
    state = RunDir.open(path).latest_checkpoint().strategy
    rule = state["rule"]
    released = Counter({c: int(n) for c, n in enumerate(state["updates_per_client"])})
    released.subtract(Counter(rule.buffered))  # the last buffer, not full, is not released
    assert sum(released.values()) == 3 * rows[-1]["model_version"]
    assert all(set(ledger) == {1} for ledger in rule.privacy.appearances.values())  # no client twice in a buffer
    expected = _dp_accounting_epsilon({1.5: max(released.values())}, 1e-4, "pld")
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert summary["delta"] == 1e-4 and summary["noise_multiplier"] == 1.5


def test_max_epsilon_stops_the_run_before_a_buffer_would_exceed_it(tmp_path):
    budget = _dp_accounting_epsilon({1.5: 2}, 1e-5, "pld") * 1.001  # two buffers of any client, not three
    path, summary = run_experiment(_config(tmp_path, *CENTRAL, f"privacy.max_epsilon={budget}"))
    rows = _rows(path)
    assert summary["status"] == "stopped" and len(rows) < 4
    assert summary["epsilon"] <= budget and all(row["epsilon"] <= budget for row in rows)
    assert summary["epsilon"] == pytest.approx(_dp_accounting_epsilon({1.5: 2}, 1e-5, "pld"), rel=1e-9)


@pytest.mark.parametrize("backend", ["inprocess", "batched"])
def test_a_resumed_private_fedbuff_run_continues_its_ledgers_and_noise_exactly(tmp_path, backend):
    cfg = _config(tmp_path, *CENTRAL, f"sim.backend={backend}", "output.checkpoint_every=2")
    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    checkpoints = sorted(RunDir.open(interrupted).checkpoint_dir.iterdir())
    for late in checkpoints[1:]:
        late.unlink()  # as if killed after the checkpoint of t=2
    run_experiment(cfg, resume=interrupted)
    rows = _rows(interrupted)
    assert rows == _rows(reference)
    assert rows[-1]["epsilon"] > rows[0]["epsilon"] > 0
