"""The Synthetic(alpha, beta) federated benchmark of FedProx and LEAF, one device at a time.

Every device's data is a pure function of ``(seed, device)``: its size and its two means
come from one vectorised draw over all devices (O(N) numbers, a second for a million
devices), its model and input mean from a generator seeded with ``(seed, device)``, and
each of its input rows from a counter-based generator (Philox keyed by ``(seed, device)``,
the row's counter computed, not drawn up to), so any row of any device is made without the
rows before it. So :class:`SyntheticDevices` builds any device, or any rows of it, on
demand and in any order, and :func:`generate_synthetic` (every device, concatenated) gives
the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsim.data.array_dataset import ArrayDataset

DEVICE_STREAM = 0x5EED
"""Salt of the per-device generators, ``default_rng([seed, DEVICE_STREAM, device])``."""


@dataclass(frozen=True, eq=False)
class SyntheticDevices:
    """Synthetic(alpha, beta) with one natural client per device, generated per device.

    From "Federated Optimization in Heterogeneous Networks" (FedProx, arXiv:1812.06127)
    and LEAF (arXiv:1812.01097), following the FedProx reference generator, where
    alpha and beta are standard deviations. For device k: ``u_k ~ N(0, alpha)``,
    ``W_k ~ N(u_k, 1)`` of shape ``(dim, num_classes)``, ``b_k ~ N(u_k, 1)``;
    ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` of shape ``(dim,)``;
    ``x ~ N(v_k, Sigma)`` with diagonal ``Sigma_jj = j^-1.2``;
    ``y = argmax(softmax(W_k^T x + b_k))``. Device sizes are
    ``floor(lognormal(4, 2)) + 50``. alpha controls how much local models differ,
    beta how much local inputs differ. Sizes, ``u_k`` and ``B_k`` are drawn for all devices
    at once from ``default_rng(seed)``; ``W_k``, ``b_k``, ``v_k`` from
    ``default_rng([seed, DEVICE_STREAM, k])``; row j of ``x`` from the Box-Muller transform
    of ``2 * dim`` uniforms at counter ``j * ceil(dim / 2)`` of Philox keyed ``(k, seed)``;
    device k's held-out rows are its last ``round(test_fraction * n_k)`` (at most ``n_k - 1``):
    its rows are independent draws, so which ones are held out changes nothing but the cost
    of finding them.

    Parameters
    ----------
    alpha : float, default 1.0
        Spread of the per-device model means.
    beta : float, default 1.0
        Spread of the per-device input means.
    num_devices : int, default 30
        Number of devices (natural clients).
    dim : int, default 60
        Input dimension.
    num_classes : int, default 10
        Number of classes.
    seed : int, default 0
        Seed of the generator and of the split.
    test_fraction : float, default 0.2
        Fraction of every device's samples held out for testing.
    """

    alpha: float = 1.0
    beta: float = 1.0
    num_devices: int = 30
    dim: int = 60
    num_classes: int = 10
    seed: int = 0
    test_fraction: float = 0.2
    sizes: np.ndarray = field(init=False, repr=False)
    """Every device's number of rows."""
    test_sizes: np.ndarray = field(init=False, repr=False)
    """Every device's number of held-out rows."""
    train_sizes: np.ndarray = field(init=False, repr=False)
    """Every device's number of training rows."""
    model_means: np.ndarray = field(init=False, repr=False)
    input_mean_centres: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"synthetic: alpha and beta must be >= 0; got {self.alpha}, {self.beta}")
        if self.num_devices < 1 or self.dim < 1 or self.num_classes < 2:
            raise ValueError(
                f"synthetic: need num_devices >= 1, dim >= 1, num_classes >= 2; "
                f"got {self.num_devices}, {self.dim}, {self.num_classes}"
            )
        rng = np.random.default_rng(self.seed)
        sizes = rng.lognormal(4.0, 2.0, self.num_devices).astype(np.int64) + 50
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "model_means", rng.normal(0.0, self.alpha, self.num_devices))
        object.__setattr__(self, "input_mean_centres", rng.normal(0.0, self.beta, self.num_devices))
        held_out = np.minimum(np.rint(self.test_fraction * sizes).astype(np.int64), sizes - 1)
        object.__setattr__(self, "test_sizes", held_out)
        object.__setattr__(self, "train_sizes", sizes - held_out)

    def device_arrays(self, device: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Device ``device``'s rows ``rows`` (sorted indices; None: all of them),
        ``(x float32 (n, dim), y int64 (n,))``."""
        rng = np.random.default_rng([self.seed, DEVICE_STREAM, device])
        mean = self.model_means[device]
        weights = rng.normal(mean, 1.0, (self.dim, self.num_classes))
        bias = rng.normal(mean, 1.0, self.num_classes)
        input_mean = rng.normal(self.input_mean_centres[device], 1.0, self.dim).astype(np.float32)
        input_std = np.arange(1, self.dim + 1, dtype=np.float32) ** np.float32(-0.6)  # sqrt of j^-1.2
        # A diagonal Gaussian needs no multivariate_normal factorisation.
        x = self._standard_normal_rows(device, rows) * input_std + input_mean
        # softmax is monotonic, so the argmax of the logits is the argmax of softmax; float64
        # logits, so that a row's label does not hang on how many rows are made with it
        # (a matrix product's rounding may depend on its shape)
        y = np.argmax(x.astype(np.float64) @ weights + bias, axis=1).astype(np.int64)
        return x, y

    def _standard_normal_rows(self, device: int, rows: np.ndarray | None) -> np.ndarray:
        """Standard normal ``(len(rows), dim)`` float32 draws of the device's input rows."""
        blocks = -(-self.dim // 2)  # Philox counter steps per row: 4 uniforms each, 2 per normal
        key = np.array([device, self.seed % 2**64], dtype=np.uint64)
        if rows is None:
            uniforms = np.random.Generator(np.random.Philox(key=key)).random((int(self.sizes[device]), 4 * blocks))
        else:
            uniforms = np.empty((len(rows), 4 * blocks))
            for i, row in enumerate(rows):
                bits = np.random.Philox(key=key)
                bits.advance(int(row) * blocks)
                uniforms[i] = np.random.Generator(bits).random(4 * blocks)
        # Box-Muller: 1 - u lies in (0, 1], so the logarithm is finite
        radius = np.sqrt(-2.0 * np.log1p(-uniforms[:, : self.dim]))
        return (radius * np.cos(2.0 * np.pi * uniforms[:, self.dim : 2 * self.dim])).astype(np.float32)

    def held_out(self, device: int, rows: np.ndarray) -> ArrayDataset:
        """Rows ``rows`` (sorted) of device ``device``'s held-out set, made without the others."""
        x, y = self.device_arrays(device, self.train_sizes[device] + np.asarray(rows))
        return ArrayDataset(x=x, y=y, num_classes=self.num_classes, name="synthetic",
                            groups=np.full(len(y), device, dtype=np.int64))

    def device(self, device: int) -> tuple[ArrayDataset, ArrayDataset]:
        """Device ``device``'s ``(train, held-out test)`` rows, ``groups`` the device id."""
        if not 0 <= device < self.num_devices:
            raise ValueError(f"synthetic: device {device} out of range 0..{self.num_devices - 1}")
        x, y = self.device_arrays(device)
        cut = int(self.train_sizes[device])
        return tuple(ArrayDataset(x=x[rows], y=y[rows], num_classes=self.num_classes, name="synthetic",
                                  groups=np.full(len(y[rows]), device, dtype=np.int64))
                     for rows in (slice(0, cut), slice(cut, None)))


def generate_synthetic(
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    num_devices: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Generate Synthetic(alpha, beta) with one natural client per device, every device at
    once: the rows of :class:`SyntheticDevices` (same parameters), device after device.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)``, ``x`` of shape ``(N, dim)``, ``groups`` the device id.
    """
    devices = SyntheticDevices(alpha, beta, num_devices, dim, num_classes, seed, test_fraction)
    sides = []
    for counts in (devices.train_sizes, devices.test_sizes):
        offsets = np.concatenate([[0], np.cumsum(counts)])
        # Each device's rows go straight to their place (float32): memory holds the data once.
        sides.append((np.empty((offsets[-1], dim), dtype=np.float32), np.empty(offsets[-1], dtype=np.int64),
                      offsets, np.repeat(np.arange(num_devices, dtype=np.int64), counts)))
    for device in range(num_devices):
        for (xs, ys, offsets, _), part in zip(sides, devices.device(device), strict=True):
            xs[offsets[device] : offsets[device + 1]] = part.x
            ys[offsets[device] : offsets[device + 1]] = part.y
    train, test = (ArrayDataset(x=xs, y=ys, num_classes=num_classes, name="synthetic", groups=groups)
                   for xs, ys, _, groups in sides)
    return train, test
