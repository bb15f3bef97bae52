"""What ``fedsim algorithms`` shows: each registered algorithm's arguments, backends and the
features it combines with.

The features are not declared twice: each is probed by validating a small experiment with
the algorithm and that feature switched on (:func:`fedsim.config.validate_config`), so the
list says exactly what ``fedsim validate`` accepts, and a refusal shows its one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedsim.algorithms import registry
from fedsim.algorithms.api import Algorithm

__all__ = ["FEATURES", "Argument", "Description", "describe"]

FEATURES: dict[str, dict[str, Any]] = {
    "server optimizer (adam)": {"strategy": {"server_opt": {"name": "adam"}}},
    "participation (bernoulli)": {"participation": {"model": "bernoulli"}},
    "update attack (sign_flip)": {"attack": {"name": "sign_flip", "fraction": 0.2}},
    "data attack (label_flip)": {"attack": {"name": "label_flip", "fraction": 0.2}},
    "uplink top-k + error feedback": {"quant": {"uplink": {"codec": "topk", "fraction": 0.1, "error_feedback": "ef"}}},
    "uplink top-k + EF21": {"quant": {"uplink": {"codec": "topk", "fraction": 0.1, "error_feedback": "ef21"}}},
    "compressed downlink (qsgd)": {"quant": {"downlink": {"codec": "qsgd"}}},
    "QAT": {"quant": {"qat": {"weight_bits": 8}}},
    "low-bit training": {"quant": {"lowbit": {"bits": 8}}},
    "adam clients": {"client": {"optimizer": "adam"}},
    "stateful loss (sogclr)": {"loss": {"name": "sogclr"}},
    "adversarial clients (pgd)": {"client": {"adversarial": {"method": "pgd", "epsilon": 0.1}}},
    "hierarchy (2 gateways)": {"hierarchy": {"num_edges": 2}},
    "client-level DP (central)": {"privacy": {"mechanism": "central", "noise_multiplier": 1.0}},
    "DP-SGD (sample)": {"sim": {"backend": "batched"}, "privacy": {"mechanism": "sample", "noise_multiplier": 1.0}},
    "secure aggregation": {"secagg": {"enabled": True}},
}
"""Each feature as the settings that switch it on."""

_BASE: dict[str, Any] = {"data": {"name": "digits"}, "partition": {"num_clients": 10}, "model": {"name": "mlp"}}
# what each family needs to run at all on the base experiment
_FAMILY: dict[str, dict[str, Any]] = {"sync": {}, "async": {}, "gossip": {"strategy": {"topology": "ring"}},
                                      "custom": {}}


@dataclass(frozen=True)
class Argument:
    """One key of an algorithm's config section."""

    name: str
    type: str
    default: Any
    description: str


@dataclass(frozen=True)
class Description:
    """Everything ``fedsim algorithms NAME`` prints."""

    name: str
    family: str
    description: str
    module: str
    arguments: list[Argument]
    client_state: tuple[str, ...]
    backends: list[str]
    combines: list[str]
    refuses: dict[str, str]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _arguments(algorithm: type[Algorithm]) -> list[Argument]:
    arguments = []
    for name, field in algorithm.Config.model_fields.items():
        if name == "name":
            continue
        default = field.get_default(call_default_factory=True)
        if hasattr(default, "model_dump"):
            default = {k: v for k, v in default.model_dump().items() if k in ("name", "lr", "momentum")}
        kind = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
        arguments.append(Argument(name, kind, default, field.description or ""))
    return arguments


def describe(name: str) -> Description:
    """The catalogue entry of the algorithm registered as ``name``."""
    from fedsim.clients.training_features import stacked_reason
    from fedsim.config import ConfigError, validate_config

    algorithm = registry.get(name)
    family = algorithm.family()
    base = _merge(_merge(_merge(_BASE, _FAMILY[family]), algorithm.requires), {"strategy": {"name": name}})
    cfg = validate_config(base)
    backends = []
    for backend in algorithm.backends():
        if backend == "batched":
            reason = stacked_reason(cfg)
            backend = "batched (stacked)" if reason is None else f"batched (one client at a time: {reason})"
        backends.append(backend)
    combines, refuses = [], {}
    for feature, settings in FEATURES.items():
        try:
            validate_config(_merge(base, settings))
        except ConfigError as exc:
            refuses[feature] = str(exc).splitlines()[0]
        else:
            combines.append(feature)
    client_state = algorithm.client.state_keys if algorithm.client is not None else ()
    return Description(name, family, algorithm.description, algorithm.__module__, _arguments(algorithm), client_state,
                       backends, combines, refuses)
