"""Update codecs for client-to-server traffic, each reporting its exact size on the wire.

``codec = build("qsgd", bits=4)``; ``payload = codec.encode(x)``; ``x_hat = codec.decode(payload)``.
Codecs take float tensors of any shape (normally the flattened model update) and work on their
flattened values; ``decode`` returns a float32 CPU tensor of the original shape.

Wire format and byte count
--------------------------
``payload.nbytes`` is the size of the message as it would travel::

    header = codec id (1 byte) + ndim (1 byte) + each dimension as uint32 (4 bytes per dim)
    body   = the codec's arrays, raw, in the order of ``codec.fields``

so a flat update of ``d`` values carries a 6-byte header. Codec parameters (bits, block size,
fraction) are not sent: both ends build the codec from the same run configuration, and the
lengths of the arrays follow from the shape. ``payload.to_arrays()`` gives the same content as
a ``dict[str, np.ndarray]`` (the shape under ``"shape"``) for a Flower ``ArrayRecord``;
``codec.from_arrays`` checks every array's dtype and length before accepting it.

======== ============================== ========== ======== =====================================
name     body bytes, d values           stochastic unbiased error bound, e = decode(encode(x)) - x
======== ============================== ========== ======== =====================================
identity 4 d                            no         yes      e = 0
float16  2 d                            no         no       |e_i| <= 2^-11 |x_i| for |x_i| in
                                                            [2^-14, 65504]; 2^-25 below
qsgd     ceil(d b / 8) + 4 ceil(d / B)  yes        yes      |e_i| < max|x_block| / (2^(b-1) - 1)
topk     6 k (d <= 65536), else 8 k     no         no       ||e||^2 <= (1 - k/d) ||x||^2
randk    4 k + 8                        yes        option   E||e||^2 = (1 - k/d) ||x||^2, or
                                                            (d/k - 1) ||x||^2 when unbiased
sign     ceil(d / 8) + 4                no         no       ||e||^2 = ||x||^2 - ||x||_1^2 / d
======== ============================== ========== ======== =====================================
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.quant.fake import check_choice, stochastic_round

QSGD_BITS = (2, 4, 8)


def header_nbytes(ndim: int) -> int:
    """Bytes of the header: codec id, ndim, and a uint32 per dimension."""
    return 2 + 4 * ndim


@dataclass(frozen=True, eq=False)
class Payload:
    """An encoded tensor: what a client sends.

    Parameters
    ----------
    codec : str
        Name of the codec that made it.
    shape : tuple of int
        Shape of the encoded tensor.
    arrays : dict of str to np.ndarray
        The body, one flat array per field of the codec.
    """

    codec: str
    shape: tuple[int, ...]
    arrays: dict[str, np.ndarray]

    @functools.cached_property
    def nbytes(self) -> int:
        """Exact size on the wire: header plus every array's bytes."""
        return header_nbytes(len(self.shape)) + sum(a.nbytes for a in self.arrays.values())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The payload as numpy arrays: the shape (uint32) under ``"shape"``, then the body."""
        return {"shape": np.asarray(self.shape, dtype=np.uint32), **self.arrays}


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes (``bits`` divides 8) into bytes, lowest bits first."""
    per_byte = 8 // bits
    padded = np.zeros(-(-codes.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: codes.size] = codes
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack`: the first ``count`` codes."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    codes = (packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(-1)[:count]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _to_float32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32))


class Codec(abc.ABC):
    """Base of the codecs: validation, flattening and the wire layout.

    Subclasses set ``name``, ``fields``, ``stochastic`` and ``unbiased`` and implement
    ``layout(d)``, ``_encode`` and ``_decode``.
    """

    name: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]
    stochastic: ClassVar[bool]
    unbiased: ClassVar[bool]

    @abc.abstractmethod
    def layout(self, d: int) -> dict[str, tuple[type, int]]:
        """``{field: (numpy dtype, length)}`` of the body for ``d`` values."""

    @abc.abstractmethod
    def _encode(self, flat: torch.Tensor, generator: torch.Generator | None) -> dict[str, np.ndarray]:
        """Body arrays for a flat float32 tensor."""

    @abc.abstractmethod
    def _decode(self, arrays: Mapping[str, np.ndarray], d: int) -> torch.Tensor:
        """Flat float32 tensor of ``d`` values from the body arrays."""

    def payload_nbytes(self, shape: tuple[int, ...]) -> int:
        """Size on the wire of any payload of a tensor of this ``shape``, without encoding."""
        body = self.layout(math.prod(shape))
        return header_nbytes(len(shape)) + sum(np.dtype(dt).itemsize * n for dt, n in body.values())

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Payload:
        """Encode a float tensor.

        Parameters
        ----------
        x : torch.Tensor
            Float tensor, any shape, at least one value.
        generator : torch.Generator, optional
            Randomness of stochastic codecs (torch's global generator if ``None``); for
            ``qsgd`` it must live on ``x``'s device, for ``randk`` on the CPU.
        """
        if not x.is_floating_point():
            raise ValueError(f"codec '{self.name}': needs a floating-point tensor; got dtype {x.dtype}")
        if not 0 < x.numel() < 2**32 or x.dim() > 255:
            raise ValueError(
                f"codec '{self.name}': cannot encode a tensor of shape {tuple(x.shape)} "
                "(needs 1 to 2^32 - 1 values and at most 255 dimensions)"
            )
        flat = x.detach().reshape(-1).to(torch.float32)
        return Payload(self.name, tuple(x.shape), self._encode(flat, generator))

    def decode(self, payload: Payload) -> torch.Tensor:
        """Decode a payload into a float32 CPU tensor of the encoded shape."""
        if payload.codec != self.name:
            raise ValueError(f"codec '{self.name}': cannot decode a '{payload.codec}' payload")
        return self._decode(payload.arrays, math.prod(payload.shape)).reshape(payload.shape)

    def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Payload:
        """Rebuild a payload from :meth:`Payload.to_arrays` output, checking every array."""
        expected = ("shape", *self.fields)
        if sorted(arrays) != sorted(expected):
            raise ValueError(f"codec '{self.name}': got arrays {sorted(arrays)}; expected {sorted(expected)}")
        shape_array = np.asarray(arrays["shape"])
        if shape_array.ndim != 1 or shape_array.dtype != np.uint32:
            raise ValueError(
                f"codec '{self.name}': 'shape' must be a 1-D uint32 array; got dtype {shape_array.dtype}, "
                f"{shape_array.ndim} dimensions"
            )
        shape = tuple(int(n) for n in shape_array)
        body = {}
        for field, (dtype, length) in self.layout(math.prod(shape)).items():
            array = np.asarray(arrays[field]).reshape(-1)
            if array.dtype != dtype or array.size != length:
                raise ValueError(
                    f"codec '{self.name}': array '{field}' has dtype {array.dtype} and {array.size} entries; "
                    f"expected {np.dtype(dtype)} and {length} for shape {shape}"
                )
            body[field] = array
        return Payload(self.name, shape, body)


@dataclass(frozen=True)
class Identity(Codec):
    """No compression: float32 values. Exact."""

    name = "identity"
    fields = ("values",)
    stochastic = False
    unbiased = True

    def layout(self, d: int) -> dict[str, tuple[type, int]]:
        return {"values": (np.float32, d)}

    def _encode(self, flat, generator):
        return {"values": _to_numpy(flat)}

    def _decode(self, arrays, d):
        return _to_float32(arrays["values"])


@dataclass(frozen=True)
class Float16(Codec):
    """IEEE half precision, round to nearest even.

    Error ``|e_i| <= 2^-11 |x_i|`` for ``|x_i|`` in the normal range ``[2^-14, 65504]``,
    at most ``2^-25`` below it; values beyond 65504 become infinite.
    """

    name = "float16"
    fields = ("values",)
    stochastic = False
    unbiased = False

    def layout(self, d: int) -> dict[str, tuple[type, int]]:
        return {"values": (np.float16, d)}

    def _encode(self, flat, generator):
        return {"values": _to_numpy(flat.to(torch.float16))}

    def _decode(self, arrays, d):
        return _to_float32(arrays["values"])


@dataclass(frozen=True)
class QSGD(Codec):
    """Stochastic quantization to ``b`` bits with one scale per block (QSGD).

    Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization and
    Encoding", arXiv 1610.02132, in its bucketed form with max-norm scaling. For each block
    ``v`` of ``block_size`` values, with ``s = 2^(b-1) - 1`` levels each side of zero::

        code_i = SR(v_i * s / max|v|)  in [-s, s]       (SR: unbiased stochastic rounding)
        v_hat_i = code_i * max|v| / s

    ``E[v_hat] = v`` and ``|v_hat_i - v_i| < max|v| / s``. Codes travel as ``b``-bit offset
    binary (``code + 2^(b-1)``), ``8 / b`` per byte; scales as float32, one per block.

    Parameters
    ----------
    bits : int, default 8
        Bits per value: 8, 4 or 2.
    block_size : int, default 256
        Values sharing one scale.
    """

    bits: int = 8
    block_size: int = 256

    name = "qsgd"
    fields = ("codes", "scales")
    stochastic = True
    unbiased = True

    def __post_init__(self) -> None:
        check_choice("qsgd.bits", self.bits, QSGD_BITS)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"qsgd.block_size: {self.block_size!r} is not a positive integer")

    @property
    def levels(self) -> int:
        """Quantization levels each side of zero, ``2^(b-1) - 1``."""
        return 2 ** (self.bits - 1) - 1

    def layout(self, d: int) -> dict[str, tuple[type, int]]:
        return {"codes": (np.uint8, -(-d * self.bits // 8)), "scales": (np.float32, -(-d // self.block_size))}

    def _encode(self, flat, generator):
        d = flat.numel()
        blocks = F.pad(flat, (0, -d % self.block_size)).view(-1, self.block_size)
        scales = blocks.abs().amax(dim=1)
        inverse = torch.where(scales > 0, self.levels / scales, torch.zeros_like(scales))
        scaled = torch.clamp(blocks * inverse[:, None], -self.levels, self.levels)
        codes = stochastic_round(scaled, generator) + 2 ** (self.bits - 1)
        codes = codes.reshape(-1)[:d].to(torch.uint8)
        return {"codes": _pack(_to_numpy(codes), self.bits), "scales": _to_numpy(scales)}

    def _decode(self, arrays, d):
        codes = _unpack(arrays["codes"], self.bits, d).astype(np.float32) - 2 ** (self.bits - 1)
        steps = _to_float32(arrays["scales"]) / self.levels
        return torch.from_numpy(codes) * steps.repeat_interleave(self.block_size)[:d]


def _check_sparsity(name: str, fraction: float | None, k: int | None) -> None:
    if (fraction is None) == (k is None):
        raise ValueError(f"{name}: give exactly one of fraction or k; got fraction={fraction!r}, k={k!r}")
    if fraction is not None and (isinstance(fraction, bool) or not 0.0 < fraction <= 1.0):
        raise ValueError(f"{name}.fraction: {fraction!r} is not in (0, 1]")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{name}.k: {k!r} is not a positive integer")


def _kept(fraction: float | None, k: int | None, d: int) -> int:
    """Values kept out of ``d``: ``min(k, d)``, or ``max(1, round(fraction * d))``."""
    return min(k, d) if k is not None else max(1, round(fraction * d))


def index_dtype(d: int) -> type:
    """The narrowest unsigned integer type that holds every index of ``d`` values."""
    return np.uint16 if d <= 2**16 else np.uint32


@dataclass(frozen=True)
class TopK(Codec):
    """Top-k sparsification: the ``k`` largest-magnitude values and their indices.

    Stich et al. 2018, "Sparsified SGD with Memory", arXiv 1809.07599. Contractive:
    ``||x - top_k(x)||^2 <= (1 - k/d) ||x||^2``; the kept values are exact. Indices travel in
    increasing order as uint16 when every index fits (``d <= 65536``), else as uint32; values
    as float32: ``6 k`` or ``8 k`` bytes.

    Parameters
    ----------
    fraction : float, optional
        Share of values kept, in (0, 1]: ``k = max(1, round(fraction * d))``.
    k : int, optional
        Number of values kept (capped at ``d``). Give exactly one of ``fraction`` and ``k``.
    """

    fraction: float | None = None
    k: int | None = None

    name = "topk"
    fields = ("indices", "values")
    stochastic = False
    unbiased = False

    def __post_init__(self) -> None:
        _check_sparsity("topk", self.fraction, self.k)

    def layout(self, d: int) -> dict[str, tuple[type, int]]:
        kept = _kept(self.fraction, self.k, d)
        return {"indices": (index_dtype(d), kept), "values": (np.float32, kept)}

    def _encode(self, flat, generator):
        kept = _kept(self.fraction, self.k, flat.numel())
        indices = torch.topk(flat.abs(), kept, sorted=False).indices.sort().values
        return {"indices": _to_numpy(indices).astype(index_dtype(flat.numel())),
                "values": _to_numpy(flat[indices])}

    def _decode(self, arrays, d):
        out = torch.zeros(d)
        out[torch.from_numpy(arrays["indices"].astype(np.int64))] = _to_float32(arrays["values"])
        return out


def _random_indices(d: int, kept: int, seed: int) -> torch.Tensor:
    """The ``kept`` coordinates rand-k draws from ``seed`` (CPU generator: same on both ends)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(d, generator=generator)[:kept].sort().values


@dataclass(frozen=True)
class RandK(Codec):
    """Random-k sparsification: ``k`` coordinates drawn uniformly without replacement.

    Stich et al. 2018, "Sparsified SGD with Memory", arXiv 1809.07599. The coordinates come
    from a 64-bit seed that travels instead of the indices (the receiver redraws them): ``4 k +
    8`` bytes. Unscaled (default) it is contractive, ``E||x - C(x)||^2 = (1 - k/d) ||x||^2``,
    the kind error feedback needs; with ``unbiased=True`` the kept values are scaled by
    ``d / k``, giving ``E[C(x)] = x`` and ``E||x - C(x)||^2 = (d/k - 1) ||x||^2``.

    Parameters
    ----------
    fraction : float, optional
        Share of values kept, in (0, 1]: ``k = max(1, round(fraction * d))``.
    k : int, optional
        Number of values kept (capped at ``d``). Give exactly one of ``fraction`` and ``k``.
    unbiased : bool, default False
        Scale the kept values by ``d / k``.
    """

    fraction: float | None = None
    k: int | None = None
    unbiased: bool = False

    name = "randk"
    fields = ("seed", "values")
    stochastic = True

    def __post_init__(self) -> None:
        _check_sparsity("randk", self.fraction, self.k)

    def layout(self, d: int) -> dict[str, tuple[type, int]]:
        return {"seed": (np.uint64, 1), "values": (np.float32, _kept(self.fraction, self.k, d))}

    def _encode(self, flat, generator):
        d = flat.numel()
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        indices = _random_indices(d, _kept(self.fraction, self.k, d), seed).to(flat.device)
        return {"seed": np.array([seed], dtype=np.uint64), "values": _to_numpy(flat[indices])}

    def _decode(self, arrays, d):
        values = _to_float32(arrays["values"])
        if self.unbiased:
            values = values * (d / values.numel())
        out = torch.zeros(d)
        out[_random_indices(d, values.numel(), int(arrays["seed"][0]))] = values
        return out


@dataclass(frozen=True)
class Sign(Codec):
    """Scaled sign: ``C(x) = (||x||_1 / d) * sign(x)``, one bit per value.

    The compressor of EF-signSGD, Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and
    other Gradient Compression Schemes", arXiv 1901.09847 (scaled signSGD of Bernstein et al.
    2018, arXiv 1802.04434). ``||x - C(x)||^2 = ||x||^2 - ||x||_1^2 / d`` exactly (zeros are
    sent as ``+``). Signs travel packed 8 per byte, the scale as one float32.
    """

    name = "sign"
    fields = ("signs", "scale")
    stochastic = False
    unbiased = False

    def layout(self, d: int) -> dict[str, tuple[type, int]]:
        return {"signs": (np.uint8, -(-d // 8)), "scale": (np.float32, 1)}

    def _encode(self, flat, generator):
        positive = _to_numpy(flat >= 0).astype(np.uint8)
        return {"signs": _pack(positive, 1), "scale": _to_numpy(flat.abs().mean().reshape(1))}

    def _decode(self, arrays, d):
        positive = torch.from_numpy(_unpack(arrays["signs"], 1, d).astype(bool))
        scale = float(arrays["scale"][0])
        return torch.where(positive, torch.tensor(scale), torch.tensor(-scale))


CODECS: dict[str, type[Codec]] = {c.name: c for c in (Identity, Float16, QSGD, TopK, RandK, Sign)}


def build(name: str, **kw) -> Codec:
    """Build a codec by name.

    Parameters
    ----------
    name : str
        One of ``identity``, ``float16``, ``qsgd``, ``topk``, ``randk``, ``sign``.
    **kw
        The codec's options (see its class): ``qsgd``: ``bits``, ``block_size``; ``topk``:
        ``fraction`` or ``k``; ``randk``: ``fraction`` or ``k``, ``unbiased``.
    """
    if name not in CODECS:
        raise ValueError(f"codec: {name!r} is not a codec; known: {', '.join(CODECS)}")
    cls = CODECS[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(
            f"codec '{name}': unknown option(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}"
        )
    return cls(**kw)
