"""Stateful losses: per-sample state lives in buffers; a state_dict round trip restores it exactly."""

import pytest
import torch

from fedsim.losses import ALDRKLLoss, ISogCLRLoss, SogCLRLoss

NUM_SAMPLES = 40


def _batches(stateful_inputs, count=4):
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        indices = torch.randperm(NUM_SAMPLES, generator=generator)[:10]
        if stateful_inputs == "logits":
            yield dict(
                logits=torch.randn(10, 4, generator=generator),
                targets=torch.randint(0, 4, (10,), generator=generator),
                indices=indices,
            )
        else:
            yield dict(
                embeddings=torch.randn(10, 5, generator=generator),
                embeddings2=torch.randn(10, 5, generator=generator),
                indices=indices,
            )


CASES = [
    (lambda: ALDRKLLoss(NUM_SAMPLES), "logits", ("lambdas",)),
    (lambda: SogCLRLoss(NUM_SAMPLES), "views", ("u",)),
    (lambda: ISogCLRLoss(NUM_SAMPLES, eta=0.1), "views", ("u", "tau", "tau_grad")),
]


@pytest.mark.parametrize("make, kind, buffers", CASES, ids=["aldr_kl", "sogclr", "isogclr"])
def test_state_dict_round_trip_restores_identical_subsequent_outputs(make, kind, buffers):
    batches = list(_batches(kind, count=5))
    trained = make()
    for batch in batches[:3]:
        trained(**batch)
    assert set(buffers) <= set(trained.state_dict())
    restored = make()
    restored.load_state_dict(trained.state_dict())
    fresh = make()
    for batch in batches[3:]:
        expected = trained(**batch)
        torch.testing.assert_close(restored(**batch), expected, rtol=0, atol=0)
        assert not torch.equal(fresh(**batch), expected)
    for name in buffers:
        assert torch.equal(getattr(restored, name), getattr(trained, name))


@pytest.mark.parametrize("make, kind, buffers", CASES, ids=["aldr_kl", "sogclr", "isogclr"])
def test_state_changes_only_for_the_batch_samples(make, kind, buffers):
    loss = make()
    before = {name: getattr(loss, name).clone() for name in buffers}
    batch = next(_batches(kind, count=1))
    loss(**batch)
    untouched = torch.ones(NUM_SAMPLES, dtype=torch.bool)
    untouched[batch["indices"]] = False
    for name in buffers:
        after = getattr(loss, name)
        assert torch.equal(after[untouched], before[name][untouched])
        assert not torch.equal(after[~untouched], before[name][~untouched])
