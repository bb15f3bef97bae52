"""The Synthetic(alpha, beta) federated benchmark of FedProx and LEAF."""

from __future__ import annotations

import numpy as np

from fedsim.data.array_dataset import ArrayDataset
from fedsim.data.partition import split_client


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
    """Generate Synthetic(alpha, beta) with one natural client per device.

    From "Federated Optimization in Heterogeneous Networks" (FedProx, arXiv:1812.06127)
    and LEAF (arXiv:1812.01097), following the FedProx reference generator, where
    alpha and beta are standard deviations. For device k: ``u_k ~ N(0, alpha)``,
    ``W_k ~ N(u_k, 1)`` of shape ``(dim, num_classes)``, ``b_k ~ N(u_k, 1)``;
    ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` of shape ``(dim,)``;
    ``x ~ N(v_k, Sigma)`` with diagonal ``Sigma_jj = j^-1.2``;
    ``y = argmax(softmax(W_k^T x + b_k))``. Device sizes are
    ``floor(lognormal(4, 2)) + 50``. alpha controls how much local models differ,
    beta how much local inputs differ.

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

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)``, ``x`` of shape ``(N, dim)``, ``groups`` the device id.
    """
    if alpha < 0 or beta < 0:
        raise ValueError(f"synthetic: alpha and beta must be >= 0; got {alpha}, {beta}")
    if num_devices < 1 or dim < 1 or num_classes < 2:
        raise ValueError(
            f"synthetic: need num_devices >= 1, dim >= 1, num_classes >= 2; "
            f"got {num_devices}, {dim}, {num_classes}"
        )
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4.0, 2.0, num_devices).astype(np.int64) + 50
    model_means = rng.normal(0.0, alpha, num_devices)
    input_mean_centres = rng.normal(0.0, beta, num_devices)
    input_std = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of j^-1.2
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    splits = [split_client(np.arange(start, start + size), test_fraction, seed + device)
              for device, (start, size) in enumerate(zip(starts, sizes, strict=True))]
    # Each device's rows go straight to their place in the train or test arrays (float32),
    # so memory holds the data once, not a float64 copy of every device besides.
    parts = {}
    for side in (0, 1):
        rows = np.concatenate([split[side] for split in splits])
        devices = np.repeat(np.arange(num_devices, dtype=np.int64), [len(split[side]) for split in splits])
        parts[side] = (np.empty((len(rows), dim), dtype=np.float32), np.empty(len(rows), dtype=np.int64),
                       np.zeros(num_devices + 1, dtype=np.int64), devices)
        parts[side][2][1:] = np.cumsum([len(split[side]) for split in splits])
    for device in range(num_devices):
        weights = rng.normal(model_means[device], 1.0, (dim, num_classes))
        bias = rng.normal(model_means[device], 1.0, num_classes)
        input_mean = rng.normal(input_mean_centres[device], 1.0, dim)
        # A diagonal Gaussian needs no multivariate_normal factorisation.
        x = input_mean + rng.standard_normal((sizes[device], dim)) * input_std
        # softmax is monotonic, so the argmax of the logits is the argmax of softmax.
        y = np.argmax(x @ weights + bias, axis=1)
        for side in (0, 1):
            xs, ys, offsets, _ = parts[side]
            local = splits[device][side] - starts[device]
            xs[offsets[device] : offsets[device + 1]] = x[local]
            ys[offsets[device] : offsets[device + 1]] = y[local]
    train, test = (ArrayDataset(x=xs, y=ys, num_classes=num_classes, name="synthetic", groups=devices)
                   for xs, ys, _, devices in (parts[0], parts[1]))
    return train, test
