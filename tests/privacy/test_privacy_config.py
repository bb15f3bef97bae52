"""Bad privacy input is refused at validate, in one line that names both keys; a config that
validates runs (tests/privacy/test_privacy_runs.py)."""

import pytest

from fedsim.config import ConfigError, validate_config

CENTRAL = {"mechanism": "central", "noise_multiplier": 1.0}
RDP = {**CENTRAL, "accountant": "rdp"}

BAD = {
    "negative noise": ({"privacy": {"mechanism": "central", "noise_multiplier": -1.0}}, ("privacy.noise_multiplier",)),
    "nan noise": ({"privacy": {"mechanism": "central", "noise_multiplier": float("nan")}},
                  ("privacy.noise_multiplier",)),
    "delta 0": ({"privacy": {**CENTRAL, "delta": 0.0}}, ("privacy.delta",)),
    "delta 1": ({"privacy": {**CENTRAL, "delta": 1.0}}, ("privacy.delta",)),
    "target above max": ({"privacy": {"mechanism": "central", "target_epsilon": 8, "max_epsilon": 4}},
                         ("target_epsilon", "max_epsilon")),
    "noise and target": ({"privacy": {**CENTRAL, "target_epsilon": 2}}, ("noise_multiplier", "target_epsilon")),
    "neither noise nor target": ({"privacy": {"mechanism": "local"}}, ("noise_multiplier", "target_epsilon")),
    "an option without a mechanism": ({"privacy": {"clip_norm": 2.0}}, ("clip_norm", "mechanism")),
    "adaptive knobs with fixed clipping": ({"privacy": {**RDP, "target_quantile": 0.3}}, ("target_quantile", "clipping")),
    "adaptive local": ({"privacy": {"mechanism": "local", "noise_multiplier": 1, "clipping": "adaptive"}},
                       ("clipping", "mechanism")),
    "median": ({"strategy": {"name": "median"}, "privacy": RDP}, ("privacy.mechanism", "strategy.name")),
    "krum": ({"strategy": {"name": "krum"}, "privacy": RDP}, ("privacy.mechanism", "strategy.name")),
    "trimmed mean": ({"strategy": {"name": "trimmed_mean"}, "privacy": RDP}, ("privacy.mechanism", "strategy.name")),
    "flag": ({"strategy": {"name": "flag"}, "privacy": RDP}, ("privacy.mechanism", "strategy.name")),
    "pld on fixed-size sampling": ({"strategy": {"fraction_train": 0.5}, "privacy": CENTRAL},
                                   ("privacy.accountant", "participation.model")),
    "ef21 estimates": ({"quant": {"uplink": {"codec": "topk", "fraction": 0.1, "error_feedback": "ef21"}},
                        "privacy": RDP}, ("quant.uplink.error_feedback", "privacy.mechanism")),
    "hierarchy's own loop": ({"hierarchy": {"num_edges": 2}, "privacy": RDP}, ("privacy.mechanism", "hierarchy")),
    "an asynchronous strategy without a buffer": ({"strategy": {"name": "fedasync"}, "privacy": RDP},
                                                  ("privacy.mechanism", "strategy.name")),
    "fedfix's window weights": ({"strategy": {"name": "fedfix"}, "privacy": RDP}, ("privacy.mechanism", "strategy.name")),
    "local DP in fedbuff": ({"strategy": {"name": "fedbuff"}, "privacy": {"mechanism": "local", "noise_multiplier": 1}},
                            ("privacy.mechanism", "strategy.name")),
    "adaptive clipping in fedbuff": ({"strategy": {"name": "fedbuff"}, "privacy": {**RDP, "clipping": "adaptive"}},
                                     ("privacy.clipping", "strategy.name")),
    "calibration in fedbuff": ({"strategy": {"name": "fedbuff"}, "privacy": {"mechanism": "central",
                                                                             "target_epsilon": 4}},
                               ("privacy.target_epsilon", "strategy.name")),
    "DP-SGD with BatchNorm": ({"model": {"name": "resnet8"}, "sim": {"backend": "batched"},
                               "privacy": {"mechanism": "sample", "noise_multiplier": 1.0}},
                              ("privacy.mechanism", "model.name", "BatchNorm")),
    "DP-SGD one client at a time": ({"sim": {"backend": "inprocess"},
                                     "privacy": {"mechanism": "sample", "noise_multiplier": 1.0}},
                                    ("privacy.mechanism", "sim.backend")),
    "DP-SGD and a client term": ({"strategy": {"name": "fedprox"}, "sim": {"backend": "batched"},
                                  "privacy": {"mechanism": "sample", "noise_multiplier": 1.0}},
                                 ("privacy.mechanism", "strategy.name")),
    "count noise eating the budget": ({"privacy": {**RDP, "clipping": "adaptive", "count_noise_multiplier": 0.4}},
                                      ("count_noise_multiplier", "noise_multiplier")),
    "count noise before calibration": ({"privacy": {"mechanism": "central", "target_epsilon": 2, "accountant": "rdp",
                                                    "clipping": "adaptive", "count_noise_multiplier": 5}},
                                       ("count_noise_multiplier", "target_epsilon")),
    "local DP and scaffold's control variates": ({"strategy": {"name": "scaffold"},
                                                  "privacy": {"mechanism": "local", "noise_multiplier": 1.0}},
                                                 ("privacy.mechanism", "strategy.name")),
    "local DP's accountant": ({"privacy": {"mechanism": "local", "noise_multiplier": 1.0, "accountant": "rdp"}},
                              ("privacy.accountant", "privacy.mechanism")),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_privacy_input_is_one_line_naming_both_keys(case):
    raw, keys = BAD[case]
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for key in keys:
        assert key in message, message


@pytest.mark.parametrize("privacy", [
    RDP, {**CENTRAL, "accountant": "prv", "clipping": "adaptive"},
    {"mechanism": "local", "target_epsilon": 4.0},
    {"mechanism": "sample", "noise_multiplier": 1.0, "max_epsilon": 9.0},
])
def test_good_privacy_configs_validate_and_write_back(privacy):
    sim = {"backend": "batched"} if privacy["mechanism"] == "sample" else {}
    participation = ({"model": "bernoulli", "p_low": 0.3, "p_high": 0.3} if privacy.get("accountant") == "prv" else {})
    cfg = validate_config({"privacy": privacy, "sim": sim, "participation": participation})
    assert validate_config(cfg.model_dump(mode="json")) == cfg  # config.yaml validates again


def test_central_dp_per_buffer_validates_with_fedbuff():
    cfg = validate_config({"strategy": {"name": "fedbuff"}, "privacy": {**CENTRAL, "max_epsilon": 8.0}})
    assert cfg.strategy.family == "async" and cfg.privacy.mechanism == "central"
    assert validate_config(cfg.model_dump(mode="json")) == cfg
