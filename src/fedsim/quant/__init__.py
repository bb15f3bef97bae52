"""Quantized training and compressed updates.

Modules
-------
fake
    ``fake_quantize``: straight-through fake quantization in torchao's convention.
qat
    ``QATRecipe``, ``prepare_qat``, ``convert``, ``set_qat_enabled``, ``QATController``.
lowbit
    ``LowBitConfig``, ``prepare_lowbit``: quantized forward and backward passes.
ptq
    ``quantize_weights_rtn``, ``quantize_weights_awq``: post-training weight quantization.
codecs
    ``codecs.build(name, **kw)``: update codecs with exact byte counts.
error_feedback
    ``error_feedback.build(name, codec, **kw)``, ``ServerEstimate``: EF, EF21, EControl.

The names above are importable from ``fedsim.quant`` directly; they load on first use, so
that ``import fedsim.quant.codecs`` (clients and server) does not pay for importing torchao.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "fake_quantize": "fedsim.quant.fake",
    "QATRecipe": "fedsim.quant.qat",
    "prepare_qat": "fedsim.quant.qat",
    "convert": "fedsim.quant.qat",
    "set_qat_enabled": "fedsim.quant.qat",
    "QATController": "fedsim.quant.qat",
    "LowBitConfig": "fedsim.quant.lowbit",
    "prepare_lowbit": "fedsim.quant.lowbit",
    "quantize_weights_rtn": "fedsim.quant.ptq",
    "quantize_weights_awq": "fedsim.quant.ptq",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedsim.quant' has no attribute {name!r}")
