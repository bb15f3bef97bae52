"""fedsim: federated-learning simulation on Flower + Ray."""

from fedsim.notices import quiet_known_notices

__version__ = "0.1.0"

quiet_known_notices()  # in every process that imports fedsim: the driver and each Ray worker
