"""A normal run prints no notice the user cannot act on; the filters drop exactly those."""

import logging
import subprocess
import sys
import warnings

import fedsim  # noqa: F401  (installs the filters)
from fedsim.notices import quiet_known_notices


def test_importing_torchao_through_fedsim_prints_nothing():
    result = subprocess.run([sys.executable, "-W", "default", "-c", "import fedsim.quant.qat"],
                            capture_output=True, text=True, check=True)
    assert result.stderr == "" and result.stdout == ""


def _ray_warning(message: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_notices()
        warnings.warn_explicit(message, FutureWarning, "ray/_private/worker.py", 2051, module="ray._private.worker")
    return caught


def test_only_rays_accelerator_tip_is_dropped():
    tip = ("Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var if "
           "num_gpus=0 or num_gpus=None (default).")
    assert _ray_warning(tip) == []
    assert len(_ray_warning("Some other future change of Ray")) == 1


def test_only_alembics_plugin_setup_lines_are_dropped(caplog):
    logger = logging.getLogger("alembic.runtime.plugins")
    with caplog.at_level(logging.INFO, logger="alembic.runtime.plugins"):
        logger.info("setup plugin %s", "alembic.autogenerate.schemas")
        logger.info("plugin %s failed", "x")
    assert [r.getMessage() for r in caplog.records] == ["plugin x failed"]
