"""fedsim's server loops: the one skeleton (start, resume, rows, checkpoints, summary) and each
family's step (synchronous rounds, asynchronous arrivals on a virtual clock, gossip)."""
