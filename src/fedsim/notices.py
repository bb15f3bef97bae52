"""Known notices of fedsim's dependencies that a user cannot act on, dropped precisely.

Each filter matches one message of one module; everything else those libraries say still
prints. Some notices are dropped only while the call that causes them runs: log records
with :func:`dropped_while` (Flower's ``run_simulation`` deprecation notice,
``fedsim.sim.flower_notices``; torchao's extension-load failures, its "no triton" line and
torch's pytree-enum line at torchao's import, ``fedsim.quant.torchao_import``), Python
warnings with :func:`warnings_dropped_while` (flwr-datasets' unused-classes warning and
pyarrow's SortOptions FutureWarning while fedsim partitions, ``fedsim.data.partition``).

- Ray (``ray._private.worker``, ``FutureWarning`` at ``ray.init``): "Tip: In future versions
  of Ray, Ray will no longer override accelerator visible devices env var if num_gpus=0 ...".
  fedsim gives clients without a GPU share ``num_gpus=0`` on purpose; the behaviour the tip
  announces does not change what a CPU client sees.
- Flower (logger ``flwr``, WARNING, in each Ray worker when the simulation engine shuts its
  actor pool down at the end of a run): "Manually terminating ClientAppActor", once per
  worker of every run; the engine ends its own actors, nothing went wrong.
- alembic (logger ``alembic.runtime.plugins``, INFO, when Flower's simulation sets up its
  state database): "setup plugin alembic.autogenerate.schemas" and six more, at the INFO
  level fedsim's command line logs at.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

RAY_ACCELERATOR_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator visible devices"


class DropMatching(logging.Filter):
    """Drops the records whose formatted message contains a match of ``pattern``."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


@contextlib.contextmanager
def dropped_while(records: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """Drop the records of each ``(logger name, message pattern)`` while the block runs."""
    filters = [(logging.getLogger(name), DropMatching(pattern)) for name, pattern in records]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


@contextlib.contextmanager
def warnings_dropped_while(filters: tuple[tuple[str, type[Warning], str], ...]) -> Iterator[None]:
    """Ignore the warnings of each ``(message pattern, category, module pattern)`` while the
    block runs; every other warning still shows."""
    with warnings.catch_warnings():
        for message, category, module in filters:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield


_FILTERS = {"alembic.runtime.plugins": DropMatching(r"^setup plugin \S+$"),
            "flwr": DropMatching(r"^Manually terminating ClientAppActor$")}


def quiet_known_notices() -> None:
    """Install the filters (idempotent: a logger gets its filter once)."""
    warnings.filterwarnings("ignore", message=RAY_ACCELERATOR_TIP, category=FutureWarning,
                            module=r"ray\._private\.worker")
    for name, drop in _FILTERS.items():
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)
