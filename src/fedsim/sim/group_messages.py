"""Many clients' messages as one Flower message, and their replies as one reply.

Under Ray a Flower message costs a round trip through the simulation engine and a Ray
actor call; with ``sim.clients_per_node: K`` one Flower node serves K partitions, and the
messages the server loop addresses to that node's clients travel together as one *group
message* (:class:`fedsim.sim.ray_nodes.GroupedGrid` packs them; the ClientApp's ``group``
action unpacks them and answers for every client in one reply).

A group message's content holds each distinct record once, however many clients share it
(the global model of a synchronous round is sent once per node, not once per client), and
an index that says, per client, its partition id and which records make up its message.
A group reply holds each client's reply records, or its error, the same way.

Each client's Context state travels with its message and comes back with its reply: the
server's grid keeps the states (:class:`fedsim.sim.client_states.ClientStateStore`, bounded
by ``sim.client_state_mb``), so a node holds none between messages and sends only the
states of the clients a message addresses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from fedsim.strategies.replies import TrainReply, reply_content

GROUP_ACTION = "group"
INDEX_KEY = "group-index"


@dataclass(frozen=True)
class MemberReply:
    """What one client of a group answered: its reply content (a training reply as the client
    built it, :class:`~fedsim.strategies.replies.TrainReply`), or why it has none, and its
    Context state after the message (None where no node answered for it).

    ``code`` is a Flower error code (``flwr.common.constant.ErrorCode``) when ``content`` is None.
    """

    partition_id: int
    content: RecordDict | TrainReply | None
    code: int = 0
    reason: str = ""
    state: RecordDict | None = None


def _pack(contents: Sequence[RecordDict], packed: RecordDict, keys: dict[int, str]) -> list[str]:
    """Each distinct record once under a short key into ``packed`` (``keys``: the key of each
    record packed so far, by identity); per content, ``name=key;name=key``."""
    layouts = []
    for content in contents:
        entries = []
        for name, record in content.items():
            key = keys.get(id(record))
            if key is None:
                key = keys[id(record)] = f"r{len(keys)}"
                packed[key] = record
            entries.append(f"{name}={key}")
        layouts.append(";".join(entries))
    return layouts


def _unpack(packed: RecordDict, layout: str) -> RecordDict:
    content = RecordDict()
    for entry in filter(None, layout.split(";")):
        name, key = entry.split("=", 1)
        content[name] = packed[key]
    return content


def pack_members(message_type: str, members: Sequence[tuple[int, RecordDict, RecordDict]]) -> RecordDict:
    """One group message's content from (partition id, message content, Context state)
    triples of the original ``message_type``."""
    packed, keys = RecordDict(), {}
    layouts = _pack([content for _, content, _ in members], packed, keys)
    state_layouts = _pack([state for _, _, state in members], packed, keys)
    packed[INDEX_KEY] = ConfigRecord({"type": message_type, "partitions": [pid for pid, _, _ in members],
                                      "layouts": layouts, "states": state_layouts})
    return packed


def unpack_members(content: RecordDict) -> tuple[str, list[tuple[int, RecordDict, RecordDict]]]:
    """The original message type and the (partition id, content, state) triples of a group message."""
    index = content[INDEX_KEY]
    members = [(int(pid), _unpack(content, layout), _unpack(content, state))
               for pid, layout, state in zip(index["partitions"], index["layouts"], index["states"], strict=True)]
    return str(index["type"]), members


def pack_replies(replies: Sequence[MemberReply]) -> RecordDict:
    """One group reply's content from the clients' replies (and states)."""
    packed, keys = RecordDict(), {}
    layouts = _pack([reply_content(r.content) if r.content is not None else RecordDict() for r in replies],
                    packed, keys)
    state_layouts = _pack([r.state if r.state is not None else RecordDict() for r in replies], packed, keys)
    packed[INDEX_KEY] = ConfigRecord({"partitions": [r.partition_id for r in replies], "layouts": layouts,
                                      "states": state_layouts, "codes": [r.code for r in replies],
                                      "reasons": [r.reason for r in replies]})
    return packed


def unpack_replies(content: RecordDict) -> list[MemberReply]:
    """The clients' replies of a group reply, each with its state."""
    index = content[INDEX_KEY]
    return [MemberReply(int(pid), None if reason else _unpack(content, layout), int(code), str(reason),
                        _unpack(content, state))
            for pid, layout, state, code, reason in zip(index["partitions"], index["layouts"], index["states"],
                                                         index["codes"], index["reasons"], strict=True)]
