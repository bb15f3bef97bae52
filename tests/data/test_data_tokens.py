"""Shakespeare's roles as token blocks: a BPE trained on the training text, blocks that
predict every token once, train and test cut per role."""

from __future__ import annotations

import numpy as np

from fedsim.data.tokens import load_shakespeare_tokens, token_blocks, train_bpe

PLAY = """First Citizen:
Before we proceed any further, hear me speak. We are accounted poor citizens.

All:
Speak, speak. Resolved, resolved. We know it, we know it.

First Citizen:
You are all resolved rather to die than to famish? Let us kill him, and we'll have corn.

MENENIUS:
What work's, my countrymen, in hand? where go you with bats and clubs? The matter? speak.
"""


def test_blocks_overlap_by_one_token_so_every_token_is_predicted_once():
    blocks = token_blocks(list(range(11)), 3)
    np.testing.assert_array_equal(blocks, [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
    assert token_blocks([1, 2, 3], 3).shape == (0, 4)


def test_the_bpe_is_byte_level_and_deterministic():
    first, second = train_bpe([PLAY], 300), train_bpe([PLAY], 300)
    ids = first.encode("What work's, countrymen? ünïcode").ids
    assert ids == second.encode("What work's, countrymen? ünïcode").ids
    assert first.decode(ids) == "What work's, countrymen? ünïcode"
    assert 256 < first.get_vocab_size() <= 300


def test_roles_are_clients_and_the_test_text_is_each_roles_end(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(PLAY * 3)
    train, test = load_shakespeare_tokens(path, {"kind": "bpe", "vocab_size": 300}, seq_len=4, test_fraction=0.25,
                                          min_samples=2)
    assert train.num_classes == test.num_classes == 300
    assert set(np.unique(train.groups)) == {0, 1, 2}  # First Citizen, All, MENENIUS
    assert train.x.shape[1] == 5 and np.array_equal(train.y, train.x[:, -1])
    citizen = train.x[train.groups == 0]
    assert len(citizen) > len(test.x[test.groups == 0]) > 0


def test_a_local_tokenizer_gives_its_own_vocabulary(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(PLAY * 3)
    (tmp_path / "tok").mkdir()
    train_bpe([PLAY], 280).save(str(tmp_path / "tok" / "tokenizer.json"))
    train, _ = load_shakespeare_tokens(path, {"kind": "local", "path": str(tmp_path / "tok")}, seq_len=4,
                                       min_samples=2)
    want = train_bpe([PLAY], 280)
    assert train.num_classes == want.get_vocab_size()
    first_role = next(iter(PLAY.split("\n\n"))).split(":\n", 1)[1].replace("\n", " ")
    np.testing.assert_array_equal(train.x[0], want.encode(first_role).ids[:5])
