"""fedsim's server optimizers against Flower's FedAdam, FedYogi and FedAdagrad.

Flower's strategies are driven as its ServerApp drives them (``configure_train`` then
``aggregate_train`` on two reply Messages per round, for 3 rounds); fedsim's
:class:`ServerOptimizer` takes the same aggregated update, the clients' mean minus the global
model, computed as Flower computes it. With Flower's hyper-parameters (FedAdam's bias
correction included) the new global models agree to float precision.
"""

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedYogi

from fedsim.algorithms.api import ServerOptConfig
from fedsim.sim.inprocess import InProcessGrid
from fedsim.strategies.server_opt import ServerOptimizer

SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,)}
ROUNDS = 3

# Flower's defaults (flwr/serverapp/strategy/fedadam.py, fedyogi.py, fedadagrad.py), and the
# fedsim settings that equal them
PAIRS = {
    "FedAdam": (FedAdam, ServerOptConfig(name="adam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3, bias_correction=True)),
    "FedYogi": (FedYogi, ServerOptConfig(name="yogi", lr=0.01, beta1=0.9, beta2=0.99, eps=1e-3)),
    "FedAdagrad": (FedAdagrad, ServerOptConfig(name="adagrad", lr=0.1, beta1=0.0, eps=1e-3)),
}


def _reply(node: int, arrays: dict[str, np.ndarray]) -> Message:
    metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                        group_id="", created_at=0.0, ttl=100.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": 10})})
    return Message(metadata=metadata, content=content)


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k]).ravel() for k in SHAPES])


def _run_both(flower_strategy, cfg: ServerOptConfig, dtype) -> list[tuple[np.ndarray, np.ndarray]]:
    """(Flower's new global, fedsim's new global) after each of ``ROUNDS`` rounds."""
    rng = np.random.default_rng(0)
    flower = {k: rng.normal(size=shape).astype(dtype) for k, shape in SHAPES.items()}
    ours = torch.from_numpy(_flat(flower))
    opt = ServerOptimizer(cfg)
    grid = InProcessGrid(runtime=None, num_partitions=2)  # its nodes are never called: replies are built here
    results = []
    for server_round in range(1, ROUNDS + 1):
        list(flower_strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in flower.items()}),
                                             ConfigRecord(), grid))
        clients = [{k: (v + rng.normal(scale=0.3, size=v.shape)).astype(v.dtype) for k, v in flower.items()}
                   for _ in range(2)]
        new, _ = flower_strategy.aggregate_train(server_round, [_reply(n, c) for n, c in enumerate(clients, 1)])
        flower = {k: a.numpy() for k, a in new.items()}
        mean = _flat(clients[0]) * 0.5 + _flat(clients[1]) * 0.5  # Flower's weighted mean, equal weights
        ours = opt.step(ours, torch.from_numpy(mean).to(ours.dtype) - ours)
        results.append((_flat(flower), ours.numpy()))
    return results


@pytest.mark.parametrize("name", PAIRS)
def test_server_optimizer_equals_flowers_strategy_over_three_rounds_in_float64(name):
    strategy, cfg = PAIRS[name]
    for flower, ours in _run_both(strategy(), cfg, np.float64):
        np.testing.assert_allclose(ours, flower, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", PAIRS)
def test_server_optimizer_equals_flowers_strategy_over_three_rounds_in_float32(name):
    """Flower's FedAdam turns float32 models into float64 (its corrected rate is a numpy
    float64); fedsim stays in float32: equal to float32 precision."""
    strategy, cfg = PAIRS[name]
    for flower, ours in _run_both(strategy(), cfg, np.float32):
        np.testing.assert_allclose(ours, flower, rtol=1e-6, atol=1e-7)


def test_fedadam_without_bias_correction_is_not_flowers():
    """The first step differs by Flower's factor sqrt(1 - b2^2) / (1 - b1^2) = 0.743."""
    plain_cfg = PAIRS["FedAdam"][1].model_copy(update={"bias_correction": False})
    rng = np.random.default_rng(0)
    start = _flat({k: rng.normal(size=shape) for k, shape in SHAPES.items()})  # _run_both's first global
    (flower, corrected), *_ = _run_both(FedAdam(), PAIRS["FedAdam"][1], np.float64)
    (_, plain), *_ = _run_both(FedAdam(), plain_cfg, np.float64)
    assert not np.allclose(plain, flower)
    np.testing.assert_allclose(corrected - start, (plain - start) * np.sqrt(1 - 0.99**2) / (1 - 0.9**2), rtol=1e-12)


def test_bias_correction_resumes_from_the_step_count_of_the_checkpoint():
    cfg = PAIRS["FedAdam"][1]
    deltas = [torch.randn(5, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3)]
    straight, x = ServerOptimizer(cfg), torch.zeros(5, dtype=torch.float64)
    for delta in deltas:
        x = straight.step(x, delta)
    first, y = ServerOptimizer(cfg), torch.zeros(5, dtype=torch.float64)
    y = first.step(y, deltas[0])
    resumed = ServerOptimizer(cfg)
    resumed.load_state_dict(first.state_dict())
    for delta in deltas[1:]:
        y = resumed.step(y, delta)
    assert resumed.steps == 3 and torch.equal(x, y)


def test_flowers_defaults_are_as_fedsims_docstring_states_them():
    adam, yogi, adagrad = FedAdam(), FedYogi(), FedAdagrad()
    assert (adam.eta, adam.eta_l, adam.beta_1, adam.beta_2, adam.tau) == (0.1, 0.1, 0.9, 0.99, 1e-3)
    assert (yogi.eta, yogi.eta_l, yogi.beta_1, yogi.beta_2, yogi.tau) == (0.01, 0.0316, 0.9, 0.99, 1e-3)
    assert (adagrad.eta, adagrad.eta_l, adagrad.beta_1, adagrad.tau) == (0.1, 0.1, 0.0, 1e-3)
    defaults = ServerOptConfig()
    assert ServerOptConfig.SERVER_LR == {"sgd": 1.0, "momentum": 1.0, "adam": 0.01, "yogi": 0.01, "adagrad": 0.1}
    assert (defaults.beta1, defaults.beta2, defaults.eps, defaults.bias_correction) == (0.9, 0.99, 1e-3, False)
