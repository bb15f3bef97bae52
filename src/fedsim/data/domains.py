"""Domains built from one dataset by deterministic transforms, for domain generalization
(``partition.scheme: domains``; FedKA, Sun, Chong & Ochiai, "Feature Distribution Matching
for Federated Domain Generalization", arXiv 2203.11635, whose clients are source domains).

The training pool is shuffled (seeded) and cut into one equal share per domain; share ``k``
is transformed by domain ``k``'s transform. The source domains' shares are split IID over
``num_clients / sources`` clients each; the target domain's share is held out, unlabelled
(FedKA's server votes on it), and the server's test set is the test set under the target's
transform, so centralised accuracy is target-domain accuracy.

Transforms, images ``(N, C, H, W)`` in [0, 1] (the digits):

- ``identity``; ``rotate``: 90 degrees counter-clockwise; ``invert``: ``1 - x``;
- ``noise``: ``x + N(0, 0.3^2)``, clipped to [0, 1], drawn from the seed;
- ``blur``: 3x3 box filter, edges replicated; ``scale``: shrunk to half size (2x2 means),
  centred on a blank image.

Feature vectors ``(N, d)`` (Synthetic): ``identity``; ``rotate``: a random orthogonal
matrix (from the seed); ``invert``: ``-x``; ``noise``: ``x + N(0, 0.5^2)``; ``shift``:
``x + b`` with ``b ~ N(0, 1)`` per feature (from the seed); ``scale``: ``2 x``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedsim.data.array_dataset import ArrayDataset

__all__ = ["IMAGE_DOMAINS", "VECTOR_DOMAINS", "DomainSplit", "domain_split", "transform"]

IMAGE_DOMAINS = ("identity", "rotate", "invert", "noise", "blur", "scale")
VECTOR_DOMAINS = ("identity", "rotate", "invert", "noise", "shift", "scale")


def _images(x: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    if name == "identity":
        return x
    if name == "rotate":
        return np.ascontiguousarray(np.rot90(x, k=1, axes=(2, 3)))
    if name == "invert":
        return 1.0 - x
    if name == "noise":
        return np.clip(x + 0.3 * rng.standard_normal(x.shape, dtype=np.float32), 0.0, 1.0)
    if name == "blur":
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
        h, w = x.shape[2:]
        return sum(padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    if name == "scale":
        n, c, h, w = x.shape
        small = x[:, :, : h - h % 2, : w - w % 2].reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
        out = np.zeros_like(x)
        top, left = (h - h // 2) // 2, (w - w // 2) // 2
        out[:, :, top:top + h // 2, left:left + w // 2] = small
        return out
    raise ValueError(f"{name!r} is not an image domain; known: {', '.join(IMAGE_DOMAINS)}")


def _vectors(x: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    d = x.shape[1]
    if name == "identity":
        return x
    if name == "rotate":
        q, r = np.linalg.qr(rng.standard_normal((d, d)))
        return x @ (q * np.sign(np.diag(r))).astype(np.float32)
    if name == "invert":
        return -x
    if name == "noise":
        return x + 0.5 * rng.standard_normal(x.shape, dtype=np.float32)
    if name == "shift":
        return x + rng.standard_normal(d).astype(np.float32)
    if name == "scale":
        return 2.0 * x
    raise ValueError(f"{name!r} is not a feature-vector domain; known: {', '.join(VECTOR_DOMAINS)}")


def transform(x: np.ndarray, name: str, seed: int) -> np.ndarray:
    """``x`` under domain ``name`` (see the module docstring); a new float32 array, the same
    for the same ``seed``."""
    rng = np.random.default_rng(seed)
    if x.dtype != np.float32:
        raise ValueError(f"domains transform float inputs; got {x.dtype} (character indices have no domains)")
    out = _images(x, name, rng) if x.ndim == 4 else _vectors(x, name, rng)
    return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class DomainSplit:
    """A dataset cut into domains (see the module docstring).

    Attributes
    ----------
    train : ArrayDataset
        Every domain's share, transformed, concatenated in the order of ``domains``.
    test : ArrayDataset
        The test set under the target domain's transform.
    clients : list of np.ndarray
        Each client's indices into ``train``: client ``i`` holds part of source domain
        ``i // (num_clients / sources)``.
    target : np.ndarray
        The target domain's indices into ``train`` (its inputs, unlabelled for training).
    """

    train: ArrayDataset
    test: ArrayDataset
    clients: list[np.ndarray]
    target: np.ndarray


def domain_split(train: ArrayDataset, test: ArrayDataset, domains: list[str], target: str, num_clients: int,
                 seed: int) -> DomainSplit:
    """Cut ``train`` into ``domains`` (one held out: ``target``) over ``num_clients`` clients."""
    if target not in domains:
        raise ValueError(f"target domain {target!r} is not one of the domains {domains}")
    sources = len(domains) - 1
    if sources < 1 or num_clients % sources:
        raise ValueError(f"{num_clients} clients over {sources} source domains; a multiple of {sources}")
    rng = np.random.default_rng([seed, 27])
    shares = np.array_split(rng.permutation(len(train.y)), len(domains))
    xs, ys, clients, offset, target_idx = [], [], [], 0, np.empty(0, dtype=np.int64)
    per_domain = num_clients // sources
    for k, (name, share) in enumerate(zip(domains, shares, strict=True)):
        xs.append(transform(train.x[share], name, seed * 1000 + k))
        ys.append(train.y[share])
        idx = np.arange(offset, offset + len(share))
        offset += len(share)
        if name == target:
            target_idx = idx
        else:
            clients += [np.sort(part) for part in np.array_split(rng.permutation(idx), per_domain)]
    merged = replace(train, x=np.concatenate(xs), y=np.concatenate(ys), groups=None)
    tested = replace(test, x=transform(test.x, target, seed * 1000 + domains.index(target) + 500))
    return DomainSplit(merged, tested, clients, target_idx)
