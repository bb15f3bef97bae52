"""The registry, build() and the client contract attributes (inputs, task)."""

import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn

import fedsim.losses as losses
from fedsim.losses import INPUTS, REGISTRY, RENAMED, TASKS, available, build

EXPECTED_NAMES = [
    "cross_entropy", "palm_z_loss", "spherical_z_loss", "compsum", "ldr_kl", "aldr_kl", "multi_similarity", "infonce", "sogclr",
    "isogclr", "orthogonal_projection", "harmonic", "centroid_triplet", "auc_mw", "dice", "anyloss", "ensloss",
    "linear_cross_entropy",
]  # fmt: skip

STATEFUL = {"aldr_kl", "sogclr", "isogclr"}


def test_registry_lists_every_loss_by_its_snake_case_name():
    assert available() == sorted(EXPECTED_NAMES)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_every_loss_declares_inputs_from_the_vocabulary_matching_its_forward(name):
    loss_class = REGISTRY[name]
    assert loss_class.inputs and set(loss_class.inputs) <= set(INPUTS)
    assert loss_class.task in TASKS
    forward_arguments = [p for p in inspect.signature(loss_class.forward).parameters if p != "self"]
    assert forward_arguments == list(loss_class.inputs)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_build_makes_each_loss_with_its_defaults(name):
    loss = build(name, num_samples=10) if name in STATEFUL else build(name)
    assert isinstance(loss, REGISTRY[name]) and isinstance(loss, nn.Module)


def test_build_passes_keyword_arguments():
    assert build("compsum", tau=0.5).tau == 0.5


def test_build_rejects_an_unknown_name_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"loss.name: 'focal' is not a loss; known: aldr_kl, anyloss, auc_mw"):
        build("focal")


@pytest.mark.parametrize("old, new", [("z_loss", "palm_z_loss"), ("zloss", "spherical_z_loss")])
def test_build_refuses_a_former_name_naming_its_new_one(old, new):
    with pytest.raises(ValueError, match=rf"loss.name: '{old}' was renamed '{new}'; use loss name '{new}'"):
        build(old)
    assert RENAMED[old] == new and old not in REGISTRY


def test_build_rejects_an_unknown_argument_naming_it():
    with pytest.raises(TypeError, match=r"loss 'compsum': unknown argument\(s\) temperature; accepted: tau"):
        build("compsum", temperature=1.0)


def test_build_requires_num_samples_for_stateful_losses():
    with pytest.raises(TypeError, match=r"missing required argument.*num_samples"):
        build("sogclr")


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("compsum", {"tau": -1.0}, "tau must be >= 0"),
        ("cross_entropy", {"reduction": "avg"}, "reduction: 'avg' is not a reduction"),
        ("anyloss", {"metric": "f2"}, "metric: 'f2' is not an AnyLoss metric"),
        ("aldr_kl", {"num_samples": 4, "alpha": 1.0}, "alpha must be > 1"),
        ("sogclr", {"num_samples": 0}, "num_samples must be a positive int"),
        ("isogclr", {"num_samples": 4, "temperature": 1.0}, r"temperature must lie in \[tau_min, tau_max\]"),
    ],
)
def test_build_rejects_bad_values_naming_the_argument(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(name, **kwargs)


def test_losses_reject_mismatched_inputs_with_a_clear_message():
    with pytest.raises(ValueError, match=r"CompSumLoss: targets must have shape \(4,\)"):
        losses.CompSumLoss()(torch.randn(4, 3), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, num_samples=4\)"):
        losses.SogCLRLoss(num_samples=4)(torch.randn(3, 2), torch.randn(3, 2), torch.tensor([0, 1, 9]))
    with pytest.raises(ValueError, match="binary targets must be 0 or 1"):
        losses.EnsLoss()(torch.randn(3), torch.tensor([0, 1, 2]))


def test_client_contract_call_works_for_every_loss():
    generator = torch.Generator().manual_seed(0)
    available_inputs = {
        "logits": torch.randn(6, 2, generator=generator),
        "targets": torch.tensor([0, 1, 0, 1, 1, 0]),
        "embeddings": torch.randn(6, 4, generator=generator),
        "embeddings2": torch.randn(6, 4, generator=generator),
        "indices": torch.arange(6),
        "classifier": torch.randn(2, 4, generator=generator),
    }
    for name in EXPECTED_NAMES:
        loss = build(name, num_samples=6) if name in STATEFUL else build(name)
        value = loss(**{k: available_inputs[k] for k in loss.inputs})
        assert value.dim() == 0 and torch.isfinite(value), name


def test_importing_the_library_pulls_in_no_federation_code():
    code = (
        "import sys, fedsim.losses; "
        "print([m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray', 'pydantic') "
        "or m.startswith(('fedsim.sim', 'fedsim.clients', 'fedsim.strategies', 'fedsim.config'))])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
