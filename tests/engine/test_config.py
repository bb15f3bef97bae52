"""The experiment config: defaults, overrides and one-line errors that name the key."""

from pathlib import Path

import pytest

from fedsim.config import (
    ConfigError,
    ExperimentConfig,
    apply_override,
    load_config,
    validate_config,
)

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


def test_quickstart_config_loads_with_its_values():
    cfg = load_config(QUICKSTART)
    assert (cfg.partition.num_clients, cfg.partition.alpha, cfg.rounds) == (10, 0.5, 20)
    assert (cfg.data.name, cfg.model.name, cfg.strategy.name) == ("digits", "mlp", "fedavg")


def test_set_overrides_switch_strategy_and_parse_values():
    cfg = load_config(QUICKSTART, ["strategy.name=fedprox", "strategy.mu=0.01", "model.hidden=[32, 16]"])
    assert cfg.strategy.name == "fedprox" and cfg.strategy.mu == 0.01
    assert cfg.model.hidden == [32, 16]


def test_misspelled_key_names_it_and_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["partition.nmu_clients=5"])
    msg = str(err.value)
    assert "partition.nmu_clients: unknown key" in msg and "num_clients" in msg


def test_out_of_range_value_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["client.lr=-1"])
    assert "client.lr" in str(err.value) and "-1" in str(err.value)


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="rounds"):
        validate_config({"rounds": "many"})


def test_unknown_strategy_lists_known_names():
    with pytest.raises(ConfigError) as err:
        validate_config({"strategy": {"name": "fedavgg"}})
    assert "'fedavgg'" in str(err.value) and "fedprox" in str(err.value)


def test_strategy_parameter_of_another_strategy_is_rejected():
    with pytest.raises(ConfigError, match="strategy.fedavg.mu|strategy.mu"):
        validate_config({"strategy": {"name": "fedavg", "mu": 0.1}})


def test_unknown_strategy_key_lists_the_chosen_strategys_keys():
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["strategy.name=fedprox", "strategy.muu=0.1"])
    assert str(err.value) == ("strategy.muu: unknown key; allowed here: fraction_evaluate, fraction_train, "
                              "min_successful, mu, name, server_opt")
    with pytest.raises(ConfigError) as err:
        validate_config({"strategy": {"name": "flag", "rank": 4}})
    assert str(err.value) == ("strategy.rank: unknown key; allowed here: fraction_evaluate, fraction_train, lam, "
                              "max_iter, min_successful, name, r, server_opt, tol")
    with pytest.raises(ConfigError) as err:  # the chosen strategy's nested sections too
        validate_config({"strategy": {"name": "fedlex", "server_opt": {"nme": "adam"}}})
    assert str(err.value) == ("strategy.server_opt.nme: unknown key; allowed here: beta1, beta2, bias_correction, "
                              "eps, lr, momentum, name")


def test_a_server_optimizer_setting_the_chosen_optimizer_does_not_read_is_refused():
    with pytest.raises(ConfigError) as err:
        validate_config({"strategy": {"name": "fedavg", "server_opt": {"name": "adam", "momentum": 0.5}}})
    assert str(err.value) == ("strategy.server_opt: server_opt.momentum 0.5 is not read by server_opt.name adam; "
                              "leave it unset")
    with pytest.raises(ConfigError) as err:
        validate_config({"strategy": {"name": "fedavg", "server_opt": {"name": "adagrad", "beta2": 0.9,
                                                                       "eps": 0.01, "beta1": 0.5}}})
    assert str(err.value) == ("strategy.server_opt: server_opt.beta2 0.9 is not read by server_opt.name adagrad; "
                              "leave it unset")
    with pytest.raises(ConfigError, match="server_opt.beta1 0.5, server_opt.eps 0.1 are not read by "
                                          "server_opt.name sgd; leave them unset"):
        validate_config({"strategy": {"name": "fedavg", "server_opt": {"beta1": 0.5, "eps": 0.1}}})
    with pytest.raises(ConfigError, match="server_opt.bias_correction True is not read by server_opt.name yogi"):
        validate_config({"strategy": {"name": "fedavg", "server_opt": {"name": "yogi", "bias_correction": True}}})
    # what it reads, and defaults (as in a config dumped and loaded again), are accepted
    cfg = validate_config({"strategy": {"name": "fedavg", "server_opt": {"name": "adam", "bias_correction": True}}})
    assert cfg.strategy.server_opt.bias_correction
    cfg = validate_config({"strategy": {"name": "fedlex", "server_opt": {"name": "adam", "beta2": 0.9}}})
    assert validate_config(cfg.model_dump(mode="json")).strategy.server_opt.beta2 == 0.9


