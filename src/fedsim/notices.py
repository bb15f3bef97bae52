"""Known notices of fedsim's dependencies that a user cannot act on, dropped precisely.

Each filter matches one message of one module; everything else those libraries say still
prints. Flower's ``run_simulation`` deprecation notice is dropped where fedsim calls it
(``fedsim.sim.flower_notices``).

- Ray (``ray._private.worker``, ``FutureWarning`` at ``ray.init``): "Tip: In future versions
  of Ray, Ray will no longer override accelerator visible devices env var if num_gpus=0 ...".
  fedsim gives clients without a GPU share ``num_gpus=0`` on purpose; the behaviour the tip
  announces does not change what a CPU client sees.
- torchao (logger ``torchao``, at import): "Failed to load .../torchao/_C*.so" for each of
  its prebuilt C++/CUDA extensions that does not match this torch build. fedsim uses
  torchao's QAT fake quantizers, which are pure PyTorch.
- torch (logger ``torch.utils._pytree``, at torchao's import): "<enum ...> is an Enum
  subclass and is now natively supported by torch.compile ..." about torchao registering an
  enum as a pytree constant.
- alembic (logger ``alembic.runtime.plugins``, INFO, when Flower's simulation sets up its
  state database): "setup plugin alembic.autogenerate.schemas" and six more, at the INFO
  level fedsim's command line logs at.
"""

from __future__ import annotations

import logging
import warnings

RAY_ACCELERATOR_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator visible devices"
TORCHAO_EXTENSION = "Failed to load "
PYTREE_ENUM = "%s is an Enum subclass and is now natively supported by torch.compile"
ALEMBIC_PLUGIN = "setup plugin %s"


class _TorchaoExtensionLoad(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(TORCHAO_EXTENSION) and "torchao/_C" in message and ".so" in message)


class _PytreeEnumConstant(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(PYTREE_ENUM))


class _AlembicPluginSetup(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != ALEMBIC_PLUGIN


_FILTERS = {"torchao": _TorchaoExtensionLoad(), "torch.utils._pytree": _PytreeEnumConstant(),
            "alembic.runtime.plugins": _AlembicPluginSetup()}


def quiet_known_notices() -> None:
    """Install the filters (idempotent: a logger gets its filter once)."""
    warnings.filterwarnings("ignore", message=RAY_ACCELERATOR_TIP, category=FutureWarning,
                            module=r"ray\._private\.worker")
    for name, drop in _FILTERS.items():
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)
