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

The names above are importable from ``fedsim.quant`` directly; they load on first use
(``lazy_loader``, PEP 562), so that ``import fedsim.quant.codecs`` (clients and server) does
not pay for importing torchao.
"""

from __future__ import annotations

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "fake": ["fake_quantize"],
    "qat": ["QATRecipe", "prepare_qat", "convert", "set_qat_enabled", "QATController"],
    "lowbit": ["LowBitConfig", "prepare_lowbit"],
    "ptq": ["quantize_weights_rtn", "quantize_weights_awq"],
})
