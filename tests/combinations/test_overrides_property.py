"""Property: whatever ``--set`` overrides a user types, validation raises nothing but ConfigError."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fedsim.algorithms import registry
from fedsim.config import ConfigError, ExperimentConfig, load_config

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the config's sections (under ``strategy``, every registered
    algorithm's)."""
    keys = []
    for name, field in model.model_fields.items():
        args = getattr(field.annotation, "__args__", None) or (field.annotation,)
        sections = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if prefix == "" and name == "strategy":
            sections = [registry.get(algorithm).Config for algorithm in registry.names()]
        keys.append(prefix + name)
        for section in sections:
            keys.extend(_keys(section, f"{prefix}{name}."))
    return sorted(set(keys))


KEYS = _keys(ExperimentConfig) + ["loss.tau", "loss.label_smoothing", "loss.reduction", "loss.aux.weight"]
NAMES = [*registry.names(), "cross_entropy", "anyloss", "sogclr", "palm_z_loss",
         "mlp", "cnn", "resnet8", "qsgd", "topk", "ef21", "econtrol", "torus", "erdos_renyi", "cyclic", "markov",
         "sign_flip", "label_flip", "csv", "cuda", "npz", "hf", "synthetic", "natural", "shards", "adam", "shakespeare",
         "char_lstm"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.sampled_from(NAMES), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.sampled_from(NAMES + ["name", "p"]), inner,
                                                                        max_size=3)), max_leaves=6)


def _yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


assignment = st.one_of(
    st.builds(lambda k, v: f"{k}={_yaml(v)}", st.sampled_from(KEYS), values),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=16)),
    st.text(max_size=24),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.lists(assignment, min_size=1, max_size=4))
def test_validation_raises_nothing_but_config_error_whatever_the_overrides(overrides):
    try:
        cfg = load_config(QUICKSTART, overrides)
    except ConfigError as exc:
        assert str(exc).strip(), overrides
    else:
        assert cfg.strategy.name in registry.names()
