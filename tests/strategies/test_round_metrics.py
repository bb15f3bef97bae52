"""Client-level outcomes of a round (:mod:`fedsim.strategies.evaluation`): the mean training
metrics and the federated evaluation every loop reports."""

import logging

import pytest
import torch
from flwr.app import Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedsim.strategies.evaluation import (
    ClientEvaluation,
    client_evaluations,
    federated_metrics,
    mean_train_metrics,
)
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


def _evaluate_reply(node: int, num_examples: int = 0, loss: float = 0.0, accuracy: float = 0.0,
                    error: str | None = None) -> Message:
    metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                        group_id="", created_at=0.0, ttl=100.0, message_type="evaluate")
    if error is not None:
        return Message(metadata=metadata, error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=error))
    record = MetricRecord({"num-examples": num_examples, "eval_loss": loss, "eval_accuracy": accuracy})
    return Message(metadata=metadata, content=RecordDict({"metrics": record}))


def test_federated_metrics_weigh_by_test_examples_and_leave_failed_clients_out(caplog):
    replies = [_evaluate_reply(100, 10, 1.0, 0.5), _evaluate_reply(101, error="ValueError: bad"),
               _evaluate_reply(102, 30, 2.0, 0.9), _evaluate_reply(103, 0, 0.0, 0.0)]
    with caplog.at_level(logging.WARNING, logger="fedsim.strategies.evaluation"):
        evaluations = client_evaluations(replies, {100: 0, 101: 1, 102: 2, 103: 3})
    assert "evaluation failed on client 1: ValueError: bad" in caplog.text
    assert evaluations == [ClientEvaluation(10, 1.0, 0.5), ClientEvaluation(30, 2.0, 0.9),
                           ClientEvaluation(0, 0.0, 0.0)]
    # a client without test examples counts in no mean and no percentile
    metrics = federated_metrics(evaluations)
    quantiles = metrics.pop("client_accuracy_quantiles")
    assert metrics == pytest.approx({
        "federated_loss": 1.75, "federated_accuracy": 0.8,
        "client_accuracy_p10": 0.54, "client_accuracy_p50": 0.7, "client_accuracy_p90": 0.86})
    assert quantiles == pytest.approx([0.5 + 0.4 * q / 100 for q in range(0, 101, 5)])
    assert federated_metrics([ClientEvaluation(0, 0.0, 0.0)]) == {} == federated_metrics([])
