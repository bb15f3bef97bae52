"""A minimal Flower app (the anchor of benchmarks/deploy_overhead.py).

The quickstart's work, written as Flower's examples write it: an MLP (64-128-10) trained
with SGD for ``local-epochs`` on the node's partition, FedAvg over all nodes, every node
evaluating the global model on its test split, and a centralised evaluation on the held-out
test set after each round. The partitions are fedsim's, read from ``data-dir`` (written by
the benchmark), so both apps do the same work; the ServerApp appends
``round time accuracy`` to ``stamps`` after each round's centralised evaluation.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

client_app = ClientApp()
server_app = ServerApp()


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        labels = torch.from_numpy(y)
        loss = nn.functional.cross_entropy(logits, labels).item()
        return loss, (logits.argmax(1) == labels).float().mean().item()


def received(msg: Message, context: Context) -> tuple[dict[str, np.ndarray], nn.Module]:
    """The node's partition, and the model the message carries."""
    torch.set_num_threads(1)
    pid = int(context.node_config["partition-id"])
    with np.load(Path(str(context.run_config["data-dir"])) / f"client-{pid}.npz") as arrays:
        data = dict(arrays)
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return data, model


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    data, model = received(msg, context)
    optimizer = torch.optim.SGD(model.parameters(), lr=float(context.run_config["lr"]),
                                momentum=float(context.run_config["momentum"]))
    x, y = torch.from_numpy(data["train_x"]), torch.from_numpy(data["train_y"])
    batch = int(context.run_config["batch-size"])
    generator = torch.Generator().manual_seed(int(msg.content["config"]["server-round"]))
    for _ in range(int(context.run_config["local-epochs"])):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    data, model = received(msg, context)
    loss, accuracy = evaluate(model, data["test_x"], data["test_y"])
    metrics = MetricRecord({"num-examples": len(data["test_y"]), "eval_loss": loss, "eval_accuracy": accuracy})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    with np.load(Path(str(config["data-dir"])) / "server.npz") as arrays:
        test_x, test_y = arrays["test_x"], arrays["test_y"]
    model = make_model()
    stamps = Path(str(config["stamps"]))

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, test_x, test_y)
        with stamps.open("a") as f:
            f.write(f"{server_round} {time.time()} {accuracy}\n")
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    nodes = int(config["num-nodes"])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=nodes,
                      min_train_nodes=nodes, min_evaluate_nodes=nodes)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                   num_rounds=int(config["num-rounds"]), evaluate_fn=central)
