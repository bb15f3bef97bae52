"""Hierarchical FL's association and weights: which gateway each client is in contact with
at each edge round, and how much each client and each gateway counts.

SemSpaceFL (Nguyen et al., "SemSpaceFL: A Collaborative Hierarchical Federated Learning
Framework for Semantic Communication in 6G LEO Satellites", arXiv 2505.00966) aggregates
satellites' models first at regional gateways, then the gateways' models at a cloud server,
and "dynamically adjusts the contribution of each satellite based on its trajectory and
association with different gateways". The paper's exact formula was not at hand (only its
abstract); fedsim's definition, its choice (ALGORITHMS.md), is:

- association: over cloud round r of E edge rounds, ``a_kg`` is the share of those edge
  rounds in which client k is in contact with gateway g (:func:`association_shares`), known
  in advance from the client's trajectory (:func:`orbit_contacts`);
- edge tier: at gateway g, client k's weight is ``n_k a_kg`` (``n_k`` its training samples);
- cloud tier: gateway g's weight is ``W_g = sum_k n_k a_kg``, so that each client's data
  counts in the global model in proportion to the time it spent with each gateway.

The plain two-tier averaging it is compared with (``weighting: samples``) weighs client k by
``n_k`` at its gateway and gateway g by the samples of the clients it aggregated during the
round. With one edge round and every client always in contact with one gateway, both give
``sum_g (sum_{k in g} n_k) / N * (sum_{k in g} n_k w_k) / (sum_{k in g} n_k) = sum_k n_k w_k / N``:
flat FedAvg.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NO_CONTACT", "association_shares", "cloud_weights", "edge_scale", "orbit_contacts", "static_contacts"]

NO_CONTACT = -1
"""The gateway of a client in contact with none."""


def static_contacts(num_clients: int, num_edges: int, times: np.ndarray) -> np.ndarray:
    """Client k at gateway ``k mod num_edges`` at every time: ``(len(times), num_clients)``."""
    return np.broadcast_to(np.arange(num_clients) % num_edges, (len(times), num_clients)).copy()


def orbit_contacts(phases: np.ndarray, period: float, num_edges: int, width: float, times: np.ndarray) -> np.ndarray:
    """The gateway each client is in contact with at each time, or :data:`NO_CONTACT`.

    Client k is at orbit position ``theta_k(t) = (phase_k + t / period) mod 1``; gateway g
    sits at ``g / num_edges`` and sees the arc of length ``width`` centred on it. A client
    in contact with several (overlapping arcs) is with the nearest.

    Returns
    -------
    numpy.ndarray of int, ``(len(times), len(phases))``
    """
    theta = (phases[None, :] + np.asarray(times, dtype=np.float64)[:, None] / period) % 1.0
    offset = np.abs(theta[:, :, None] - np.arange(num_edges)[None, None, :] / num_edges)
    distance = np.minimum(offset, 1.0 - offset)
    nearest = distance.argmin(axis=2)
    seen = np.take_along_axis(distance, nearest[:, :, None], axis=2)[:, :, 0] <= width / 2
    return np.where(seen, nearest, NO_CONTACT)


def association_shares(contacts: np.ndarray, num_edges: int) -> np.ndarray:
    """``a_kg``: the share of the rows of ``contacts`` (one per edge round of a cloud round)
    in which client k is with gateway g, ``(num_clients, num_edges)``; rows sum to at most 1."""
    return np.stack([(contacts == g).mean(axis=0) for g in range(num_edges)], axis=1)


def edge_scale(weighting: str, shares: np.ndarray, gateway: int) -> np.ndarray:
    """The factor on each client's sample count at ``gateway``: ``a_kg`` (semspacefl), or 1
    (samples)."""
    return shares[:, gateway] if weighting == "semspacefl" else np.ones(len(shares))


def cloud_weights(weighting: str, num_examples: np.ndarray, shares: np.ndarray, aggregated: np.ndarray) -> np.ndarray:
    """Each gateway's weight at the cloud, ``(num_edges,)``.

    Parameters
    ----------
    weighting : {"samples", "semspacefl"}
    num_examples : numpy.ndarray
        ``n_k`` of every client.
    shares : numpy.ndarray
        ``a_kg`` of the round (:func:`association_shares`).
    aggregated : numpy.ndarray of bool, ``(num_clients, num_edges)``
        Whether gateway g aggregated an update of client k during the round.

    Returns
    -------
    ``sum_k n_k a_kg`` (semspacefl), or ``sum_{k aggregated at g} n_k`` (samples).
    """
    n = np.asarray(num_examples, dtype=np.float64)
    if weighting == "semspacefl":
        return n @ (shares * aggregated)
    return n @ aggregated.astype(np.float64)
