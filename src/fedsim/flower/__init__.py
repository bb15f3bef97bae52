"""fedsim's synchronous algorithms as Flower strategies, for any Flower 1.41 ServerApp.

Every synchronous algorithm of the registry (:mod:`fedsim.algorithms.registry`: fedsim's own
and any installed plug-in's) is here under its class name: ``fedsim.flower.Flag`` is the very
class fedsim's engine runs (:class:`fedsim.strategies.base.FedsimStrategy`), a subclass of
Flower's own ``flwr.serverapp.strategy.FedAvg``. It takes all of FedAvg's arguments
(``fraction_train``, ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes``,
``min_available_nodes``, ``weighted_by_key``, ``arrayrecord_key``, ``configrecord_key``,
``train_metrics_aggr_fn``, ``evaluate_metrics_aggr_fn``) plus its own, with the defaults of
fedsim's config, and runs under ``strategy.start(grid, initial_arrays, num_rounds)``. In an
existing Flower app two lines change::

    from fedsim.flower import Flag              # was: from flwr.serverapp.strategy import FedAvg
    strategy = Flag(fraction_train=0.5, r=8)    # was: strategy = FedAvg(fraction_train=0.5)

``fedsim algorithms`` lists them with their arguments. They aggregate the clients' updates
(trained minus global arrays) and screen every reply: one with an error, NaN/Inf, arrays of
the wrong keys or shapes or no usable weight is dropped with a warning naming the node and
the reason, and the round goes on. The ClientApp is the usual one (trained arrays in one
ArrayRecord, a MetricRecord with ``num-examples``); an algorithm with a client half names
what its ClientApp adds in its docstring (FedLD's regulariser, FedLEx's gradient mask), and
the module of the algorithm exports the helpers (e.g. ``fedld_regulariser``,
``apply_guidance``), which are reachable here too.
"""

from __future__ import annotations

import functools
from typing import Any

from fedsim.algorithms import registry


@functools.cache
def _exports() -> dict[str, Any]:
    """Each synchronous algorithm's class under its class name, and the names its module exports."""
    import sys

    from fedsim.strategies.base import FedsimStrategy

    exports: dict[str, Any] = {"FedsimStrategy": FedsimStrategy}
    for algorithm in registry.all_algorithms().values():
        if isinstance(algorithm, type) and issubclass(algorithm, FedsimStrategy):
            module = sys.modules[algorithm.__module__]
            for name in {*getattr(module, "__all__", ()), algorithm.__name__}:
                value = getattr(module, name)
                if exports.setdefault(name, value) is not value:
                    raise RuntimeError(f"fedsim.flower: {name!r} is exported by two algorithm modules, "
                                       f"{getattr(exports[name], '__module__', '?')} and {module.__name__}; "
                                       "rename one of them")
    return exports


def __getattr__(name: str) -> Any:
    exports = _exports()
    if name not in exports:
        raise AttributeError(f"module 'fedsim.flower' has no attribute {name!r}; it exports the synchronous "
                             f"algorithms' classes: {', '.join(sorted(n for n in exports if n[0].isupper()))}")
    return exports[name]


def __dir__() -> list[str]:
    return sorted(_exports())
