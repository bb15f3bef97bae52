"""Secure aggregation: SecAgg+ (Bell et al. 2020) over Bonawitz et al. 2017's masking.

- :mod:`fedsim.secagg.quantization`: client inputs onto the ring Z_(2^32) and back;
- :mod:`fedsim.secagg.masks`: key agreement (X25519 + HKDF), mask expansion (ChaCha20) and
  the SecAgg+ communication graph;
- :mod:`fedsim.secagg.protocol`: one round of the protocol, every party's step, with
  dropout recovery by Shamir secret sharing, and its cost;
- :mod:`fedsim.secagg.engine`: the protocol inside fedsim's synchronous engine
  (``secagg.enabled``).

In a deployment the same steps travel as Flower messages between real clients: the
clients' half is :mod:`fedsim.clients.secagg_steps`, the server's
:mod:`fedsim.loops.secagg_messages`.
"""
