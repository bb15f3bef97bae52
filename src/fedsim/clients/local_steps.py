"""How many plain SGD steps a client's local run amounts to.

With heavy-ball momentum ``rho`` (``m <- rho m + g; w <- w - lr m``), ``tau`` steps under a
constant gradient ``g`` move the weights by ``lr * a(tau, rho) * g`` where

    a(tau, rho) = sum_{k=1..tau} (1 - rho^k) / (1 - rho)
                = (tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho),

``a = tau`` without momentum. FedNova (Wang et al., "Tackling the Objective Inconsistency
Problem in Heterogeneous Federated Optimization", arXiv 2007.07481, section 4 and
appendix) normalises each client's update by this ``a_i = ||a_i||_1``; SCAFFOLD's option II
control variate divides the model difference by it (the paper's ``K`` for plain SGD).
"""

from __future__ import annotations

__all__ = ["momentum_steps"]


def momentum_steps(steps: int, momentum: float) -> float:
    """``a(tau, rho)``: the plain-SGD steps that ``steps`` momentum-SGD steps amount to.

    Parameters
    ----------
    steps : int
        Local steps ``tau`` taken, >= 1.
    momentum : float
        Heavy-ball momentum ``rho`` in ``[0, 1)``.

    Returns
    -------
    float
        ``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``; ``tau`` when ``rho = 0``.
    """
    if steps < 1:
        raise ValueError(f"momentum_steps: steps must be >= 1; got {steps}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum_steps: momentum must be in [0, 1); got {momentum}")
    if momentum == 0.0:
        return float(steps)
    return (steps - momentum * (1.0 - momentum**steps) / (1.0 - momentum)) / (1.0 - momentum)
