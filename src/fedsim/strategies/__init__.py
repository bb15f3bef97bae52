"""What the server side of every algorithm shares: the one Flower strategy base
(:mod:`fedsim.strategies.base`), the asynchronous rule base, reply screening, participation
models, server optimizers and the aggregation helpers. The algorithms themselves are plug-ins
(:mod:`fedsim.algorithms`).
"""
