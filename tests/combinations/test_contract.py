"""What cannot combine is refused at validation, in one line naming both keys; what does
not apply to the strategy family is an error; the data and host checks of ``validate``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.config import ConfigError, load_config
from fedsim.preflight import preflight

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"

GOSSIP = ("strategy.name=gossip", "strategy.topology=ring")
FEDBUFF = ("strategy.name=fedbuff",)
TOPK = ("quant.uplink.codec=topk", "quant.uplink.fraction=0.1")

REFUSED = [
    # (overrides, keys the one line must name)
    ((*FEDBUFF, *TOPK, "quant.uplink.error_feedback=ef21"), ("quant.uplink.error_feedback", "strategy.name")),
    ((*GOSSIP, *TOPK, "quant.uplink.error_feedback=econtrol", "quant.uplink.eta=0.1"),
     ("quant.uplink.error_feedback", "strategy.name")),
    ((*FEDBUFF, "attack.name=sign_flip", "attack.fraction=0.2"), ("attack.name", "strategy.name")),
    ((*GOSSIP, "attack.name=alie", "attack.fraction=0.2"), ("attack.name", "strategy.name")),
    ((*GOSSIP, "quant.downlink.codec=qsgd"), ("quant.downlink.codec", "strategy.name")),
    ((*FEDBUFF, "participation.model=bernoulli"), ("participation", "strategy.name")),
    ((*GOSSIP, "participation.model=cyclic"), ("participation", "strategy.name")),
    ((*FEDBUFF, "rounds=50"), ("rounds", "strategy.horizon")),
    ((*FEDBUFF, "eval.every=5"), ("eval.every", "strategy.eval_every")),
    ((*FEDBUFF, "quant.qat.start_fraction=0.5"), ("quant.qat.start_fraction", "strategy.name")),
    (("strategy.name=gossip", "strategy.topology=torus", "partition.num_clients=10"),
     ("strategy.topology", "partition.num_clients")),
    (("strategy.name=gossip", "strategy.degree=10"), ("strategy.degree", "partition.num_clients")),
    (("strategy.name=gossip", "strategy.topology=erdos_renyi"), ("strategy.p", "erdos_renyi")),
    (("strategy.name=gossip", "strategy.topology=ring", "strategy.p=0.5"), ("strategy.p", "strategy.topology")),
    (("participation.model=bernoulli", "strategy.fraction_train=0.5"),
     ("strategy.fraction_train", "participation.model")),
    (("participation.model=cyclic", "participation.num_groups=11"),
     ("participation.num_groups", "partition.num_clients")),
    (("strategy.min_successful=11",), ("strategy.min_successful", "partition.num_clients")),
    (("strategy.fraction_train=0.5", "strategy.min_successful=6"), ("strategy.min_successful", "participation")),
    (("strategy.name=krum", "strategy.num_byzantine=10"), ("strategy.num_byzantine", "partition.num_clients")),
    (("strategy.name=multikrum", "strategy.m=11"), ("strategy.m", "partition.num_clients")),
    (("model.name=cnn", "model.hidden=[64]"), ("model.hidden", "model.name")),
    (("loss.reduction=sum",), ("loss.reduction", "client.lr")),
    (("loss.reduction=none",), ("loss.reduction", "mean")),
    (("loss.name=anyloss",), ("loss.name", "data.name")),
    (("loss.name=ensloss",), ("loss.name", "10 classes")),
    (("loss.name=palm_z_loss",), ("loss.name", "loss.aux.name")),
    (("faults.crash=[99]",), ("faults.crash", "partition.num_clients")),
    (("faults.nan=[-1]",), ("faults.nan", "partition.num_clients")),
    (("faults.rounds=[30]",), ("faults.rounds", "rounds")),
    (("attack.name=gaussian",), ("attack.fraction", "attack.name")),
    (("attack.fraction=0.2",), ("attack.fraction", "attack.name")),
    (("model.hidden=[-4]",), ("model.hidden",)),
    (("sim.speeds.kind=csv",), ("sim.speeds", "path")),
    (("sim.clock=wall",), ("sim.clock", "strategy.name")),
    (("sim.concurrency=4",), ("sim.concurrency", "strategy.name")),
]


@pytest.mark.parametrize(("overrides", "keys"), REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_what_cannot_combine_is_refused_in_one_line_naming_both_keys(overrides, keys):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, list(overrides))
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    for key in keys:
        assert key in message, (key, message)


ACCEPTED = [
    (*FEDBUFF, "quant.ptq.bits=4"),  # post-training quantization applies to every family
    (*GOSSIP, "quant.ptq.bits=4", "attack.name=label_flip", "attack.fraction=0.2"),
    (*FEDBUFF, *TOPK, "quant.uplink.error_feedback=ef"),
    ("strategy.name=gossip", "strategy.topology=torus", "partition.num_clients=12"),
    ("strategy.name=gossip", "strategy.topology=erdos_renyi", "strategy.p=0.6"),
    ("participation.model=cyclic", "participation.num_groups=10"),
    ("strategy.name=krum", "strategy.num_byzantine=9"),
    ("loss.name=auc_mw",),  # one-vs-rest: trains on 10 classes
    ("loss.name=cross_entropy", "loss.aux.name=palm_z_loss"),
    ("model.name=cnn", "model.hidden=[128]"),  # the default: a resolved config.yaml validates again
]


@pytest.mark.parametrize("overrides", ACCEPTED, ids=[" ".join(o) for o in ACCEPTED])
def test_what_combines_is_accepted(overrides):
    load_config(QUICKSTART, list(overrides))


def test_a_resolved_config_validates_again_for_every_family(tmp_path):
    for overrides in ((), FEDBUFF, GOSSIP):
        cfg = load_config(QUICKSTART, list(overrides))
        path = tmp_path / "config.yaml"
        path.write_text(cfg.to_yaml())
        assert load_config(path) == cfg


def test_the_server_learning_rate_defaults_per_optimizer():
    lr = {name: load_config(QUICKSTART, [f"strategy.server_opt.name={name}"]).strategy.server_opt.lr
          for name in ("sgd", "momentum", "adam", "adagrad", "yogi")}
    assert lr == {"sgd": 1.0, "momentum": 1.0, "adam": 0.01, "adagrad": 0.1, "yogi": 0.01}
    assert load_config(QUICKSTART, ["strategy.server_opt.name=adam", "strategy.server_opt.lr=0.1"]
                       ).strategy.server_opt.lr == 0.1


def _preflight_message(tmp_path, *overrides: str) -> str:
    cfg = load_config(QUICKSTART, [f"output.dir={tmp_path / 'runs'}", *overrides])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    return str(err.value)


def test_validate_loads_the_data_and_refuses_a_missing_empty_or_corrupt_file(tmp_path):
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip archive")
    (tmp_path / "folder").mkdir()
    for name, path, words in (("npz", tmp_path / "missing.npz", "is not a file"),
                              ("npz", tmp_path / "empty.npz", "data:"),
                              ("npz", tmp_path / "corrupt.npz", "not a readable .npz"),
                              ("mnist", tmp_path / "folder", "holds neither"),
                              ("cifar10", tmp_path / "folder", "is missing"),
                              ("hf", tmp_path / "folder", "data:")):
        message = _preflight_message(tmp_path, f"data.name={name}", f"data.path={path}")
        assert message.startswith("data:") and words in message and len(message.splitlines()) == 1, message


def test_validate_refuses_a_partition_the_data_cannot_fill(tmp_path):
    assert "2000 partitions" in _preflight_message(tmp_path, "partition.num_clients=2000")
    assert "500 shards" in _preflight_message(tmp_path, "partition.scheme=shards", "partition.shards_per_client=500")


def test_validate_checks_a_binary_loss_against_the_classes_of_a_loaded_file(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "three.npz"
    np.savez(path, x=rng.normal(size=(300, 4)).astype(np.float32), y=np.arange(300) % 3)
    message = _preflight_message(tmp_path, "data.name=npz", f"data.path={path}", "loss.name=anyloss")
    assert message.startswith("loss.name: 'anyloss' cannot train on 3 classes"), message
    binary = tmp_path / "two.npz"
    np.savez(binary, x=rng.normal(size=(300, 4)).astype(np.float32), y=np.arange(300) % 2)
    preflight(load_config(QUICKSTART, [f"output.dir={tmp_path / 'runs'}", "data.name=npz", f"data.path={binary}",
                                       "loss.name=anyloss"]))


def test_validate_checks_the_host(tmp_path):
    import torch

    (tmp_path / "a_file").write_text("x")
    assert _preflight_message(tmp_path, f"output.dir={tmp_path / 'a_file' / 'runs'}").startswith(
        f"output.dir: {tmp_path / 'a_file'} is not a directory")
    csv = tmp_path / "speeds.csv"
    csv.write_text("client,rate\n0,1\n")
    assert _preflight_message(tmp_path, "strategy.name=fedbuff", "sim.speeds.kind=csv",
                              f"sim.speeds.path={csv}").startswith("sim.speeds.path:")
    if not torch.cuda.is_available():
        assert _preflight_message(tmp_path, "sim.device=cuda").startswith("sim.device: 'cuda'")
        assert _preflight_message(tmp_path, "sim.num_gpus_per_client=1").startswith("sim.num_gpus_per_client:")
        # a cluster may have the GPUs this host lacks
        preflight(load_config(QUICKSTART, [f"output.dir={tmp_path / 'runs'}", "sim.num_gpus_per_client=1",
                                           "sim.ray_address=10.0.0.1:6379"]))
