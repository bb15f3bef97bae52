"""Flower's deprecation notice of ``run_simulation``, dropped where fedsim calls it.

Flower 1.41 logs "The `run_simulation` function is deprecated ... use `flwr run`" (WARNING,
logger ``flwr``) on every call, and the CLI printed it twice (Flower's own handler, then
the root handler fedsim installs). fedsim keeps calling ``run_simulation`` on purpose,
after trying Flower's supported path, ``flwr run`` against a SuperLink in simulation mode
(quickstart, 3 clients, 2 rounds, on this project's 2-core machine):

- ``flwr run`` with the managed local SuperLink (``address = ":local:"``) does not work
  offline: it starts ``flower-superlink --simulation`` with runtime dependency installation
  on (no option turns it off), so every run resolves the app's dependencies with ``uv
  sync`` against the package index (here it even found an unrelated PyPI project named
  fedsim and failed); that SuperLink must also start within a fixed 15 s (it did not,
  once, on the loaded machine) and keeps running after the run.
- with a SuperLink started by hand (``--simulation --disable-runtime-dependency-installation``)
  the numbers are identical, but start-up is slower (114 s against 100 s end to end: the
  SuperLink's own start, the app installed from a FAB, a ``flwr-simulation`` process per
  run), and the server loop runs in that other process, so fedsim would lose its in-process
  summary, progress bar and resume.

:func:`quiet_run_simulation_notice` drops exactly that record (by logger and message)
during the call; every other Flower record still prints.
"""

from __future__ import annotations

import contextlib
import re

from fedsim.notices import dropped_while

NOTICE = "The `run_simulation` function is deprecated"


def quiet_run_simulation_notice() -> contextlib.AbstractContextManager[None]:
    """Drop Flower's deprecation notice of ``run_simulation`` while the block runs."""
    return dropped_while((("flwr", re.escape(NOTICE)),))
