"""fedsim.quant.error_feedback: EF, EF21, EControl recursions, memory, and least squares."""

from __future__ import annotations

import pytest
import torch

from fedsim.quant import codecs, error_feedback


def top1() -> codecs.Codec:
    return codecs.build("topk", k=1)


def run(wrapper, updates):
    """Decoded payloads of ``wrapper`` over ``updates``."""
    return [wrapper.codec.decode(wrapper.compress(g)) for g in updates]


G1, G2 = torch.tensor([3.0, -1.0, 2.0]), torch.tensor([1.0, 3.5, 0.0])


def test_ef_sends_the_compressed_corrected_update_and_remembers_the_rest():
    ef = error_feedback.build("ef", top1())
    sent = run(ef, [G1, G2])
    # round 1: p = C(g1) = [3, 0, 0], e = [0, -1, 2]; round 2: e + g2 = [1, 2.5, 2], p = [0, 2.5, 0]
    assert torch.equal(sent[0], torch.tensor([3.0, 0.0, 0.0]))
    assert torch.equal(sent[1], torch.tensor([0.0, 2.5, 0.0]))
    assert torch.equal(ef.state_dict()["error"], torch.tensor([1.0, 0.0, 2.0]))


def test_ef21_sends_increments_and_tracks_the_estimate():
    ef21 = error_feedback.build("ef21", top1())
    sent = run(ef21, [G1, G2])
    assert torch.equal(sent[0], torch.tensor([3.0, 0.0, 0.0]))  # C(g1 - 0)
    assert torch.equal(sent[1], torch.tensor([0.0, 3.5, 0.0]))  # C(g2 - h) = C([-2, 3.5, 0])
    assert torch.equal(ef21.state_dict()["estimate"], torch.tensor([3.0, 3.5, 0.0]))


def test_econtrol_recursion_on_hand_made_tensors():
    econtrol = error_feedback.build("econtrol", top1(), eta=0.5)
    sent = run(econtrol, [G1, G2])
    # round 1: Delta = C(g1) = [3, 0, 0]; e = g1 - Delta = [0, -1, 2]; h = [3, 0, 0]
    # round 2: C(0.5 e + g2 - h) = C([-2, 3, 1]) = [0, 3, 0]; e = e + g2 - h - Delta; h = h + Delta
    assert torch.equal(sent[0], torch.tensor([3.0, 0.0, 0.0]))
    assert torch.equal(sent[1], torch.tensor([0.0, 3.0, 0.0]))
    state = econtrol.state_dict()
    assert torch.equal(state["error"], torch.tensor([-2.0, -0.5, 2.0]))
    assert torch.equal(state["estimate"], torch.tensor([3.0, 3.0, 0.0]))


