"""Importing torchao without the noise it logs on a CPU-only install.

torchao's ``__init__`` tries to load every CUDA extension it ships (``_C*.so``) and logs
``Failed to load .../torchao/_C_....so: ...`` at WARNING for each one a CPU build cannot
load, and registers its ``KernelPreference`` enum as a pytree constant, which
``torch.utils._pytree`` reports as deprecated. Neither affects the CPU code fedsim uses.
:func:`quiet_torchao_import` drops exactly these records (by logger and message) while
torchao is imported; every other record of those loggers still prints.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

# (logger, message pattern) of each record dropped while torchao is imported
EXPECTED_NOISE = (
    ("torchao", re.compile(r"Failed to load \S*torchao/_C\w*\.\S*\.so: ")),
    ("torch.utils._pytree", re.compile(r"<enum 'KernelPreference'> is an Enum subclass and is now natively "
                                       r"supported by torch\.compile")),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


@contextlib.contextmanager
def quiet_torchao_import() -> Iterator[None]:
    """Drop torchao's extension-load failures and its pytree deprecation record while
    the block (an ``import torchao...``) runs."""
    filters = [(logging.getLogger(name), _DropMatching(pattern)) for name, pattern in EXPECTED_NOISE]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)
