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


def test_importing_torchao_under_logging_prints_no_triton_notice():
    code = "import logging; logging.basicConfig(level=logging.INFO); import fedsim.quant.qat"
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=True)
    assert "triton" not in result.stderr, result.stderr


def test_only_flowers_actor_termination_line_is_dropped(caplog):
    logger = logging.getLogger("flwr")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        logger.warning("Manually terminating %s", "ClientAppActor")
        logger.warning("Actor %s died", "ClientAppActor")
    assert [r.getMessage() for r in caplog.records] == ["Actor ClientAppActor died"]


def _partition_warnings(scheme: str, num_clients: int, **options) -> list[str]:
    import numpy as np

    from fedsim.data.partition import partition_indices

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        partition_indices(np.arange(600) % 10, scheme, num_clients, 0, **options)
    return [str(w.message) for w in caught]


def test_partitioning_prints_no_partitioner_notice():
    assert _partition_warnings("pathological", 3, classes_per_client=2) == []  # 4 of 10 labels held by no client
    assert _partition_warnings("shards", 10, shards_per_client=2) == []


def test_a_run_without_evaluation_plots_empty_axes_without_a_legend_warning(tmp_path):
    from fedsim.outputs.plots import plot_comparison, plot_run

    rows = [{"round": 1, "train_loss": 1.0}, {"round": 2, "train_loss": 0.5}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_run(rows, tmp_path)
        plot_comparison({"run": rows}, tmp_path / "report.png")
    assert [str(w.message) for w in caught] == []
