"""Attack registry and the choice of Byzantine clients."""

import pytest
import torch

from fedsim.attacks import ATTACKS, build_attack, choose_byzantine, sign_flip


def test_registry_names_and_targets():
    assert set(ATTACKS) == {"none", "sign_flip", "scaled", "gaussian", "alie", "ipm", "label_flip"}
    targets = {name: cls.acts_on for name, cls in ATTACKS.items()}
    assert targets["none"] == "none"
    assert targets["label_flip"] == "data"
    assert {targets[n] for n in ("sign_flip", "scaled", "gaussian", "alie", "ipm")} == {"updates"}


def test_built_attacks_apply_their_function():
    updates = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    attack = build_attack("sign_flip", scale=2.0)
    assert repr(attack) == "SignFlip(scale=2.0)"  # printable config
    torch.testing.assert_close(attack(updates, [2]), sign_flip(updates, [2], scale=2.0))
    noisy = build_attack("gaussian", std=0.5)(updates, [0], generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy[1:], updates[1:])
    flipped = build_attack("label_flip", num_classes=4)(torch.tensor([0, 3]))
    assert torch.equal(flipped, torch.tensor([3, 0]))


def test_build_attack_errors_name_the_problem():
    with pytest.raises(ValueError, match="'foo' is not an attack; known: none, sign_flip"):
        build_attack("foo")
    with pytest.raises(ValueError, match="attack 'ipm': bad parameters"):
        build_attack("ipm", eps=0.1)


def test_choose_byzantine_is_seeded_sorted_and_sized():
    ids = choose_byzantine(50, 0.3, seed=4)
    assert len(ids) == 15 and ids == sorted(set(ids)) and all(0 <= i < 50 for i in ids)
    assert choose_byzantine(50, 0.3, seed=4) == ids
    assert choose_byzantine(50, 0.3, seed=5) != ids
    assert len(choose_byzantine(10, 0.3, seed=0)) == 3  # 0.3 * 10 is 3.0000000000000004
    assert len(choose_byzantine(25, 0.1, seed=0)) == 2  # floor(2.5)
    assert choose_byzantine(7, 0.0, seed=0) == []
    with pytest.raises(ValueError, match="fraction"):
        choose_byzantine(10, 1.0, seed=0)
