"""Algorithms as plug-ins: one module per algorithm, one registry.

An algorithm module holds its arguments (a config section), its server half (a Flower
strategy, an asynchronous rule, or the gossip family's declarations), its client half
(:class:`fedsim.clients.features.ClientFeature`) and its rules; :mod:`fedsim.algorithms.api`
says what it declares and :mod:`fedsim.algorithms.registry` finds it through the entry-point
group ``fedsim.algorithms``. fedsim's own algorithms are the modules of this package; an
installed package adds its own the same way (``examples/plugin-feddyn``).
"""
