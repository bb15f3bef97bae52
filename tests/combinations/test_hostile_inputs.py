"""Hostile inputs: what ``fedsim validate`` must refuse in one line naming the key(s), so
that a configuration it accepts runs. Adding a case is one line of a table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsim.config import ConfigError, load_config
from fedsim.preflight import preflight

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
FEDBUFF = ("strategy.name=fedbuff",)
TOPK = ("quant.uplink.codec=topk", "quant.uplink.fraction=0.1")

REFUSED = [
    # (overrides, what the one line must say)
    # infinities and nan, in every float field (fedsim.config.Section)
    (("client.lr=.inf",), "client.lr: inf is not a finite number"),
    (("client.timeout_s=.inf",), "client.timeout_s: inf is not a finite number"),
    (("client.weight_decay=.inf",), "client.weight_decay: inf"),
    (("strategy.name=fedprox", "strategy.mu=.inf"), "strategy.mu: inf"),
    (("faults.slow=[1]", "faults.slow_s=.inf"), "faults.slow_s: inf"),
    (("loss.aux.name=palm_z_loss", "loss.aux.weight=.inf"), "loss.aux.weight: inf"),
    (("loss.label_smoothing=.nan",), "label_smoothing: nan is not a finite number"),
    ((*FEDBUFF, "strategy.horizon=.inf"), "strategy.horizon: inf"),
    (("partition.alpha=.inf",), "partition.alpha: inf is not a finite number"),
    (("partition.alpha=.nan",), "partition.alpha: nan"),
    (("strategy.server_opt.lr=-.inf",), "strategy.server_opt.lr: -inf"),
    # booleans where a number is meant, a bad seed, a name leaving output.dir
    (("rounds=true",), "rounds: true is a boolean; expected an integer"),
    (("client.lr=false",), "client.lr: false is a boolean; expected a number"),
    (("faults.crash=[true]",), "faults.crash: true is a boolean"),
    (("quant.qat.weight_bits=true",), "quant.qat.weight_bits: true is a boolean; expected one of 2, 4, 8"),
    (("seed=-1",), "seed: Input should be greater than or equal to 0"),
    (("seed=4294967296",), "seed: Input should be less than or equal to 4294967295"),
    (("name=../../escape",), "name: the run directory's name, inside output.dir"),
    (("name=..",), "name: the run directory's name"),
    (("name=''",), "name: String should have at least 1 character"),
    # what cannot work: an image model on vectors, a parameter of another attack, groups too small
    (("data.name=synthetic", "model.name=cnn"), "model.name: 'cnn' takes images (C, H, W); data.name 'synthetic'"),
    (("data.name=synthetic", "model.name=resnet8"), "model.name: 'resnet8'"),
    (("model.name=char_lstm",), "model.name: 'char_lstm' embeds character indices; data.name 'digits' is not text"),
    (("data.name=shakespeare", "data.path=play.txt"),
     "model.name: 'mlp' takes features, not the character indices of data.name 'shakespeare'; use char_lstm"),
    (("data.name=shakespeare", "data.path=play.txt", "model.name=char_lstm", "partition.scheme=feature_noise"),
     "partition.scheme: 'feature_noise' adds Gaussian noise to the inputs; data.name 'shakespeare'"),
    (("data.name=shakespeare",), "data.path is required for data.name='shakespeare'"),
    (("data.min_samples=5",), "data.min_samples: 5 is not read with data.name 'digits'"),
    (("model.lstm_hidden=32",), "model.lstm_hidden: the LSTM width of char_lstm; model.name is 'mlp'"),
    (("attack.name=gaussian", "attack.fraction=0.2", "attack.scale=3"),
     "attack.scale: 3.0 is not a parameter of attack.name 'gaussian'"),
    (("attack.name=sign_flip", "attack.fraction=0.2", "attack.std=1"), "attack.std: 1.0 is not a parameter"),
    (("participation.model=cyclic", "participation.num_groups=3", "strategy.min_successful=4"),
     "strategy.min_successful: 4 replies needed, but participation.num_groups 3"),
    # options that do not apply where they are set, off their default
    (("sim.speeds.kind=lognormal",), "sim.speeds.kind: 'lognormal' is not read under strategy.name 'fedavg'"),
    (("sim.speeds.dropout=0.1",), "sim.speeds.dropout: 0.1 is not read under strategy.name"),
    ((*FEDBUFF, "sim.speeds.sigma=0.2"), "sim.speeds.sigma: 0.2 is not read under sim.speeds.kind 'linear'"),
    ((*TOPK, "quant.uplink.bits=4"), "quant.uplink.bits: 4 is not read by quant.uplink.codec 'topk'"),
    (("quant.uplink.fraction=0.1",), "quant.uplink.fraction: 0.1 is not read by quant.uplink.codec 'identity'"),
    ((*TOPK, "quant.uplink.error_feedback=ef", "quant.uplink.eta=0.1"),
     "quant.uplink.eta: 0.1 is read by error_feedback 'econtrol' only; quant.uplink.error_feedback is 'ef'"),
    (("strategy.name=gossip", "strategy.topology=ring", "strategy.degree=4"),
     "strategy.degree: 4 is read by topology 'regular' only; strategy.topology is 'ring'"),
    (("participation.model=bernoulli", "participation.p_off_to_on=0.5"),
     "participation.p_off_to_on: 0.5 is not read under participation.model 'bernoulli'"),
    (("participation.model=cyclic", "participation.p_low=0.5"),
     "participation.p_low: 0.5 is not read under participation.model 'cyclic'"),
    (("participation.model=bernoulli", "participation.tied_to_labels=true", "participation.p_high=0.7"),
     "participation.p_high: 0.7 is not read under participation.model 'bernoulli' with participation.tied_to_labels"),
    (("participation.num_groups=2",), "participation.num_groups: 2 is not read under participation.model 'uniform'"),
    (("partition.scheme=iid", "partition.alpha=0.3"), "partition.alpha: 0.3 is not read under partition.scheme 'iid'"),
    (("partition.classes_per_client=3",),
     "partition.classes_per_client: 3 is not read under partition.scheme 'dirichlet'"),
    (("data.synthetic.dim=10",), "data.synthetic.dim: 10 is not read with data.name 'digits'"),
    (("data.synthetic.num_devices=5",), "data.synthetic.num_devices: 5 is not read with data.name 'digits'"),
    (("data.hf_id=ylecun/mnist",), "data.hf_id: 'ylecun/mnist' is not read with data.name 'digits'"),
    (("data.path=/tmp/x.npz",), "data.path: '/tmp/x.npz' is not read with data.name 'digits'"),
    (("quant.ptq.method=rtn", "quant.ptq.calibration_samples=10"),
     "quant.ptq.calibration_samples: 10 is not read by quant.ptq.method 'rtn'"),
    (("faults.slow_s=3",), "faults.slow_s: 3.0 s stalls the clients of faults.slow, which is empty"),
    (("eval.federated=false", "strategy.fraction_evaluate=0.5"),
     "strategy.fraction_evaluate: 0.5 samples clients for federated evaluation, which eval.federated false"),
    # what cannot be honoured: a schedule too fine for its horizon
    ((*FEDBUFF, "strategy.eval_every=1e-9"), "strategy.eval_every: 1e-09 makes 2e+10 steps in strategy.horizon 20"),
    (("strategy.name=fedfix", "strategy.window=1e-6"), "strategy.window: 1e-06 makes 2e+07 steps"),
]


@pytest.mark.parametrize(("overrides", "words"), REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_a_hostile_input_is_refused_in_one_line_naming_its_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, list(overrides))
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert words in message, message


ACCEPTED = [
    # what applies, or stays at its default (a resolved config.yaml writes every key)
    (*TOPK, "quant.uplink.error_feedback=econtrol", "quant.uplink.eta=0.1"),
    ("quant.uplink.codec=qsgd", "quant.uplink.bits=4", "quant.uplink.block_size=64"),
    ("quant.ptq.method=awq", "quant.ptq.calibration_samples=64"),
    ("participation.model=markov", "participation.p_off_to_on=0.5", "participation.p_low=0.3"),
    ("participation.model=bernoulli", "participation.tied_to_labels=true", "participation.p_mean=0.4"),
    ("participation.model=cyclic", "participation.num_groups=2", "strategy.min_successful=5"),
    ("partition.scheme=pathological", "partition.classes_per_client=3"),
    ("partition.scheme=shards", "partition.shards_per_client=3"),
    ("data.name=synthetic", "data.synthetic.dim=10", "model.name=mlp"),
    ("data.name=shakespeare", "data.path=play.txt", "data.min_samples=5", "data.stride=3", "model.name=char_lstm",
     "model.lstm_hidden=32", "partition.scheme=natural"),
    ("faults.slow=[1]", "faults.slow_s=2"),
    ("eval.federated=false",),
    ("strategy.name=gossip", "strategy.topology=regular", "strategy.degree=4"),
    (*FEDBUFF, "sim.speeds.kind=lognormal", "sim.speeds.sigma=0.2", "sim.speeds.dropout=0.1"),
    (*FEDBUFF, "strategy.eval_every=0.001", "strategy.horizon=100"),
    ("attack.name=scaled", "attack.fraction=0.2", "attack.scale=5"),
    ("quant.qat.symmetric=false", "output.plots=false"),
    ("name=run-1.b",),
]


@pytest.mark.parametrize("overrides", ACCEPTED, ids=[" ".join(o) for o in ACCEPTED])
def test_what_applies_is_accepted_and_its_resolved_config_validates_again(overrides, tmp_path):
    cfg = load_config(QUICKSTART, list(overrides))
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("strategy", ["fedavg", "fedbuff", "gossip"])
def test_a_resolved_config_of_any_dataset_validates_again(strategy, tmp_path):
    for data in ("digits", "synthetic"):
        cfg = load_config(QUICKSTART, [f"strategy.name={strategy}", f"data.name={data}"])
        path = tmp_path / "config.yaml"
        path.write_text(cfg.to_yaml())
        assert load_config(path) == cfg


def test_a_duplicate_yaml_key_is_refused_in_one_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("rounds: 3\nclient:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: not valid YAML: duplicate key 'lr' at line 4"


def _preflight(tmp_path, *overrides: str) -> str:
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path / 'runs'}", *overrides])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    return message


@pytest.fixture
def vectors(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "vectors.npz"
    np.savez(path, x=rng.normal(size=(300, 6)).astype(np.float32), y=np.arange(300) % 3)
    return path


@pytest.mark.parametrize("model", ["cnn", "lenet5", "resnet8"])
def test_an_image_model_on_npz_vectors_is_refused_naming_both_keys(model, vectors, tmp_path):
    message = _preflight(tmp_path, "data.name=npz", f"data.path={vectors}", f"model.name={model}")
    assert message.startswith(f"model.name: {model!r} cannot take the samples of data.name 'npz', of shape (6,)")


def test_nan_inputs_in_an_npz_file_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    x[5, 1] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, x=x, y=np.arange(300) % 3)
    assert _preflight(tmp_path, "data.name=npz", f"data.path={path}") == (
        f"data: npz: {path} x holds 1 NaN or infinite values; inputs must be finite")


def test_an_output_dir_the_file_system_refuses_is_refused_and_nothing_is_left(tmp_path):
    assert _preflight(tmp_path, "output.dir=/proc/fedsim-runs").startswith(
        "output.dir: cannot create the run directory <name>-<timestamp> under /proc/fedsim-runs")
    assert "File name too long" in _preflight(tmp_path, "name=" + "x" * 300)
    preflight(load_config(QUICKSTART, [f"output.dir={tmp_path / 'a' / 'b'}"]))
    assert not (tmp_path / "a").exists()