def test_econtrol_with_eta_zero_is_ef21():
    updates = [torch.randn(40, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    codec = codecs.build("topk", k=3)
    econtrol = run(error_feedback.build("econtrol", codec, eta=0.0), updates)
    ef21 = run(error_feedback.build("ef21", codec), updates)
    assert all(torch.equal(a, b) for a, b in zip(econtrol, ef21, strict=True))


@pytest.mark.parametrize(("name", "kw"), [("ef", {}), ("ef21", {}), ("econtrol", {"eta": 0.3})])
def test_memory_survives_a_state_dict_round_trip_and_skipped_rounds(name, kw):
    codec = codecs.build("topk", fraction=0.1)
    updates = [torch.randn(50, generator=torch.Generator().manual_seed(s)) for s in range(6)]
    client = error_feedback.build(name, codec, **kw)
    run(client, updates[:3])
    saved = client.state_dict()
    saved_copy = {k: v.clone() for k, v in saved.items()}
    # the client sits out some rounds: a fresh process restores the memory later
    restored = error_feedback.build(name, codec, **kw)
    restored.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(run(restored, updates[3:]), run(client, updates[3:]), strict=True))
    assert all(torch.equal(saved[k], saved_copy[k]) for k in saved)  # state_dict hands out copies
    with pytest.raises(ValueError, match=r"state has keys \['bogus'\]"):
        restored.load_state_dict({"bogus": torch.zeros(50)})


def test_server_estimate_mirrors_each_clients_estimate_with_skipped_clients():
    codec = codecs.build("topk", fraction=0.2)
    clients = {i: error_feedback.build("ef21", codec) for i in range(3)}
    server = error_feedback.ServerEstimate()
    generator = torch.Generator().manual_seed(0)
    for round_clients in ([0, 1, 2], [0, 2], [1], [0, 1, 2]):
        for i in round_clients:
            server.update(i, codec.decode(clients[i].compress(torch.randn(20, generator=generator))), weight=1 + i // 2)
    estimates = {i: c.state_dict()["estimate"] for i, c in clients.items()}
    assert all(torch.equal(server.estimate(i), h) for i, h in estimates.items())
    assert [(pid, weight) for pid, weight, _ in server.items()] == [(0, 1.0), (1, 1.0), (2, 2.0)]
    torch.testing.assert_close(server.mean(), (estimates[0] + estimates[1] + 2 * estimates[2]) / 4)


def _reference_mean(estimates: dict[int, torch.Tensor], weights: dict[int, float]) -> torch.Tensor:
    """The EF21-PP aggregate as the definition states it: every estimate, weighted, summed anew."""
    total = sum(weights.values())
    return sum(estimates[i].double() * (weights[i] / total) for i in estimates).float()


def _random_rounds(rounds: int, clients: int, seed: int) -> list[list[tuple[int, torch.Tensor | None, float]]]:
    """Per round (client, increment, weight) of 6 sampled clients that reply and (client, None, 0)
    of 2 whose replies are dropped; increments of sizes from 1e-3 to 1e2, weights from 1 to 49."""
    generator = torch.Generator().manual_seed(seed)
    plan = []
    for _ in range(rounds):
        sampled = torch.randperm(clients, generator=generator)[:8].tolist()
        scales = 10.0 ** torch.randint(-3, 3, (6,), generator=generator).double()
        steps = [(pid, torch.randn(25, generator=generator) * float(scale),
                  float(torch.randint(1, 50, (1,), generator=generator))) for pid, scale in zip(sampled, scales)]
        plan.append(steps + [(pid, None, 0.0) for pid in sampled[6:]])
    return plan


def _play(server, rounds) -> None:
    for steps in rounds:
        for pid, increment, weight in steps:
            if increment is None:
                server.reset(pid)
            else:
                server.update(pid, increment, weight)


@pytest.mark.parametrize("bound", [None, 0, 300], ids=["in memory", "all spilled", "a few in memory"])
def test_the_running_weighted_sum_is_the_mean_of_every_estimate_through_resets_and_resumes(tmp_path, bound):
    # 40 rounds of partial participation over 30 clients (a changing set: newcomers, resets after
    # dropped replies, weights that change); after each round the running sum's mean equals the
    # weighted mean recomputed from every h_i; a checkpoint taken midway resumes it exactly
    plan = _random_rounds(40, 30, seed=1)
    server = error_feedback.ServerEstimate(bound, tmp_path / "spill", tmp_path / "ckpt")
    estimates: dict[int, torch.Tensor] = {}
    weights: dict[int, float] = {}
    for rnd, steps in enumerate(plan):
        _play(server, [steps])
        for pid, increment, weight in steps:
            if increment is None:
                estimates.pop(pid, None)
                weights.pop(pid, None)
            else:
                estimates[pid] = increment.clone() if pid not in estimates else estimates[pid] + increment
                weights[pid] = weight
        torch.testing.assert_close(server.mean(), _reference_mean(estimates, weights), rtol=1e-6, atol=1e-7)
        assert len(server) == len(estimates)
        if rnd == 19:
            saved = server.state_dict()
    assert all(torch.equal(server.estimate(pid), h) for pid, h in estimates.items())
    resumed = error_feedback.ServerEstimate(bound, tmp_path / "spill-2", tmp_path / "ckpt")
    resumed.load_state_dict(saved)
    _play(resumed, plan[20:])
    assert torch.equal(resumed.mean(), server.mean())
    listed = [[(pid, w, h.tolist()) for pid, w, h in estimate.items()] for estimate in (resumed, server)]
    assert listed[0] == listed[1]
    server.clear()
    with pytest.raises(ValueError, match="no client has sent an increment yet"):
        server.mean()


def test_a_checkpoint_of_the_estimates_writes_only_the_clients_changed_since_the_last(tmp_path):
    server = error_feedback.ServerEstimate(10**6, tmp_path / "spill", tmp_path / "ckpt")
    for pid in range(4):
        server.update(pid, torch.ones(3) * pid)
    first = server.state_dict()["files"]
    server.update(2, torch.ones(3))
    server.reset(3)
    second = server.state_dict()["files"]
    assert first == {pid: f"{pid}-00001.pkl" for pid in range(4)}
    assert second == {0: "0-00001.pkl", 1: "1-00001.pkl", 2: "2-00002.pkl"}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted({*first.values(), "2-00002.pkl"})


def distributed_least_squares(seed: int = 0):
    """4 workers, each f_i(x) = ||A_i x - b_i||^2 / 2, D = 500; returns (Q_i, c_i, x*, L)."""
    workers, rows, dim = 4, 500, 500
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(workers, rows, dim, generator=generator, dtype=torch.float64) / rows**0.5
    b = torch.randn(workers, rows, generator=generator, dtype=torch.float64)
    b = b + 3 * torch.randn(workers, 1, generator=generator, dtype=torch.float64)  # heterogeneous workers
    q = a.transpose(1, 2) @ a
    c = (a.transpose(1, 2) @ b[..., None])[..., 0]
    optimum = torch.linalg.solve(q.mean(0), c.mean(0))
    smoothness = torch.linalg.eigvalsh(q.mean(0)).max().item()
    return q, c, optimum, smoothness


def gradient_descent(name: str, steps: int = 1200, **kw) -> float:
    """Relative distance to the optimum after compressed GD with top-1% on every worker."""
    q, c, optimum, smoothness = distributed_least_squares()
    codec = codecs.build("topk", fraction=0.01)
    clients = [error_feedback.build(name, codec, **kw) for _ in range(len(q))]
    server = error_feedback.ServerEstimate()
    x = torch.zeros(optimum.numel(), dtype=torch.float64)
    for _ in range(steps):
        gradients = q @ x - c
        decoded = [codec.decode(client.compress(g)).double() for client, g in zip(clients, gradients, strict=True)]
        if clients[0].server_keeps_estimate:
            for i, increment in enumerate(decoded):
                server.update(i, increment)
            direction = server.mean()
        else:
            direction = sum(decoded) / len(decoded)
        x = x - 0.1 / smoothness * direction
    return ((x - optimum).norm() / optimum.norm()).item()


def test_top1_percent_stalls_without_feedback_and_converges_with_ef21_and_econtrol():
    assert gradient_descent("none") > 0.5
    assert gradient_descent("ef21") < 1e-3
    assert gradient_descent("econtrol", eta=0.01) < 1e-3


def test_build_names_the_bad_method_or_option():
    with pytest.raises(ValueError, match=r"'ef14' is not an error-feedback method; known: none, ef, ef21, econtrol"):
        error_feedback.build("ef14", top1())
    with pytest.raises(ValueError, match=r"'econtrol': needs eta"):
        error_feedback.build("econtrol", top1())
    with pytest.raises(ValueError, match=r"unknown option\(s\) eta; allowed: none"):
        error_feedback.build("ef21", top1(), eta=0.1)
    with pytest.raises(ValueError, match=r"econtrol.eta: 2.0 is not in \[0, 1\]"):
        error_feedback.build("econtrol", top1(), eta=2.0)
