"""Weight initialisations other than PyTorch's defaults."""

from __future__ import annotations

from torch import nn

__all__ = ["xavier_init"]


def xavier_init(model: nn.Module) -> nn.Module:
    """Glorot-Xavier initialisation in place: every weight of two or more dimensions (linear
    and convolution kernels) from ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``, so its
    variance is ``2 / (fan_in + fan_out)`` (Glorot & Bengio, AISTATS 2010); biases 0.
    Normalisation layers keep theirs (weight 1, bias 0).

    The initialisation the vanishing-variance paper's variance correction is defined against
    (Tian et al., arXiv 2404.04616: averaging uncorrelated models "undermines the optimal
    variance established by the Xavier weight initialization").

    Parameters
    ----------
    model : nn.Module
        Re-initialised in place, with the module's random generator state.

    Returns
    -------
    nn.Module
        ``model``.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
