"""The registry, ``fedsim algorithms`` and third-party client features: what a plug-in gets
without touching fedsim."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from fedsim.algorithms import registry
from fedsim.algorithms.catalog import FEATURES, describe
from fedsim.cli import app
from fedsim.clients.features import ClientFeature
from fedsim.clients.hooks import ClientHook
from fedsim.clients.training_features import client_features
from fedsim.config import ConfigError, validate_config
from fedsim.runner import run_experiment

BUILT_IN = ["fedasync", "fedau", "fedavg", "fedbuff", "fedfix", "fedld", "fedlex", "fednova", "fedprox", "flag",
            "gossip", "krum", "median", "multikrum", "scaffold", "trimmed_mean"]


def test_every_built_in_algorithm_is_an_entry_point_whose_class_names_it():
    assert set(BUILT_IN) <= set(registry.names())
    for name in registry.names():
        algorithm = registry.get(name)
        assert algorithm.name == name and algorithm.Config.model_fields["name"].default == name
        assert algorithm.family() in ("sync", "async", "gossip", "custom")


def test_only_algorithms_whose_client_half_adds_records_send_client_records():
    class Extra(ClientFeature):
        def finish(self, ctx, update, steps):
            return {}

    assert [n for n in BUILT_IN if registry.get(n).sends_client_records()] == ["scaffold"]
    assert Extra().sends_records() and not ClientFeature().sends_records()


@pytest.mark.parametrize("bad", ["fedavgg", "", 3, ["fedavg"]])
def test_an_unknown_name_is_one_line_listing_the_known(bad):
    with pytest.raises(registry.UnknownAlgorithm) as err:
        registry.get(bad)
    assert str(err.value) == f"{bad!r} is not an algorithm; known: {', '.join(registry.names())}"


def test_the_catalogue_probes_features_by_validation():
    scaffold = describe("scaffold")
    assert scaffold.family == "sync" and "batched (stacked)" in scaffold.backends
    assert scaffold.client_state == ("scaffold-control", "scaffold-previous-control")
    assert set(scaffold.combines) | set(scaffold.refuses) == set(FEATURES)
    assert "client.optimizer: adam" in scaffold.refuses["adam clients"]
    for name in ("scaffold", "fednova", "fedau"):
        assert {"client-level DP (central)", "secure aggregation"} <= set(describe(name).combines)
    median = describe("median")
    assert "strategy.name 'median'" in median.refuses["client-level DP (central)"]
    assert "secagg.enabled" in median.refuses["secure aggregation"]
    fedbuff = describe("fedbuff")
    assert "participation (bernoulli)" in fedbuff.refuses and "QAT" in fedbuff.combines
    assert "client-level DP (central)" in fedbuff.combines  # per buffer
    assert "client-level DP (central)" in describe("fedfix").refuses
    assert [a.name for a in fedbuff.arguments] == ["horizon", "eval_every", "buffer_size", "eta_g"]


def test_fedsim_algorithms_lists_every_registered_algorithm_and_shows_one():
    runner = CliRunner()
    listed = runner.invoke(app, ["algorithms"], env={"COLUMNS": "300"})
    assert listed.exit_code == 0, listed.output
    assert all(f" {name} " in listed.output for name in registry.names())
    one = runner.invoke(app, ["algorithms", "krum"], env={"COLUMNS": "300"})
    assert one.exit_code == 0 and "num_byzantine" in one.output and "backends: inprocess" in one.output
    unknown = runner.invoke(app, ["algorithms", "nope"])
    assert unknown.exit_code == 2


class CountingTerm(ClientHook):
    """A loss term of 0 that counts its calls, with the stacked form too."""

    calls = {"one": 0, "stacked": 0}

    def extra_loss(self, model, logits):
        CountingTerm.calls["one"] += 1
        return logits.sum() * 0.0

    def stacked_extra_loss(self, params, logits, mask):
        CountingTerm.calls["stacked"] += 1
        return torch.zeros(logits.shape[0])


class Counting(ClientFeature):
    """A third-party training feature: on when client.weight_decay is 1e-6; refuses adam."""

    def __init__(self, cfg) -> None:
        pass

    @staticmethod
    def applies(cfg) -> bool:
        return cfg.client.weight_decay == 1e-6

    @classmethod
    def rules(cls, cfg):
        if cfg.client.optimizer == "adam":
            yield "client.optimizer: adam cannot combine with the counting feature (client.weight_decay 1e-6)"

    def hooks(self, ctx, start):
        return (CountingTerm(),)


@pytest.mark.parametrize("backend, form", [("inprocess", "one"), ("batched", "stacked")])
def test_a_registered_client_feature_is_composed_and_its_rules_are_checked(monkeypatch, tmp_path, backend, form):
    monkeypatch.setattr(registry, "client_feature_classes", lambda: (Counting,))
    monkeypatch.setattr(CountingTerm, "calls", {"one": 0, "stacked": 0})
    raw = {"rounds": 1, "partition": {"num_clients": 4}, "client": {"weight_decay": 1e-6, "local_steps": 2},
           "sim": {"backend": backend}, "eval": {"federated": False},
           "output": {"dir": str(tmp_path), "plots": False}}
    cfg = validate_config(raw)
    assert any(isinstance(f, Counting) for f in client_features(cfg))
    _, summary = run_experiment(cfg)
    assert summary["status"] == "completed" and CountingTerm.calls[form] > 0
    with pytest.raises(ConfigError, match="client.optimizer: adam cannot combine with the counting feature"):
        validate_config({**raw, "client": {**raw["client"], "optimizer": "adam"}})
