"""Importing torchao without the noise it logs on a CPU-only install.

torchao's ``__init__`` tries to load every CUDA extension it ships (``_C*.so``) and logs
``Failed to load .../torchao/_C_....so: ...`` at WARNING for each one a CPU build cannot
load, registers its ``KernelPreference`` and ``ScaleCalculationMode`` enums as pytree constants, which
``torch.utils._pytree`` reports as deprecated, and ``torchao.kernel.intmm`` warns "Detected
no triton" where Triton (GPU kernels) is not installed. None affects the code fedsim uses.
:func:`quiet_torchao_import` drops exactly these records (by logger and message) while
torchao is imported; every other record of those loggers still prints.
"""

from __future__ import annotations

import contextlib

from fedsim.notices import dropped_while

# (logger, message pattern) of each record dropped while torchao is imported
EXPECTED_NOISE = (
    ("torchao", r"^Failed to load \S*torchao/_C\w*\.\S*\.so: "),
    ("torch.utils._pytree", r"^<enum '(KernelPreference|ScaleCalculationMode)'> is an Enum subclass and is now natively "
                            r"supported by torch\.compile"),
    ("torchao.kernel.intmm", r"^Warning: Detected no triton, on systems without Triton certain kernels"),
)


def quiet_torchao_import() -> contextlib.AbstractContextManager[None]:
    """Drop torchao's extension-load failures and its pytree deprecation record while
    the block (an ``import torchao...``) runs."""
    return dropped_while(EXPECTED_NOISE)
