"""Quantized clients and compressed uplinks in federated runs: accuracy against float, the
bytes on the wire in metrics.jsonl, and error-feedback memory kept per client across rounds.

All runs use the in-process backend (the same ClientApp, no Ray) with few clients and rounds.
"""

import math
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from fedsim.clients.quantization import EF_STATE_KEY
from fedsim.config import load_config
from fedsim.outputs.results import RunDir
from fedsim.params import ParamSpec
from fedsim.quant import codecs
from fedsim.runner import run_experiment, serve
from fedsim.sim.client_app import ClientRuntime
from fedsim.sim.components import federated_data, make_model
from fedsim.sim.inprocess import InProcessGrid

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
QAT_INT8 = ROOT / "configs" / "qat_int8.yaml"
SHORT_RUN = ("sim.backend=inprocess", "partition.num_clients=5", "rounds=4", "eval.federated=false",
             "output.plots=false")
IDENTITY = codecs.build("identity")
MLP_DIM = 64 * 128 + 128 + 128 * 10 + 10  # digits MLP, hidden [128]: the values of one update


def test_qat_int8_config_is_the_quickstart_plus_quantization():
    quickstart, qat = yaml.safe_load(QUICKSTART.read_text()), yaml.safe_load(QAT_INT8.read_text())
    assert qat.pop("quant") == {"qat": {"weight_bits": 8, "granularity": "per_channel"},
                                "uplink": {"codec": "qsgd", "bits": 8, "block_size": 256}}
    assert {**qat, "name": "quickstart"} == quickstart


def test_int8_qat_clients_with_qsgd_int8_uplink_reach_float_accuracy(tmp_path):
    sets = [*SHORT_RUN, "rounds=5", f"output.dir={tmp_path}"]
    _, float_run = run_experiment(load_config(QUICKSTART, sets))
    _, int8_run = run_experiment(load_config(QAT_INT8, sets))
    assert float_run["final_accuracy"] >= 0.85
    assert int8_run["final_accuracy"] >= float_run["final_accuracy"] - 0.02
    assert int8_run["bytes_up_total"] < float_run["bytes_up_total"] / 3.9


class _SentWeights(ClientRuntime):
    """The client runtime, recording the weights each client sends: start + its update."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sent: list[dict[str, torch.Tensor]] = []

    def run(self, message_type, members):
        outcomes = super().run(message_type, members)
        if message_type == "train":
            spec = ParamSpec.of(make_model(self.cfg.model, federated_data(self.cfg).train, self.cfg.seed))
            for m, outcome in zip(members, outcomes, strict=True):
                start = spec.flatten(m.content["arrays"].to_torch_state_dict())
                update = IDENTITY.decode(IDENTITY.from_arrays(
                    {k: v.numpy() for k, v in outcome.reply.content()["update"].items()}))
                self.sent.append(spec.unflatten(start + update))
        return outcomes


def _on_grid(weight: torch.Tensor, bits: int) -> bool:
    """Whether every row (output channel) of ``weight`` is k * s with integers k in
    [-2^(b-1), 2^(b-1) - 1]: the row's largest magnitude is one end of the grid (the
    negative one, -2^(b-1) s, when the most negative latent weight rounded down to it)."""
    largest = weight.abs().amax(dim=1, keepdim=True)

    def integral(top: int) -> torch.Tensor:
        levels = weight * top / largest
        return (levels - levels.round()).abs().amax(dim=1) < 1e-3

    return bool((integral(2 ** (bits - 1) - 1) | integral(2 ** (bits - 1))).all())


@pytest.mark.parametrize("qat", [True, False], ids=["qat", "float"])
def test_under_qat_the_server_receives_weights_on_the_quantization_grid(small_config, qat):
    quant = ["quant.qat.weight_bits=4", "quant.qat.granularity=per_channel"] if qat else []
    cfg = small_config(*SHORT_RUN, "partition.num_clients=2", "rounds=1", *quant)
    app = _SentWeights(cfg)
    serve(InProcessGrid(app, 2), cfg, RunDir.create(cfg), resume=False, show_progress=False)
    assert len(app.sent) == 2
    for weights in app.sent:
        matrices = [w for name, w in weights.items() if name.endswith("weight") and w.ndim == 2]
        assert len(matrices) == 2 and all(_on_grid(w, 4) == qat for w in matrices)


def test_metrics_count_the_codec_payload_bytes_per_round_and_in_total(small_config):
    cfg = small_config(*SHORT_RUN, "rounds=3", "strategy.fraction_train=0.6", "quant.uplink.codec=qsgd",
                       "quant.uplink.bits=8", "quant.downlink.codec=float16")
    path, summary = run_experiment(cfg)
    rows = RunDir.open(path).rows()
    header = 1 + 1 + 4  # codec id, ndim, one uint32 dimension
    qsgd_int8 = header + MLP_DIM + 4 * math.ceil(MLP_DIM / 256)  # a byte a value, a float32 scale a block
    float16 = header + 2 * MLP_DIM
    up_total = down_total = 0
    for row in rows:
        assert row["num_sampled"] == 3 and row["num_success"] == 3
        assert row["bytes_up"] == qsgd_int8 * row["num_success"]
        assert row["bytes_down"] == float16 * row["num_sampled"]
        up_total, down_total = up_total + row["bytes_up"], down_total + row["bytes_down"]
        assert (row["bytes_up_total"], row["bytes_down_total"]) == (up_total, down_total)
    assert (summary["bytes_up_total"], summary["bytes_down_total"]) == (up_total, down_total)


def _memory(state) -> dict[str, torch.Tensor]:
    record = state.get(EF_STATE_KEY)
    return {} if record is None else record.to_torch_state_dict()


class _RecordingRuntime(ClientRuntime):
    """The client runtime, recording which partitions trained in which round, and each
    client's error-feedback memory before and after every training call."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.trained: dict[int, list[int]] = {}
        self.memory: dict[tuple[int, int, str], dict[str, torch.Tensor]] = {}

    def run(self, message_type, members):
        if message_type != "train":
            return super().run(message_type, members)
        for m in members:
            pid, rnd = m.partition_id, int(m.content["config"]["server-round"])
            self.trained.setdefault(pid, []).append(rnd)
            self.memory[pid, rnd, "before"] = _memory(m.state)
        outcomes = super().run(message_type, members)
        for m in members:
            self.memory[m.partition_id, int(m.content["config"]["server-round"]), "after"] = _memory(m.state)
        return outcomes


