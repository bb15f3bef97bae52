"""Deployed secure aggregation's steps as Flower messages, in one process: the clients' half
(:mod:`fedsim.clients.secagg_steps`) answered by fedsim's ClientRuntime, the server's half
(:mod:`fedsim.loops.secagg_messages`) driving it, against the simulated protocol of the same run.
The same on a real SuperLink and SuperNodes: tests/deploy/test_deploy_secagg.py."""

import logging
from pathlib import Path

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from flwr.app import ConfigRecord

from fedsim.clients import secagg_steps
from fedsim.config import ConfigError, load_config
from fedsim.deploy import check_deployable
from fedsim.loops.secagg_messages import DeployedSecureAggregation
from fedsim.loops.skeleton import run_steps
from fedsim.loops.sync import SyncSteps
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment
from fedsim.sim.client_app import ClientRuntime
from fedsim.sim.inprocess import InProcessGrid

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
SMALL = ("sim.backend=inprocess", "partition.num_clients=4", "output.plots=false", "eval.federated=false",
         "client.local_steps=3", "secagg.enabled=true")


def _rows(path):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in RunDir.open(path).rows()]


class _Spy(InProcessGrid):
    """An in-process grid that keeps every reply the server receives, with its message type."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = []

    def answer(self, msg, reply):
        super().answer(msg, reply)
        self.replies.append((msg.metadata.message_type, reply.content))


def _deployed(cfg):
    """``cfg`` run with the clients' steps as messages (what ``fedsim deploy`` runs on SuperNodes)."""
    grid = _Spy(ClientRuntime(cfg), cfg.partition.num_clients)
    steps = SyncSteps(grid, cfg)
    engine = steps.strategy.engine
    engine.secagg = DeployedSecureAggregation(cfg, grid, engine.node_of, steps.setup.spec.dim)
    run = RunDir.create(cfg)
    run_steps(steps, grid, cfg, run, False, False)
    return run.path, grid


@pytest.mark.parametrize("sets", [[], ["faults.drop_after_keys=[1]", "faults.rounds=[2]"],
                                  ["strategy.name=fednova", "secagg.out_of_range=withhold", "secagg.value_range=0.08"]])
def test_clients_running_their_own_steps_give_the_simulations_rows(tmp_path, sets):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *SMALL, "rounds=2", *sets])
    deployed, _ = _deployed(cfg)
    assert _rows(deployed) == _rows(run_experiment(cfg)[0])


def test_a_client_dropped_after_sharing_its_keys_is_recovered_and_two_refuse_the_round(tmp_path, caplog):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *SMALL, "rounds=2", "faults.drop_after_keys=[1,2]",
                                   "faults.rounds=[2]"])
    with caplog.at_level(logging.WARNING):
        deployed, _ = _deployed(cfg)
    rows = _rows(deployed)
    assert [row["skipped"] for row in rows] == [False, True]
    # 4 clients, 3 neighbours each: 2 shares rebuild a secret; two dropped leave the others 1 holder
    assert ("round 2 refused: secure aggregation cannot unmask: client 0 sent its input and 1 of its 3 neighbours "
            "replied; 2 shares rebuild its masks (secagg.threshold 0.5)") in caplog.messages
    assert rows == _rows(run_experiment(cfg)[0])


def test_the_server_receives_keys_sealed_shares_and_masked_inputs_only(tmp_path):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *SMALL, "rounds=1"])
    _, grid = _deployed(cfg)
    by_type = {}
    for kind, content in grid.replies:
        by_type.setdefault(kind, []).append(content)
    assert all("update" not in content for content in by_type["train"])  # keys and metrics, no update
    assert all(len(e) == 12 + 2 * 38 + 16 for c in by_type[secagg_steps.SHARE] for e in c["secagg"]["envelopes"])
    # a masked input looks uniform on [0, 2^32): the quantised levels (below 2^20) do not show through
    masked = [c["masked"]["masked"].numpy() for c in by_type[secagg_steps.INPUT]]
    assert len(masked) == 4 and all(v.dtype == np.uint32 and (v >= 2**20).mean() > 0.99 for v in masked)


