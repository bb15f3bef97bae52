"""fedsim: federated-learning simulation on Flower + Ray."""

__version__ = "0.1.0"
