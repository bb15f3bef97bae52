"""fedsim's aggregators as Flower strategies, for any Flower 1.41 ServerApp.

Each class is a subclass of Flower's own ``flwr.serverapp.strategy.FedAvg``: it takes all of
FedAvg's arguments unchanged (``fraction_train``, ``fraction_evaluate``, ``min_train_nodes``,
``min_evaluate_nodes``, ``min_available_nodes``, ``weighted_by_key``, ``arrayrecord_key``,
``configrecord_key``, ``train_metrics_aggr_fn``, ``evaluate_metrics_aggr_fn``) plus its own,
with the defaults of fedsim's config, and runs under ``strategy.start(grid, initial_arrays,
num_rounds)``. In an existing Flower app two lines change::

    from fedsim.flower import Flag              # was: from flwr.serverapp.strategy import FedAvg
    strategy = Flag(fraction_train=0.5, r=8)    # was: strategy = FedAvg(fraction_train=0.5)

=================  ==========================================================================
``FedAU``          FedAvg with weights from each node's participation gaps (``K=50``)
``FedLD``          SVD-filtered, sign-aligned, norm-preserving mean (``keep=0.8``, ``beta=0.03``)
``FedLEx``         exploration phase, then a guidance matrix on the clients' gradients
                   (``explore_rounds=2``, ``scouts=5``, server momentum 0.9)
``Flag``           Flag Aggregator (``r=8``, ``lam=0.0``, ``max_iter=10``, ``tol=1e-6``)
``Median``         coordinate-wise median
``TrimmedMean``    coordinate-wise trimmed mean (``beta=0.1``)
``Krum``           Krum (``num_byzantine=None``)
``MultiKrum``      Multi-Krum (``num_byzantine=None``, ``m=None``)
=================  ==========================================================================

They aggregate the clients' updates (trained minus global arrays) with the same pure
functions as fedsim's engine (:mod:`fedsim.strategies`), and screen every reply: one with
an error, NaN/Inf, arrays of the wrong keys or shapes or no usable weight is dropped with a
warning naming the node and the reason, and the round goes on
(:mod:`fedsim.flower.screening`). The ClientApp is the usual one (trained arrays in one
ArrayRecord, a MetricRecord with ``num-examples``); FedLD and FedLEx add a client-side term,
which the ClientApp applies with the helpers here:

- :func:`fedld_regulariser` ``(logits, beta)``: FedLD's loss term, ``beta`` from the message's
  config entry ``"fedld-beta"``;
- :func:`apply_guidance` ``(model, guidance)``: FedLEx's gradient mask, from the message's
  ArrayRecord ``"guidance"`` once exploration is over.
"""

from fedsim.clients.fedld import fedld_regulariser
from fedsim.clients.fedlex import apply_guidance
from fedsim.flower.base import ScreenedFedAvg
from fedsim.flower.fedau import FedAU
from fedsim.flower.fedld import FedLD
from fedsim.flower.fedlex import FedLEx
from fedsim.flower.flag import Flag
from fedsim.flower.robust import Krum, Median, MultiKrum, TrimmedMean

__all__ = [
    "FedAU",
    "FedLD",
    "FedLEx",
    "Flag",
    "Krum",
    "Median",
    "MultiKrum",
    "ScreenedFedAvg",
    "TrimmedMean",
    "apply_guidance",
    "fedld_regulariser",
]