def test_a_sealed_share_opens_only_for_its_addressee():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from fedsim.secagg.masks import public_bytes

    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    envelope = secagg_steps.seal(a.private_bytes_raw(), public_bytes(b), b"1/0/1", b"share")
    assert secagg_steps.open_sealed(b.private_bytes_raw(), public_bytes(a), b"1/0/1", envelope) == b"share"
    with pytest.raises(InvalidTag):
        secagg_steps.open_sealed(c.private_bytes_raw(), public_bytes(a), b"1/0/1", envelope)
    with pytest.raises(InvalidTag):  # sent to another client, or in another round
        secagg_steps.open_sealed(b.private_bytes_raw(), public_bytes(a), b"1/0/2", envelope)


def test_a_client_reveals_one_share_per_neighbour():
    state = {}
    record = ConfigRecord({"round": 3, "mask-key": b"k" * 32, "channel-key": b"c" * 32, "self-seed": b"s" * 32})
    state["secagg-keys"] = record
    state["secagg-held"] = ConfigRecord({"owners": [1, 2], "key-shares": [b"K1", b"K2"], "seed-shares": [b"S1", b"S2"]})
    state["secagg-peers"] = ConfigRecord({"ids": [1, 2]})
    reply = secagg_steps.unmask(state, ConfigRecord({"round": 3, "dropped": [2]}))
    assert list(reply["secagg"]["shares"]) == [b"S1", b"K2"] and state == {}


def test_deployment_takes_secure_aggregation_and_refuses_server_side_attacks():
    assert check_deployable(load_config(QUICKSTART, ["secagg.enabled=true"])).secagg.enabled
    with pytest.raises(ConfigError, match="^attack.name: 'sign_flip' replaces updates on the server, and with "
                                          "secagg.enabled a deployed server sees none"):
        check_deployable(load_config(QUICKSTART, ["secagg.enabled=true", "attack.name=sign_flip",
                                                  "attack.fraction=0.2"]))
    with pytest.raises(ConfigError, match="^hierarchy: its gateways' secure aggregation runs every party's step in "
                                          "the server's process"):
        check_deployable(load_config(QUICKSTART, ["secagg.enabled=true", "hierarchy.num_edges=2"]))
    with pytest.raises(ConfigError, match="^strategy.name: 'scaffold' sends records of its own beside the update"):
        check_deployable(load_config(QUICKSTART, ["secagg.enabled=true", "strategy.name=scaffold"]))
    assert check_deployable(load_config(QUICKSTART, ["strategy.name=scaffold"])).strategy.name == "scaffold"


def test_drop_after_keys_without_secure_aggregation_is_refused():
    with pytest.raises(ConfigError, match="faults.drop_after_keys: clients drop in secure aggregation's protocol, "
                                          "and secagg.enabled is false"):
        load_config(QUICKSTART, ["faults.drop_after_keys=[1]"])


def test_deployed_distributed_dp_is_accounted_as_simulated_with_noise_the_server_cannot_draw(tmp_path):
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path}", *SMALL, "rounds=2", "secagg.value_range=4",
                                   "privacy.mechanism=central", "privacy.noise_multiplier=1.0",
                                   "privacy.clip_norm=0.5"])
    deployed, simulated = _rows(_deployed(cfg)[0]), _rows(run_experiment(cfg)[0])
    assert [r["epsilon"] for r in deployed] == [r["epsilon"] for r in simulated]
    assert [r["secagg_out_of_range"] for r in deployed] == [0, 0]
    # the clients' noise shares come from the operating system, not from the run's seed
    assert deployed[-1]["centralised_loss"] != simulated[-1]["centralised_loss"]
