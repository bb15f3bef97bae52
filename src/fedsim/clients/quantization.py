"""Quantized client training and compressed uplink, from the ``quant:`` config.

- ``prepare_training_model``: QAT (fake-quantized Linear/Conv2d, torchao where it fits) or
  low-bit training (quantized forward and backward). QAT switches on after
  ``start_fraction`` of the run's rounds: train in float first, quantized at the end.
- ``trained_state``: what the client sends of its model; under active QAT, the fake-quantized
  weights (the model it trained for), so the server aggregates models on the grid.
- ``Uplink``: the client's codec and error feedback. The error-feedback memory lives in the
  node's Flower ``Context.state`` (persistent per node across rounds in both backends), so it
  survives rounds in which the client is not sampled.
- ``restore_local_parameters`` / ``keep_local_parameters``: parameters the quantized model
  adds to the federated ones (LSQ's learned step sizes) are the client's own; they live in
  its Context state too, so a client continues from the step sizes it learned.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedsim.config import LinkSettings, QuantConfig
from fedsim.quant import codecs, error_feedback
from fedsim.quant.codecs import Codec, Payload
from fedsim.records import to_state_dict

EF_STATE_KEY = "uplink-error-feedback"
LOCAL_PARAMETERS_KEY = "local-parameters"


def qat_active(quant: QuantConfig, server_round: int, rounds: int) -> bool:
    """QAT is on from the first round after ``start_fraction * rounds``."""
    return quant.qat is not None and server_round > math.floor(quant.qat.start_fraction * rounds)


def prepare_training_model(model: nn.Module, quant: QuantConfig, server_round: int, rounds: int,
                           generator: torch.Generator | None = None) -> nn.Module:
    """The model the client trains: float, fake-quantized (QAT) or low-bit (its gradients'
    stochastic rounding drawn from ``generator``).

    Parameter names are unchanged, so the float weights are read back with the same
    ``ParamSpec`` as the plain model.
    """
    if quant.qat is not None:
        # imported here: torchao takes seconds to load and a float run never needs it
        from fedsim.quant.qat import QATRecipe, prepare_qat, set_qat_enabled

        q = quant.qat
        model = prepare_qat(model, QATRecipe(weight_bits=q.weight_bits, granularity=q.granularity,
                                             symmetric=q.symmetric, activation_bits=q.activation_bits,
                                             lsq=q.lsq, start_fraction=0.0))
        set_qat_enabled(model, qat_active(quant, server_round, rounds))
    elif quant.lowbit is not None:
        from fedsim.quant.lowbit import LowBitConfig, prepare_lowbit

        model = prepare_lowbit(model, LowBitConfig(bits=quant.lowbit.bits, grad_bits=quant.lowbit.grad_bits),
                               generator)
    return model


def trained_state(model: nn.Module, quant: QuantConfig, server_round: int, rounds: int) -> dict[str, torch.Tensor]:
    """What a client sends back of its trained ``model``: under active QAT the weights the
    quantized model computes with (on the quantization grid), else the float state."""
    state = model.state_dict()
    if qat_active(quant, server_round, rounds):
        from fedsim.quant.qat import quantized_weights

        state.update(quantized_weights(model))
    return state


def _local_parameters(model: nn.Module, federated: tuple[str, ...]) -> dict[str, nn.Parameter]:
    names = set(federated)
    return {n: p for n, p in model.named_parameters() if n not in names}


def restore_local_parameters(model: nn.Module, federated: tuple[str, ...], state: RecordDict) -> None:
    """Load the client's own parameters (those of ``model`` not named in ``federated``, e.g.
    LSQ step sizes) from its ``state``, where :func:`keep_local_parameters` left them."""
    if LOCAL_PARAMETERS_KEY not in state:
        return
    saved = to_state_dict(state[LOCAL_PARAMETERS_KEY])
    with torch.no_grad():
        for name, param in _local_parameters(model, federated).items():
            if name in saved and saved[name].shape == param.shape:
                param.copy_(saved[name])


def keep_local_parameters(model: nn.Module, federated: tuple[str, ...], state: RecordDict) -> None:
    """Store the client's own parameters of ``model`` in its ``state`` (none: nothing)."""
    local = _local_parameters(model, federated)
    if local:
        state[LOCAL_PARAMETERS_KEY] = ArrayRecord({n: p.detach().cpu().contiguous() for n, p in local.items()})


def build_codec(link: LinkSettings) -> Codec:
    """The codec of one link direction."""
    return codecs.build(link.codec, **link.codec_kwargs())


class Uplink:
    """Compress a client's flat update with the configured codec and error feedback."""

    def __init__(self, link: LinkSettings) -> None:
        self.link = link
        self.codec = build_codec(link)

    def _wrapper(self) -> error_feedback.ErrorFeedback:
        kwargs = {"eta": self.link.eta} if self.link.error_feedback == "econtrol" else {}
        return error_feedback.build(self.link.error_feedback, self.codec, **kwargs)

    def encode(self, update: torch.Tensor, state: RecordDict, generator: torch.Generator,
               reset: bool = False) -> Payload:
        """Encode ``update``, reading and writing the error-feedback memory in ``state``;
        ``reset`` starts from an empty memory (the server dropped this client's last reply
        and reset its copy of the EF21/EControl estimate)."""
        wrapper = self._wrapper()
        if EF_STATE_KEY in state and not reset:
            wrapper.load_state_dict(to_state_dict(state[EF_STATE_KEY]))
        payload = wrapper.compress(update, generator=generator)
        memory = wrapper.state_dict()
        if memory:
            state[EF_STATE_KEY] = ArrayRecord({k: v.contiguous() for k, v in memory.items()})
        return payload
