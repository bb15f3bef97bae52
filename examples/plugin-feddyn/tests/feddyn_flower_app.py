"""A plain Flower 1.41 app with FedDyn: the ServerApp runs ``fedsim.flower.FedDyn`` in place
of Flower's FedAvg; the ClientApp is a usual one that adds FedDyn's term to its loss and
keeps its h_i in its Context state with the plug-in's helpers. An MLP on scikit-learn's 8x8
digits, each node on every ``num-partitions``-th training sample, full-batch SGD (so a run is
deterministic given the sampled nodes)."""

import torch
import torch.nn.functional as F
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from sklearn.datasets import load_digits
from torch import nn

from fedsim.flower import (
    ALPHA_KEY,
    DynamicRegulariser,
    FedDyn,
    feddyn_client_step,
    gradient_state,
    keep_gradient_state,
)

NUM_TRAIN = 1400
RUN_CONFIG = {"num-server-rounds": 3, "fraction-train": 1.0, "alpha": 0.01, "lr": 0.5, "local-steps": 20,
              "min-available-nodes": 4}
TRAINED: list[tuple[int, int]] = []  # (round, partition id) of every training call in this process


class Net(nn.Module):
    """A multilayer perceptron for 8x8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    return (x[:NUM_TRAIN], y[:NUM_TRAIN]) if split == "train" else (x[NUM_TRAIN:], y[NUM_TRAIN:])


def partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits("train")
    return x[partition_id::num_partitions], y[partition_id::num_partitions]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Full-batch SGD on L_i(w) - <h_i, w> + alpha/2 ||w - w_global||^2; then h_i -= alpha (w_i - w_global)."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    config = msg.content["config"]
    alpha, pid = config[ALPHA_KEY], int(context.node_config["partition-id"])
    x, y = partition(pid, int(context.node_config["num-partitions"]))
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    h = gradient_state(context.state, start)
    term = DynamicRegulariser(alpha, h, start)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    for _ in range(config["local-steps"]):
        optimizer.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y) + term.extra_loss(model, logits)
        loss.backward()
        optimizer.step()
    keep_gradient_state(context.state, {name: feddyn_client_step(h[name], p.detach() - start[name], alpha)
                                        for name, p in model.named_parameters()})
    TRAINED.append((int(config["server-round"]), pid))
    metrics = MetricRecord({"train_loss": loss.item(), "num-examples": len(y)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = digits("test")
    metrics = MetricRecord({"eval_acc": accuracy(model, x, y), "num-examples": len(y)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def initial_model() -> Net:
    torch.manual_seed(0)
    return Net()


def server_main(grid: Grid, context: Context) -> tuple[FedDyn, ArrayRecord]:
    """The ServerApp's main: FedDyn's rounds; the strategy and the final arrays."""
    config = context.run_config
    # min_available_nodes: Flower's simulation engine may report only some nodes at first
    strategy = FedDyn(fraction_train=config["fraction-train"], min_available_nodes=config["min-available-nodes"],
                      alpha=config["alpha"])
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_model().state_dict()),
                            num_rounds=config["num-server-rounds"],
                            train_config=ConfigRecord({"lr": config["lr"], "local-steps": config["local-steps"]}))
    return strategy, result.arrays
