"""Error feedback around an update codec: what each client keeps, what the server does.

``ef = build("ef21", codec)``; each round the client calls ``payload = ef.compress(g)`` on its
update ``g`` (flattened model delta or gradient) and sends ``payload``. The wrapper's memory
(a dict of tensors, all zeros at the start) is ``ef.state_dict()``: keep it in the client's
persistent state and ``load_state_dict`` it at the next round the client takes part in,
however many rounds it skipped. Memory tensors have the update's shape and dtype.

Protocol, per wrapper (``C`` the codec, ``D = codec.decode``)
--------------------------------------------------------------
``"none"``
    client sends ``C(g)``; server uses ``D(payload)`` as the client's update.
``"ef"``
    client keeps ``e``: sends ``p = C(e + g)``, then ``e <- e + g - D(p)``; server uses
    ``D(payload)`` as the client's update.
``"ef21"``
    client keeps ``h``: sends ``c = C(g - h)``, then ``h <- h + D(c)``. The payload is an
    *increment*: the server keeps its own copy ``h_i`` per client, ``h_i <- h_i + D(payload)``,
    and uses ``mean_i h_i`` over all clients (:class:`ServerEstimate`, a running sum) as the
    aggregate.
``"econtrol"``
    client keeps ``e`` and ``h``: sends ``Delta = C(eta e + g - h)``, then
    ``e <- e + g - h - D(Delta)`` and ``h <- h + D(Delta)``; server as for ``"ef21"``.

``wrapper.server_keeps_estimate`` says which case applies. For ``ef21``/``econtrol`` client and
server must start from the same ``h_i = 0`` and apply the same increments: a reply the server
drops after the client updated its memory leaves the two copies apart, so both are reset then
(:meth:`ServerEstimate.reset` on the server; the client's next training message tells it to
clear its memory, :class:`fedsim.clients.quantization.Uplink`).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from fedsim.bounded_store import BoundedStore
from fedsim.quant.codecs import Codec, Payload


class ErrorFeedback(abc.ABC):
    """Base of the wrappers: holds the codec and the client memory.

    Parameters
    ----------
    codec : Codec
        Compressor ``C``; for ``ef``, ``ef21`` and ``econtrol`` a contractive one
        (``E||C(x) - x||^2 <= (1 - delta) ||x||^2``: topk, unscaled randk, sign, qsgd).
    """

    name: ClassVar[str]
    memory_keys: ClassVar[tuple[str, ...]]
    server_keeps_estimate: ClassVar[bool]

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._memory: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(codec={self.codec!r})"

    @abc.abstractmethod
    def _step(self, update: torch.Tensor, generator: torch.Generator | None) -> Payload:
        """Compress ``update`` and advance the memory."""

    def compress(self, update: torch.Tensor, *, generator: torch.Generator | None = None) -> Payload:
        """Client side: the payload to send for ``update``; updates the memory.

        Parameters
        ----------
        update : torch.Tensor
            This round's update ``g`` (any float tensor; memory takes its shape and dtype).
        generator : torch.Generator, optional
            Passed to the codec's ``encode``.
        """
        for key in self.memory_keys:
            memory = self._memory.setdefault(key, torch.zeros_like(update))
            if memory.shape != update.shape:
                raise ValueError(
                    f"error feedback '{self.name}': update has shape {tuple(update.shape)} but memory "
                    f"'{key}' has shape {tuple(memory.shape)}"
                )
        return self._step(update, generator)

    def _decoded(self, payload: Payload, like: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(payload).to(device=like.device, dtype=like.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copy of the memory, ``{}`` before the first :meth:`compress`."""
        return {key: value.clone() for key, value in self._memory.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the memory from :meth:`state_dict` (``{}`` resets it to zeros)."""
        if state and sorted(state) != sorted(self.memory_keys):
            raise ValueError(
                f"error feedback '{self.name}': state has keys {sorted(state)}; "
                f"expected {sorted(self.memory_keys)} or none"
            )
        self._memory = {key: value.clone() for key, value in state.items()}


class NoFeedback(ErrorFeedback):
    """Plain compression, no memory: sends ``C(g)``."""

    name = "none"
    memory_keys = ()
    server_keeps_estimate = False

    def _step(self, update, generator):
        return self.codec.encode(update, generator=generator)


class EF(ErrorFeedback):
    """Error feedback with a memory of what was not sent.

    Seide et al. 2014, "1-Bit Stochastic Gradient Descent and its Application to
    Data-Parallel Distributed Training of Speech DNNs"; Stich et al. 2018, arXiv 1809.07599;
    Karimireddy et al. 2019, arXiv 1901.09847::

        p = C(e + g);    e <- e + g - D(p)

    The server uses ``D(p)`` as the update. Memory: ``{"error": e}``.
    """

    name = "ef"
    memory_keys = ("error",)
    server_keeps_estimate = False

    def _step(self, update, generator):
        corrected = self._memory["error"] + update
        payload = self.codec.encode(corrected, generator=generator)
        self._memory["error"] = corrected - self._decoded(payload, update)
        return payload


class EF21(ErrorFeedback):
    """EF21: compress the change of the update, track it on both ends.

    Richtárik, Sokolov, Fatkhullin 2021, "EF21: A New, Simpler, Theoretically Better, and
    Practically Faster Error Feedback", arXiv 2106.05203::

        c = C(g - h);    h <- h + D(c)

    The server keeps ``h_i <- h_i + D(c_i)`` per client and aggregates ``mean_i h_i``
    (:class:`ServerEstimate`). With partial participation the skipped clients keep their
    ``h_i`` on both ends and still count in the mean (EF21-PP, Fatkhullin et al. 2021, "EF21
    with Bells & Whistles", arXiv 2110.03294). fedsim starts from ``h = 0`` (the paper's
    option ``g_i^0 = C(grad f_i(x^0))``) so every round keeps to the codec's byte count.
    Memory: ``{"estimate": h}``.
    """

    name = "ef21"
    memory_keys = ("estimate",)
    server_keeps_estimate = True

    def _step(self, update, generator):
        estimate = self._memory["estimate"]
        payload = self.codec.encode(update - estimate, generator=generator)
        self._memory["estimate"] = estimate + self._decoded(payload, update)
        return payload


class EControl(ErrorFeedback):
    """EControl: EF21 with a controlled feedback of the accumulated error.

    Gao, Islamov, Stich 2023, "EControl: Fast Distributed Optimization with Compression and
    Error Control", arXiv 2311.05645, Algorithm 1::

        Delta = C(eta e + g - h)
        e <- e + g - h - D(Delta)
        h <- h + D(Delta)

    ``eta = 0`` is EF21; ``eta = 1`` is EF applied to EF21's difference ``g - h``. The server
    side is EF21's (:class:`ServerEstimate`). The paper initializes ``h_i^0 = g_i^0`` (one
    uncompressed round); fedsim starts from ``h = 0`` so every round keeps to the codec's byte
    count. Memory: ``{"error": e, "estimate": h}``.

    ``eta`` must be of the order of the compressor's contraction ``delta`` (``k / d`` for top-k
    and rand-k), which is why it has no default: on distributed least squares (4 workers,
    ``d = 500``, step ``0.1 / L``) with top-1% (``delta = 0.01``), ``eta <= 0.01`` converged and
    ``eta >= 0.02`` did not, while with top-10% every ``eta`` up to 0.2 converged.

    Parameters
    ----------
    codec : Codec
        Contractive compressor ``C``.
    eta : float
        Feedback strength, in [0, 1].
    """

    name = "econtrol"
    memory_keys = ("error", "estimate")
    server_keeps_estimate = True

    def __init__(self, codec: Codec, *, eta: float) -> None:
        if isinstance(eta, bool) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"econtrol.eta: {eta!r} is not in [0, 1]")
        super().__init__(codec)
        self.eta = eta

    def __repr__(self) -> str:
        return f"EControl(codec={self.codec!r}, eta={self.eta})"

    def _step(self, update, generator):
        error, estimate = self._memory["error"], self._memory["estimate"]
        difference = update - estimate
        payload = self.codec.encode(self.eta * error + difference, generator=generator)
        sent = self._decoded(payload, update)
        self._memory["error"] = error + difference - sent
        self._memory["estimate"] = estimate + sent
        return payload


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.element_size() * tensor.nelement()


class ServerEstimate:
    """Server side of EF21 and EControl: every client's estimate ``h_i`` and their weighted mean.

    ``update(i, D(payload_i), weight=w_i)`` adds a client's decoded increment,
    ``h_i <- h_i + D(payload_i)`` (``h_i`` starts at zero), and sets its weight ``w_i`` (e.g. its
    number of examples); ``mean()`` is the aggregate ``sum_i w_i h_i / sum_i w_i`` over every
    client seen so far, those skipped this round included with their last ``h_i`` (EF21-PP,
    Fatkhullin et al. 2021, "EF21 with Bells & Whistles", arXiv 2110.03294).

    The mean is kept as a running sum ``S = sum_i w_i h_i`` (float64) and ``W = sum_i w_i``,
    changed by each update, ``S <- S + w_i' h_i' - w_i h_i``, and each reset,
    ``S <- S - w_i h_i``: a round costs O(model) in memory and time however many clients the
    server has seen. Each ``h_i`` is kept in a :class:`fedsim.bounded_store.BoundedStore`
    (``max_bytes`` in memory, the least recently used beyond it under ``spill_dir``): it is
    read when its client sends an increment or is reset, and by an aggregation rule that
    needs every ``h_i`` (:meth:`items`).

    Parameters
    ----------
    max_bytes : int or None, default None
        The most bytes of estimates held in memory (None: no bound).
    spill_dir : Path or None, default None
        Where the estimates beyond ``max_bytes`` are written, one file per client.
    checkpoint_dir : Path or None, default None
        Where :meth:`state_dict` writes the estimates changed since its previous call (one
        file per client; its state names every client's latest file); None: the state holds
        every estimate itself.
    """

    def __init__(self, max_bytes: int | None = None, spill_dir: Path | None = None,
                 checkpoint_dir: Path | None = None) -> None:
        self._store = BoundedStore(0 if max_bytes is None else max_bytes,
                                   None if max_bytes is None else spill_dir, _nbytes)
        self.checkpoint_dir = checkpoint_dir
        self._weights: dict[int, float] = {}
        self._total_weight = 0.0
        self._sum: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None
        self._saves = 0

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, client_id: int) -> bool:
        return int(client_id) in self._weights

    def estimate(self, client_id: int) -> torch.Tensor | None:
        """Client ``client_id``'s estimate ``h_i`` (None before its first increment)."""
        return self._store.get(int(client_id))

    def weight(self, client_id: int) -> float:
        """Client ``client_id``'s weight ``w_i``."""
        return self._weights[int(client_id)]

    def items(self) -> Iterator[tuple[int, float, torch.Tensor]]:
        """(client id, weight w_i, estimate h_i) of every client seen, by client id; spilled
        estimates are read from their files one at a time."""
        for key, estimate in self._store.items():
            yield key, self._weights[key], estimate

    def update(self, client_id: int, increment: torch.Tensor, weight: float = 1.0) -> None:
        """Add ``increment`` to client ``client_id``'s estimate and make ``weight`` its weight."""
        key = int(client_id)
        current = self._store.get(key)
        if current is not None and current.shape != increment.shape:
            raise ValueError(
                f"ServerEstimate: increment of client {key} has shape {tuple(increment.shape)}; "
                f"its estimate has shape {tuple(current.shape)}"
            )
        estimate = increment.clone() if current is None else current + increment
        if self._sum is None:
            self._sum = torch.zeros(increment.shape, dtype=torch.float64, device=increment.device)
            self._dtype = increment.dtype
        self._sum += float(weight) * estimate.double()
        if current is not None:
            self._sum -= self._weights[key] * current.double()
        self._total_weight += float(weight) - self._weights.get(key, 0.0)
        self._weights[key] = float(weight)
        self._store.put(key, estimate)
        self._store.trim()

    def reset(self, client_id: int) -> None:
        """Forget client ``client_id``'s estimate (``h_i <- 0``; it re-enters with its next
        increment): the server's half of resynchronising after a dropped reply."""
        key = int(client_id)
        estimate = self._store.pop(key)
        if estimate is None:
            return
        weight = self._weights.pop(key)
        self._sum -= weight * estimate.double()
        self._total_weight -= weight
        if not self._weights:  # nothing left: no rounding residue either
            self._sum.zero_()
            self._total_weight = 0.0

    def clear(self) -> None:
        """Forget every estimate (both copies start again from zero)."""
        self._store.clear()
        self._weights.clear()
        self._total_weight = 0.0
        if self._sum is not None:
            self._sum.zero_()

    def mean(self) -> torch.Tensor:
        """The weighted mean ``S / W`` of the estimates of all clients seen."""
        if not self._weights:
            raise ValueError("ServerEstimate.mean: no client has sent an increment yet")
        if self._total_weight <= 0:
            raise ValueError(f"ServerEstimate.mean: weights sum to {self._total_weight}; need a positive sum")
        return (self._sum / self._total_weight).to(self._dtype)

    def state_dict(self) -> dict[str, Any]:
        """The running sum, the weights and the estimates: under ``checkpoint_dir`` the names of
        their files (those changed since the previous call written now), else the tensors."""
        state: dict[str, Any] = {"sum": None if self._sum is None else self._sum.clone(), "dtype": self._dtype,
                                 "weights": dict(self._weights), "total_weight": self._total_weight}
        if self.checkpoint_dir is None:
            state["estimates"] = {key: estimate.clone() for key, estimate in self._store.items()}
        else:
            self._saves += 1
            state["files"] = self._store.save(self.checkpoint_dir, self._saves)
            state["saves"] = self._saves
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self._sum = None if state["sum"] is None else state["sum"].clone()
        self._dtype = state["dtype"]
        self._weights = dict(state["weights"])
        self._total_weight = state["total_weight"]
        if "files" in state:
            self._store.load(state["files"], self.checkpoint_dir)
            self._saves = state["saves"]
        else:
            self._store.clear()
            for key, estimate in state["estimates"].items():
                self._store.put(key, estimate.clone())
            self._store.trim()


WRAPPERS: dict[str, type[ErrorFeedback]] = {w.name: w for w in (NoFeedback, EF, EF21, EControl)}


def build(name: str, codec: Codec, **kw) -> ErrorFeedback:
    """Build an error-feedback wrapper by name.

    Parameters
    ----------
    name : str
        ``none``, ``ef``, ``ef21`` or ``econtrol``.
    codec : Codec
        The compressor (:func:`fedsim.quant.codecs.build`).
    **kw
        ``econtrol``: ``eta`` (required). The others take no options.
    """
    if name not in WRAPPERS:
        raise ValueError(f"error_feedback: {name!r} is not an error-feedback method; known: {', '.join(WRAPPERS)}")
    allowed = ("eta",) if name == "econtrol" else ()
    if name == "econtrol" and "eta" not in kw:
        raise ValueError(
            "error_feedback 'econtrol': needs eta, of the order of the codec's delta (k/d for topk, randk)"
        )
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(
            f"error_feedback '{name}': unknown option(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}"
        )
    return WRAPPERS[name](codec, **kw)
