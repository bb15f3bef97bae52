"""Sequential gradient coding (fedsim.coding): exact decoding under the patterns each scheme
tolerates, waiting (never a wrong gradient) beyond them, Gilbert-Elliott statistics, the
schemes' loads, and the ``sgc`` loop (same trajectory for every scheme, exact resume,
one-line refusals)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedsim.coding.codes import NotDecodable, cyclic_code, decoding_weights, fractional_repetition_code
from fedsim.coding.schedule import make_scheme, simulate
from fedsim.coding.stragglers import gilbert_elliott, iid, read_trace
from fedsim.config import ConfigError, load_config
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

CONFIG = "configs/sgc.yaml"


def _exact(timeline, seed=0):
    """The largest error of any decoded job against 1^T G, G random chunk gradients."""
    G = np.random.default_rng(seed).standard_normal((timeline.chunks, 5))
    return max(np.abs(d.weights @ (d.rows @ G) - G.sum(0)).max() for d in timeline.jobs.values())


@pytest.mark.parametrize("code", [cyclic_code, fractional_repetition_code])
def test_any_n_minus_s_rows_of_a_gradient_code_decode_the_sum(code):
    n, s = 6, 2
    B = code(n, s)
    assert (np.count_nonzero(B, axis=1) == s + 1).all()  # each worker reads s + 1 parts
    G = np.random.default_rng(1).standard_normal((n, 4))
    for alive in itertools.combinations(range(n), n - s):
        a = decoding_weights(B[list(alive)])
        np.testing.assert_allclose(a @ (B[list(alive)] @ G), G.sum(0), atol=1e-10)


def test_fractional_repetition_by_hand_and_a_lost_group_does_not_decode():
    B = fractional_repetition_code(4, 1)
    np.testing.assert_array_equal(B, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_allclose(decoding_weights(B[[0, 2]]), [1, 1])  # g1 + g2 from worker 0, g3 + g4 from 2
    with pytest.raises(NotDecodable):
        decoding_weights(B[[0, 1]])  # both of group {2, 3} straggled: beyond s = 1


def test_a_round_with_more_stragglers_than_gc_tolerates_waits_for_them():
    n, jobs = 4, 3
    pattern = np.zeros((jobs, n), dtype=bool)
    pattern[1, [0, 2]] = True  # 2 stragglers in round 2; the code tolerates 1
    timeline = simulate(make_scheme("gc", n, 1, 0), pattern, jobs, slow_factor=5.0)
    load = 2 / n
    assert [r.duration for r in timeline.rounds] == pytest.approx([n * load, 5 * n * load, n * load])
    assert timeline.rounds[1].waited == (0,)  # one straggler is enough to decode
    assert _exact(timeline) < 1e-10


def _tolerated(name):
    """A pattern the scheme (n = 6, s = 1, T = 1) finishes without waiting for a straggler."""
    n, jobs = 6, 8
    pattern = np.zeros((jobs + (name in ("sr_sgc", "m_sgc")), n), dtype=bool)
    if name == "gc":
        pattern[np.arange(jobs), np.arange(jobs) % n] = True  # one straggler a round
    elif name == "sr_sgc":
        pattern[[1, 4], :3] = True  # bursts of 3 stragglers, a clean round after each
    elif name == "m_sgc":
        pattern[::2, :4] = True  # 4 of 6 workers straggle every other round (GC with s = 1 would wait)
    return pattern, jobs


@pytest.mark.parametrize("name", ["uncoded", "gc", "sr_sgc", "m_sgc"])
def test_each_scheme_decodes_exactly_without_waiting_under_a_pattern_it_tolerates(name):
    pattern, jobs = _tolerated(name)
    scheme = make_scheme(name, 6, 0 if name == "uncoded" else 1, 1 if name in ("sr_sgc", "m_sgc") else 0)
    timeline = simulate(scheme, pattern, jobs, slow_factor=5.0)
    assert sorted(timeline.jobs) == list(range(1, jobs + 1))
    assert all(d.round <= d.job + scheme.delay for d in timeline.jobs.values())
    assert not any(r.waited for r in timeline.rounds)
    assert _exact(timeline) < 1e-10


def test_the_schemes_loads_without_stragglers():
    n, jobs = 8, 5
    for name, s, T, per_job in (("uncoded", 0, 0, 1.0), ("gc", 2, 0, 3.0), ("sr_sgc", 1, 1, 2.0), ("m_sgc", 1, 1, 1.0)):
        timeline = simulate(make_scheme(name, n, s, T), np.zeros((jobs + T, n), dtype=bool), jobs, 5.0)
        assert timeline.work_per_job == pytest.approx(per_job)  # data read per job, in datasets
        assert timeline.rounds[-1].end == pytest.approx(jobs * n * per_job / n)


def test_m_sgc_under_random_stragglers_decodes_exactly_with_less_work_than_gc():
    n, jobs = 8, 40
    pattern = gilbert_elliott(jobs + 1, n, 0.05, 0.5, seed=3)
    m = simulate(make_scheme("m_sgc", n, 1, 1), pattern, jobs, 5.0)
    gc = simulate(make_scheme("gc", n, 1, 0), pattern[:jobs], jobs, 5.0)
    assert _exact(m) < 1e-10 and _exact(gc) < 1e-10
    assert m.work_per_job < gc.work_per_job


def test_gilbert_elliott_straggles_at_its_stationary_rate_in_bursts_of_mean_one_over_p_bg():
    p_gb, p_bg = 0.1, 0.4
    bad = gilbert_elliott(20_000, 5, p_gb, p_bg, seed=0)
    assert bad.mean() == pytest.approx(p_gb / (p_gb + p_bg), abs=0.01)
    bursts = [len(list(run)) for col in bad.T for value, run in itertools.groupby(col) if value]
    assert np.mean(bursts) == pytest.approx(1 / p_bg, rel=0.05)
    assert iid(20_000, 5, 0.2, seed=0).mean() == pytest.approx(0.2, abs=0.01)
    np.testing.assert_array_equal(gilbert_elliott(50, 4, p_gb, p_bg, seed=7), gilbert_elliott(50, 4, p_gb, p_bg, seed=7))


def test_a_trace_is_read_as_rounds_by_workers(tmp_path):
    path = tmp_path / "trace.txt"
    path.write_text("# rounds x workers\n0 1 0\n1,1,0\n")
    np.testing.assert_array_equal(read_trace(path), [[False, True, False], [True, True, False]])


@pytest.fixture
def config(tmp_path):
    def make(*overrides):
        return load_config(CONFIG, [f"output.dir={tmp_path / 'runs'}", "rounds=4", "eval.every=1",
                                    "output.plots=false", *overrides])
    return make


def test_every_scheme_follows_full_batch_gradient_descent(config):
    from fedsim.coding.sgc import chunk_gradients
    from fedsim.sim.components import federated_data, make_model

    cfg = config()
    data = federated_data(cfg)
    net = make_model(cfg.model, data.train, cfg.seed)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    full = chunk_gradients(net, x, y, [np.arange(len(y))])[0]
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(full, torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    finals = {}
    for scheme in ("uncoded", "gc", "sr_sgc", "m_sgc"):
        path, summary = run_experiment(config(f"strategy.scheme={scheme}", "strategy.delay=null", "strategy.s=null"))
        finals[scheme] = (summary["final_loss"], summary["virtual_time"])
    losses = [loss for loss, _ in finals.values()]
    assert max(losses) - min(losses) < 1e-5  # the same gradients, decoded from different codes
    assert finals["m_sgc"][1] != finals["gc"][1]


def test_a_resumed_sgc_run_continues_exactly(config):
    cfg = config("output.checkpoint_every=2")
    path, _ = run_experiment(cfg)
    first = RunDir.open(path).rows()
    (RunDir.open(path).checkpoint_dir / "round-00004.pt").unlink()
    run_experiment(cfg, resume=path)
    again = RunDir.open(path).rows()
    assert [{k: v for k, v in r.items() if k != "wall_time_s"} for r in again] == \
        [{k: v for k, v in r.items() if k != "wall_time_s"} for r in first]


@pytest.mark.parametrize(("overrides", "message"), [
    (["strategy.scheme=uncoded", "strategy.delay=null", "strategy.s=2"],
     "strategy: s: 2 is not read by scheme 'uncoded'; leave it unset"),
    (["strategy.scheme=gc", "strategy.delay=1"], "strategy: delay: 1; scheme 'gc' finishes each job in its own round"),
    (["strategy.s=8"], "strategy.s: 8 stragglers of partition.num_clients 8 workers; at most 7"),
    (["strategy.code=fractional_repetition", "strategy.s=2"],
     "strategy.code: fractional_repetition needs strategy.s + 1 (3) to divide partition.num_clients (8)"),
    (["partition.scheme=iid"], "partition.scheme: 'iid' is not read under strategy.name 'sgc'"),
    (["strategy.p=0.3"], "strategy: p: 0.3 is not read by stragglers 'gilbert_elliott'"),
    (["eval.federated=true"], "eval.federated: the workers of strategy.name 'sgc' hold no test split"),
])
def test_misconfigurations_are_refused_in_one_line(config, overrides, message):
    with pytest.raises(ConfigError) as err:
        config(*overrides)
    assert str(err.value).startswith(f"config error: {message}") or message in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_a_trace_of_the_wrong_width_is_refused(config, tmp_path):
    path = tmp_path / "trace.txt"
    path.write_text("0 1\n1 0\n")
    with pytest.raises(ConfigError, match="strategy.trace: .* has 2 workers per row; partition.num_clients is 8"):
        config("strategy.stragglers=trace", f"strategy.trace={path}", "strategy.p_gb=0.05", "strategy.p_bg=0.5")


def test_a_run_on_a_trace_sees_its_stragglers_round_by_round(config, tmp_path):
    path = tmp_path / "trace.txt"
    path.write_text("1 1 0 0 0 0 0 0\n0 0 0 0 0 0 0 0\n")  # repeats: rounds 3, 4 are rounds 1, 2
    run_path, summary = run_experiment(config("strategy.stragglers=trace", f"strategy.trace={path}", "strategy.p_gb=0.05",
                                       "strategy.p_bg=0.5"))
    rows = RunDir.open(run_path).rows()
    assert [r["stragglers"] for r in rows] == [2, 0, 2, 0]
    assert summary["rounds_waiting"] == 0  # M-SGC (s = 1, T = 1) codes the 2 lost chunks in the clean round
    _, gc = run_experiment(config("strategy.scheme=gc", "strategy.delay=null", "strategy.stragglers=trace",
                                  f"strategy.trace={path}", "strategy.p_gb=0.05", "strategy.p_bg=0.5"))
    assert gc["rounds_waiting"] == 2  # GC (s = 1) waits in both rounds of 2 stragglers
