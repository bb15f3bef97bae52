"""No loss hard-codes a device or a dtype: outputs follow the inputs (meta device, float64)."""

import inspect
import pathlib
import re

import pytest
import torch

import fedsim.losses
from fedsim.losses import REGISTRY, build

STATE_SIZE = 32


def _available_inputs(device, dtype, binary):
    generator = torch.Generator().manual_seed(0)
    batch, classes, dim = 8, 4, 6
    targets = torch.randint(0, 2 if binary else classes, (batch,), generator=generator)
    tensors = {
        "logits": torch.randn(batch, 1 if binary else classes, generator=generator, dtype=dtype),
        "embeddings": torch.randn(batch, dim, generator=generator, dtype=dtype),
        "embeddings2": torch.randn(batch, dim, generator=generator, dtype=dtype),
        "classifier": torch.randn(classes, dim, generator=generator, dtype=dtype),
        "targets": targets,
        "indices": torch.randperm(STATE_SIZE, generator=generator)[:batch],
    }
    return {name: tensor.to(device).requires_grad_(tensor.is_floating_point()) for name, tensor in tensors.items()}


def _build(name):
    stateful = "num_samples" in inspect.signature(REGISTRY[name]).parameters
    return build(name, num_samples=STATE_SIZE) if stateful else build(name)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_loss_runs_forward_and_backward_on_the_meta_device(name):
    loss = _build(name).to("meta")
    available = _available_inputs("meta", torch.float32, binary=REGISTRY[name].task == "binary")
    value = loss(**{key: available[key] for key in loss.inputs})
    assert value.device.type == "meta"
    value.backward()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_loss_value_and_gradients_follow_the_input_dtype(name):
    loss = _build(name)
    available = _available_inputs("cpu", torch.float64, binary=REGISTRY[name].task == "binary")
    value = loss(**{key: available[key] for key in loss.inputs})
    assert value.dtype == torch.float64
    value.backward()
    for key in loss.inputs:
        if available[key].is_floating_point():
            assert available[key].grad is not None and available[key].grad.dtype == torch.float64


def test_library_source_names_no_device():
    source_dir = pathlib.Path(fedsim.losses.__file__).parent
    device_literal = re.compile(r"cuda|[\"'](cpu|mps|xpu|meta)[\"']|\.cpu\(\)|device\s*=\s*[\"']")
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(source_dir.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if device_literal.search(line)
    ]
    assert offenders == []
