import logging

from flwr.supercore.logger import warn_deprecated_feature

from fedsim.notices import _FILTERS
from fedsim.sim.flower_notices import quiet_run_simulation_notice


def test_only_the_run_simulation_notice_is_dropped_and_only_during_the_call(caplog):
    notice = ("The `run_simulation` function is deprecated and will be removed in a future version of Flower. "
              "Please use `flwr run` in the CLI instead to run your simulation.")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        with quiet_run_simulation_notice():
            warn_deprecated_feature(notice)  # what run_simulation logs
            warn_deprecated_feature("Passing `enable_tf_gpu_growth=True` is deprecated.")
        warn_deprecated_feature(notice)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "enable_tf_gpu_growth" in messages[0] and "run_simulation" in messages[1]
    assert logging.getLogger("flwr").filters == [_FILTERS["flwr"]]  # only the permanent one (fedsim.notices)
