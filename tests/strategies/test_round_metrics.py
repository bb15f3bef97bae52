"""Client-level outcomes of a round (:mod:`fedsim.strategies.evaluation`): the mean training
metrics every loop reports."""

import pytest
import torch

from fedsim.strategies.evaluation import mean_train_metrics
from fedsim.strategies.replies import ClientUpdate


def _update(pid: int, num_examples: int, **metrics) -> ClientUpdate:
    return ClientUpdate(pid, num_examples, torch.zeros(2), 8, metrics)


def test_mean_train_metrics_weigh_by_examples_over_the_replies_that_report_each():
    updates = [_update(0, 10, train_loss=1.0, train_accuracy=0.5), _update(1, 30, train_loss=2.0),
               _update(2, 60)]
    # train_loss: (10 * 1 + 30 * 2) / 40; train_accuracy: client 0's alone
    assert mean_train_metrics(updates) == pytest.approx({"train_loss": 1.75, "train_accuracy": 0.5})
    assert mean_train_metrics([_update(0, 10)]) == {}
    assert mean_train_metrics([]) == {}
