"""A gossip node's model, kept in its Flower ``Context.state`` between messages.

Each gossip round has two messages per node (``fedsim.loops.gossip`` sends them):

- ``train.gossip``: the node trains the model it holds and replies with the update (through
  the uplink codec; the node then holds ``start + decoded update``, exactly what the
  server and the neighbours see, the error-feedback memory keeping the rest);
- ``train.mix``: the message carries the neighbours' models and the node's row of the
  mixing matrix; the node mixes (the gossip algorithm's client half, plain or
  variance-corrected), keeps the result and replies with it.

The model a node holds is tagged with a version, ``"<round>/train"`` or ``"<round>/mix"``.
Every message states the version the server's copy has; a node whose own differs (a
restarted worker lost its state, a reply went missing) refuses with a one-line error.
The server resends a node its model (an ``arrays`` record) in the first round of a run,
after a resume, and after any failed reply, and the node adopts it.

Source of the variance correction: Y. Tian, Z. Al-Ars, M. Kitsak, P. Hofstee, "Vanishing
Variance Problem in Fully Decentralized Neural-Network Systems", arXiv 2404.04616.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsim.params import ParamSpec
from fedsim.records import to_state_dict

MODEL_KEY = "gossip-model"
VERSION_KEY = "gossip-version"
MIXED_RECORD = "model"


def version(server_round: int, step: str) -> str:
    """The version of a node's model after ``step`` ("train" or "mix") of ``server_round``;
    a run starts from version ``"0/mix"``."""
    return f"{server_round}/{step}"


def weight_layers(spec: ParamSpec) -> list[bool]:
    """Which tensors are weight matrices or kernels (two or more dims): the layers whose
    variance the correction keeps. Biases and normalisation parameters and statistics are
    averaged plainly (the paper's Xavier-initialised biases start at zero variance)."""
    return [len(shape) >= 2 for shape in spec.shapes]


def held_model(content: RecordDict, state: MutableMapping) -> dict[str, torch.Tensor]:
    """The model this node works on: the one the message ``content`` carries (the server
    resends it), else the one in its Context ``state``, which must be the version the
    message names."""
    want = str(content["config"]["gossip-version"])
    if "arrays" in content:
        return to_state_dict(content["arrays"])
    if MODEL_KEY not in state:
        raise RuntimeError(f"gossip node holds no model; the server expects version {want}")
    have = str(state[VERSION_KEY]["version"])
    if have != want:
        raise RuntimeError(f"gossip node holds model version {have}; the server expects {want}")
    return to_state_dict(state[MODEL_KEY])


def keep_model(state: MutableMapping, state_dict: dict[str, torch.Tensor], model_version: str) -> None:
    """Store the node's model and its version in its Context ``state``."""
    state[MODEL_KEY] = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    state[VERSION_KEY] = ConfigRecord({"version": model_version})
