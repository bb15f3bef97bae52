"""Byzantine attacks: pure functions on stacked updates or labels, plus a name registry."""

from fedsim.attacks.data_poisoning import label_flip
from fedsim.attacks.model_poisoning import (
    alie,
    alie_z,
    byzantine_mask,
    gaussian_noise,
    ipm,
    scaled_update,
    sign_flip,
)
from fedsim.attacks.registry import (
    ALIE,
    ATTACKS,
    IPM,
    GaussianNoise,
    LabelFlip,
    NoAttack,
    ScaledUpdate,
    SignFlip,
    build_attack,
    choose_byzantine,
)

__all__ = [
    "ALIE",
    "ATTACKS",
    "IPM",
    "GaussianNoise",
    "LabelFlip",
    "NoAttack",
    "ScaledUpdate",
    "SignFlip",
    "alie",
    "alie_z",
    "build_attack",
    "byzantine_mask",
    "choose_byzantine",
    "gaussian_noise",
    "ipm",
    "label_flip",
    "scaled_update",
    "sign_flip",
]
