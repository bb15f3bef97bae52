"""IFCA (``strategy.name: ifca``): the cluster choice and the per-cluster average pinned against a
plain computation on a tiny run, its rows, its refusals and exact resume."""

import pytest
import torch
from torch.nn import functional as F

from fedsim.algorithms.ifca import CLUSTERS_RECORD, ifca_average, ifca_choice, shuffled_init
from fedsim.clients.quantization import build_codec
from fedsim.config import ConfigError
from fedsim.loops.sync import run_sync
from fedsim.outputs.results import RunDir
from fedsim.params import ParamSpec
from fedsim.records import to_state_dict
from fedsim.runner import run_experiment
from fedsim.seeding import derive_seed, seed_everything
from fedsim.sim.client_app import ClientRuntime
from fedsim.sim.components import federated_data, make_model
from fedsim.sim.inprocess import InProcessGrid

STEPS, LR = 2, 0.05
TINY = ("sim.backend=inprocess", "partition.num_clients=4", "rounds=3", "eval.federated=false",
        "output.plots=false", "model.hidden=[8]", f"client.local_steps={STEPS}", "client.batch_size=100000",
        f"client.lr={LR}", "client.momentum=0", "strategy.name=ifca", "strategy.clusters=3")


def test_the_cluster_of_lowest_loss_is_chosen_and_each_cluster_averages_its_own_updates():
    assert ifca_choice([0.5, 0.2, 0.2, 0.9]) == 1
    models = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    updates = torch.tensor([[1.0, 0.0], [4.0, 2.0], [2.0, 2.0]])
    new = ifca_average(models, updates, torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0, 0, 2]), lr=0.5)
    torch.testing.assert_close(new, torch.tensor([[0.5 * 13 / 4, 0.5 * 6 / 4], [1.0, 1.0], [6.0, 6.0]]))


def test_shuffled_clusters_draw_each_tensors_entries_anew():
    spec = ParamSpec(("a", "b"), ((3,), (2,)))
    initial = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    shuffled = shuffled_init(initial, spec, torch.Generator().manual_seed(0))
    assert sorted(shuffled[:3].tolist()) == [1.0, 2.0, 3.0] and sorted(shuffled[3:].tolist()) == [4.0, 5.0]


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping the (messages, replies) of every training exchange."""

    def __init__(self, runtime, num_nodes):
        super().__init__(runtime, num_nodes)
        self.exchanges = []

    def collect(self, messages, timeout):
        replies = super().collect(messages, timeout)
        if messages and messages[0].metadata.message_type == "train":
            self.exchanges.append((messages, replies))
        return replies


def _plain_sgd(model, state, x, y):
    model.load_state_dict(state)
    model.train()
    for _ in range(STEPS):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ifca_clients_and_server_match_a_plain_computation_over_rounds(small_config):
    cfg = small_config(*TINY)
    seed_everything(cfg.seed)
    grid = RecordingGrid(ClientRuntime(cfg), cfg.partition.num_clients)
    run = RunDir.create(cfg)
    run_sync(grid, cfg, run, resume=False, show_progress=False)
    rows = run.rows()
    data = federated_data(cfg)
    model = make_model(cfg.model, data.train, cfg.seed)
    spec = ParamSpec.of(model)
    codec = build_codec(cfg.quant.uplink)
    exchanges = grid.exchanges
    assert len(exchanges) == 3
    expected_next = None
    for r, (messages, replies) in enumerate(exchanges):
        content = messages[0].content
        models = torch.stack([spec.flatten(to_state_dict(content["arrays"])),
                              *torch.from_numpy(content[CLUSTERS_RECORD]["models"].numpy())])
        if r == 0:  # theta_1 the initial model, the others its shuffled draws
            torch.testing.assert_close(models[0], spec.flatten(model.state_dict()))
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "ifca"))
            torch.testing.assert_close(models[1:], torch.stack([shuffled_init(models[0], spec, generator)
                                                                for _ in range(2)]))
        else:
            torch.testing.assert_close(models, expected_next, atol=1e-5, rtol=1e-4)
        reply_of = {reply.metadata.src_node_id: reply for reply in replies}
        sums, weights, sizes = torch.zeros_like(models), torch.zeros(3, dtype=torch.float64), [0, 0, 0]
        for message in messages:
            pid = int(message.content["config"]["partition-id"])
            train = data.client(pid, r + 1)[0]
            x, y = torch.as_tensor(train.x, dtype=torch.float32), torch.as_tensor(train.y, dtype=torch.long)
            losses = []
            for row in models:
                model.load_state_dict(spec.unflatten(row))
                model.eval()
                with torch.no_grad():
                    losses.append(F.cross_entropy(model(x), y).item())
            choice = min(range(3), key=losses.__getitem__)
            reply = reply_of[message.metadata.dst_node_id].content
            assert int(reply["ifca"]["cluster"]) == choice
            update = spec.flatten(_plain_sgd(model, spec.unflatten(models[choice]), x, y)) - models[choice]
            sent = codec.decode(codec.from_arrays({n: a.numpy() for n, a in reply["update"].items()}))
            torch.testing.assert_close(sent, update, atol=1e-5, rtol=1e-4)
            sums[choice] += len(y) * update
            weights[choice] += len(y)
            sizes[choice] += 1
        assert rows[r]["cluster_sizes"] == sizes
        expected_next = models.clone()
        for j in range(3):
            if weights[j] > 0:
                expected_next[j] = models[j] + sums[j] / float(weights[j])


@pytest.mark.parametrize(("sets", "line"), [
    (("strategy.server_opt.name=momentum",),
     "strategy.server_opt.name: 'momentum' keeps one state for one model; strategy.name 'ifca' steps its 2 cluster "
     "models with sgd"),
    (("personalization.method=ditto",),
     "personalization.method: 'ditto' cannot combine with strategy.name 'ifca'"),
    (("quant.downlink.codec=float16",),
     "quant.downlink.codec: 'float16' compresses one model; strategy.name 'ifca' sends its cluster models in float32"),
    (("hierarchy.num_edges=2",),
     "hierarchy: the cloud averages one model per gateway; strategy.name 'ifca' keeps 2 cluster models at each"),
])
def test_ifca_refuses_what_it_cannot_combine_with_in_one_line(small_config, sets, line):
    with pytest.raises(ConfigError) as err:
        small_config("strategy.name=ifca", *sets)
    assert len(str(err.value).splitlines()) == 1
    assert str(err.value).startswith(line)


def test_a_resumed_ifca_run_ends_exactly_like_an_uninterrupted_one_with_held_out_clients(small_config):
    cfg = small_config(*TINY[:-1], "rounds=4", "output.checkpoint_every=2", "strategy.fraction_train=0.5",
                       "eval.federated=true", "eval.new_clients=0.25")
    reference, _ = run_experiment(cfg)
    interrupted, _ = run_experiment(cfg)
    run = RunDir.open(interrupted)
    (run.checkpoint_dir / "round-00004.pt").unlink()
    assert run.latest_checkpoint().round == 2
    run_experiment(cfg, resume=interrupted)

    def rows(path):
        return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in RunDir.open(path).rows()]

    assert rows(interrupted) == rows(reference)
    assert {"personal_accuracy_mean", "new_personal_accuracy_mean", "cluster_sizes"} <= rows(reference)[-1].keys()