def _server_estimates(run: RunDir) -> dict[int, torch.Tensor]:
    """The server's EF21 estimates h_i of the run's latest checkpoint, read from their files."""
    files = run.latest_checkpoint().strategy["uplink_estimates"]["files"]
    return {pid: pickle.loads((run.checkpoint_dir / "estimates" / name).read_bytes()) for pid, name in files.items()}


@pytest.mark.parametrize("feedback", [["quant.uplink.error_feedback=ef21"],
                                      ["quant.uplink.error_feedback=econtrol", "quant.uplink.eta=0.1"]],
                         ids=["ef21", "econtrol"])
def test_client_and_server_estimates_stay_equal_when_clients_skip_rounds(small_config, feedback):
    cfg = small_config(*SHORT_RUN, "partition.num_clients=4", "rounds=5", "strategy.fraction_train=0.5",
                       "quant.uplink.codec=topk", "quant.uplink.fraction=0.05", *feedback)
    app = _RecordingRuntime(cfg)
    grid = InProcessGrid(app, cfg.partition.num_clients)
    run = RunDir.create(cfg)
    serve(grid, cfg, run, resume=False, show_progress=False)
    gaps = [pid for pid, rounds in app.trained.items() if any(b - a > 1 for a, b in zip(rounds, rounds[1:]))]
    assert gaps, f"no client skipped a round between two trainings: {app.trained}"
    server = _server_estimates(run)
    assert sorted(server) == sorted(app.trained)
    for pid in range(cfg.partition.num_clients):
        state = grid.client_state(pid)
        if pid not in app.trained:
            assert EF_STATE_KEY not in state
            continue
        client = state[EF_STATE_KEY].to_torch_state_dict()
        assert torch.count_nonzero(client["estimate"]) > 0
        torch.testing.assert_close(client["estimate"], server[pid], rtol=0, atol=1e-7)


@pytest.mark.parametrize("feedback", [["quant.uplink.error_feedback=ef21"],
                                      ["quant.uplink.error_feedback=econtrol", "quant.uplink.eta=0.1"]],
                         ids=["ef21", "econtrol"])
def test_a_dropped_reply_resets_both_copies_of_the_estimate(small_config, feedback):
    # client 1 sends NaN in round 2: the server drops it, though the client has moved its h_1
    cfg = small_config(*SHORT_RUN, "partition.num_clients=3", "quant.uplink.codec=topk",
                       "quant.uplink.fraction=0.05", "faults.nan=[1]", "faults.rounds=[2]", *feedback)
    app = _RecordingRuntime(cfg)
    grid = InProcessGrid(app, cfg.partition.num_clients)
    run = RunDir.create(cfg)
    serve(grid, cfg, run, resume=False, show_progress=False)
    assert [r["num_failed"] for r in run.rows()] == [0, 1, 0, 0]
    assert not torch.isfinite(app.memory[1, 2, "after"]["estimate"]).all()  # the client's copy went bad
    assert app.trained[1] == [1, 2, 3, 4]
    server = _server_estimates(run)
    for pid in range(3):  # after the reset (round 3), both copies agree again and are finite
        client = grid.client_state(pid)[EF_STATE_KEY].to_torch_state_dict()["estimate"]
        assert torch.isfinite(client).all()
        torch.testing.assert_close(client, server[pid], rtol=0, atol=1e-7)
    assert math.isfinite(run.rows()[-1]["centralised_loss"])


def test_error_feedback_memory_is_kept_per_client_across_rounds(small_config):
    cfg = small_config(*SHORT_RUN, "partition.num_clients=3", "rounds=3", "quant.uplink.codec=topk",
                       "quant.uplink.fraction=0.01", "quant.uplink.error_feedback=ef")
    app = _RecordingRuntime(cfg)
    grid = InProcessGrid(app, cfg.partition.num_clients)
    serve(grid, cfg, RunDir.create(cfg), resume=False, show_progress=False)
    for pid in range(3):
        assert app.memory[pid, 1, "before"] == {}
        for rnd in (1, 2, 3):
            error = app.memory[pid, rnd, "after"]["error"]
            assert error.shape == (MLP_DIM,) and torch.count_nonzero(error) > MLP_DIM // 2
        for rnd in (2, 3):
            assert torch.equal(app.memory[pid, rnd, "before"]["error"], app.memory[pid, rnd - 1, "after"]["error"])
    assert not torch.equal(app.memory[0, 3, "after"]["error"], app.memory[1, 3, "after"]["error"])
