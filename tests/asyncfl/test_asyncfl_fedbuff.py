"""FedBuff: buffer K arrivals, apply the mean of staleness-scaled deltas."""

import math

import pytest
import torch

from fedsim.algorithms.fedbuff import FedBuff, fedbuff_aggregate, staleness_scale


def test_staleness_scale_hand_values():
    assert staleness_scale(0) == 1.0
    assert staleness_scale(3) == pytest.approx(0.5)
    assert staleness_scale(8) == pytest.approx(1.0 / 3.0)


def test_fedbuff_aggregate_hand_values():
    updates = torch.tensor([[2.0, 2.0], [4.0, 0.0]])
    new = fedbuff_aggregate(torch.ones(2), updates, [3, 0], eta_g=0.5)
    # scaled: [1, 1] and [4, 0]; mean [2.5, 0.5]; times eta_g 0.5
    torch.testing.assert_close(new, torch.tensor([2.25, 1.25]))


def test_fedbuff_aggregate_adds_the_noise_to_the_mean_before_eta_g():
    updates = torch.tensor([[2.0, 2.0], [4.0, 0.0]])
    new = fedbuff_aggregate(torch.ones(2), updates, [3, 0], eta_g=0.5, noise=torch.tensor([1.0, -1.0]))
    # mean [2.5, 0.5] plus noise [3.5, -0.5]; times eta_g 0.5, plus the model
    torch.testing.assert_close(new, torch.tensor([2.75, 0.75]))


def test_fedbuff_flushes_every_k_arrivals():
    server = FedBuff(buffer_size=3, eta_g=1.0)
    model = torch.zeros(2)
    flushed_at = []
    for arrival in range(7):
        server.add(torch.ones(2), base_version=server.version)
        if server.is_full:
            model = server.flush(model)
            flushed_at.append(arrival)
    assert flushed_at == [2, 5]
    assert server.version == 2
    assert len(server) == 1
    torch.testing.assert_close(model, torch.full((2,), 2.0))


def test_fedbuff_scales_stale_updates():
    server = FedBuff(buffer_size=2, eta_g=1.0)
    model = torch.zeros(2)
    for _ in range(3):  # three fresh flushes of zero updates: version 3
        server.add(torch.zeros(2), base_version=server.version)
        server.add(torch.zeros(2), base_version=server.version)
        model = server.flush(model)
    assert server.version == 3
    assert server.add(torch.tensor([2.0, 2.0]), base_version=0) == 3  # scale 1/2
    assert server.add(torch.tensor([4.0, 0.0]), base_version=2) == 1  # scale 1/sqrt(2)
    model = server.flush(model)
    expected = (torch.tensor([1.0, 1.0]) + torch.tensor([4.0, 0.0]) / math.sqrt(2.0)) / 2
    torch.testing.assert_close(model, expected)
    assert server.version == 4 and len(server) == 0


def test_fedbuff_refuses_overfull_and_empty_buffers():
    server = FedBuff(buffer_size=1)
    with pytest.raises(ValueError, match="buffer is empty"):
        server.flush(torch.zeros(1))
    server.add(torch.zeros(1), base_version=0)
    with pytest.raises(ValueError, match="flush before adding more"):
        server.add(torch.zeros(1), base_version=0)
    with pytest.raises(ValueError, match="base_version 5 is not in"):
        FedBuff().add(torch.zeros(1), base_version=5)


def test_fedbuff_aggregate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match the model"):
        fedbuff_aggregate(torch.zeros(3), torch.zeros(2, 4), [0, 0])
    with pytest.raises(ValueError, match="2 updates but 1 stalenesses"):
        fedbuff_aggregate(torch.zeros(4), torch.zeros(2, 4), [0])