def test_errors_under_strategy_name_the_key_without_the_union_tag():
    with pytest.raises(ConfigError) as err:
        validate_config({"strategy": {"name": "fedprox", "mu": -1}})
    assert str(err.value) == "strategy.mu: Input should be greater than or equal to 0 (got -1)"


def test_unknown_loss_and_bad_loss_argument_are_rejected():
    with pytest.raises(ConfigError, match="'crossentropy' is not a loss"):
        validate_config({"loss": {"name": "crossentropy"}})
    with pytest.raises(ConfigError, match="unknown argument"):
        validate_config({"loss": {"name": "cross_entropy", "smoothing_typo": 0.1}})


def test_former_loss_names_in_a_yaml_file_are_refused_naming_the_new_ones(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("loss:\n  name: zloss\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == "loss: name: 'zloss' was renamed 'spherical_z_loss'; use loss name 'spherical_z_loss'"
    path.write_text("loss:\n  name: cross_entropy\n  aux: {name: z_loss, weight: 1.0e-4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == "loss: aux.name: 'z_loss' was renamed 'palm_z_loss'; use loss name 'palm_z_loss'"


def test_file_loaders_need_a_path():
    with pytest.raises(ConfigError, match="data.path is required"):
        validate_config({"data": {"name": "mnist"}})


def test_override_syntax_errors_are_clear():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "rounds")
    with pytest.raises(ConfigError, match="holds a value"):
        apply_override({"rounds": 3}, "rounds.x=1")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(QUICKSTART, ["strategy.name=fedprox"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert isinstance(ExperimentConfig(), ExperimentConfig)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(("raw", "message"), [
    ({"partition": {"scheme": "pathological", "classes_per_client": 11}},
     "partition.classes_per_client: 11 labels per client but data.name digits has 10 classes; allowed 1..10"),
    ({"data": {"name": "synthetic", "synthetic": {"num_classes": 4}},
      "partition": {"scheme": "pathological", "classes_per_client": 5}},
     "partition.classes_per_client: 5 labels per client but data.name synthetic has 4 classes; allowed 1..4"),
    ({"partition": {"scheme": "natural"}},
     "partition.scheme: natural needs natural client ids, which data.name digits does not have; "
     "use synthetic, shakespeare, or hf with data.hf_partition_by"),
    ({"data": {"name": "hf", "path": "x", "hf_partition_by": "writer_id"}},
     "data.hf_partition_by: only data.name hf with partition.scheme natural uses it; got hf with dirichlet"),
    ({"strategy": {"name": "scaffold"}, "client": {"optimizer": "adam"}},
     "strategy.name: scaffold assumes SGD client steps (option II control variate (x - y_i) / (K lr)); "
     "client.optimizer: adam cannot combine with it; use sgd"),
    ({"strategy": {"name": "fednova"}, "client": {"optimizer": "adam"}},
     "strategy.name: fednova assumes SGD client steps (normalising by the number of (momentum) SGD steps); "
     "client.optimizer: adam cannot combine with it; use sgd"),
])
def test_sections_that_cannot_combine_are_refused_in_one_line_naming_both(raw, message):
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert str(err.value) == message


def test_niid_partition_settings_validate():
    cfg = validate_config({"partition": {"scheme": "pathological", "classes_per_client": 10}})
    assert cfg.partition.classes_per_client == 10
    cfg = validate_config({"partition": {"scheme": "feature_noise", "noise_std": 0.3}})
    assert (cfg.partition.noise_std, cfg.partition.noise_draw, cfg.partition.min_size) == (0.3, "round", 10)
    assert validate_config({"partition": {"scheme": "feature_noise", "noise_draw": "once"}}).partition.noise_draw == "once"
    cfg = validate_config({"data": {"name": "hf", "path": "x", "hf_partition_by": "writer_id"},
                           "partition": {"scheme": "natural", "num_clients": 3597}})
    assert cfg.data.hf_partition_by == "writer_id"


def test_sgd_momentum_with_adam_clients_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="client: momentum 0.9 is SGD's heavy-ball momentum"):
        validate_config({"client": {"optimizer": "adam", "momentum": 0.9}})
    assert validate_config({"client": {"optimizer": "adam", "lr": 0.003}}).client.momentum == 0.0
