"""LEAF's Shakespeare: play text split by speaking role, LEAF's JSON, LEAF's vocabulary."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedsim.data import load_dataset
from fedsim.data.shakespeare import (
    ALL_LETTERS,
    SEQ_LENGTH,
    encode,
    load_shakespeare,
    speeches_by_role,
    windows,
)

TINY = Path(__file__).parents[3] / "shared" / "data" / "tinyshakespeare.txt"

PLAY = """\
First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?
Let us kill him, and we'll have corn at our own price.

MENENIUS: Why, masters, my good friends,   mine honest neighbours,
Will you undo yourselves?

Here the citizens murmur, a paragraph without a speaker line.
"""


def test_vocabulary_is_leafs_eighty_characters():
    assert len(ALL_LETTERS) == 80 and len(set(ALL_LETTERS)) == 80 and SEQ_LENGTH == 80
    np.testing.assert_array_equal(encode("Ab\n}"), [ALL_LETTERS.index(c) for c in "Ab\n}"])
    np.testing.assert_array_equal(encode("a$é"), encode("a  "))  # outside the vocabulary: a space


def test_speeches_are_joined_per_role_in_order_of_appearance():
    speeches = speeches_by_role(PLAY)
    assert list(speeches) == ["First Citizen", "All", "MENENIUS"]
    assert speeches["All"] == "Speak, speak."
    assert speeches["First Citizen"] == ("Before we proceed any further, hear me speak. You are all resolved "
                                         "rather to die than to famish? Let us kill him, and we'll have corn at "
                                         "our own price.")
    assert speeches["MENENIUS"].startswith("Why, masters, my good friends, mine honest")  # spaces collapsed
    assert speeches["MENENIUS"].endswith("yourselves? Here the citizens murmur, a paragraph without a speaker line.")


def test_windows_are_the_eighty_characters_before_each_character():
    codes = np.arange(100) % 80
    x, y = windows(codes)
    assert x.shape == (20, 80) and x.dtype == np.int64 and y.dtype == np.int64
    np.testing.assert_array_equal(x[3], codes[3:83])
    assert y[3] == codes[83]
    x2, y2 = windows(codes, stride=7)
    np.testing.assert_array_equal(x2, x[::7])
    np.testing.assert_array_equal(y2, y[::7])
    assert windows(codes[:80])[0].shape == (0, 80)


def test_play_text_gives_one_group_per_role_and_a_split_per_role(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text(PLAY)
    train, test = load_dataset("shakespeare", path=path, test_fraction=0.25, min_samples=5)
    speeches = speeches_by_role(PLAY)
    kept = [role for role, text in speeches.items() if len(text) - 80 >= 5]
    assert kept == ["First Citizen", "MENENIUS"]  # All speaks 13 characters: no sample
    assert train.num_classes == 80 and train.x.shape[1:] == (80,) and train.x.dtype == np.int64
    for role, text in enumerate(speeches[name] for name in kept):
        n = len(text) - 80
        held = int(np.ceil(0.25 * n))
        assert (train.groups == role).sum() == n - held and (test.groups == role).sum() == held
        codes = encode(text)
        np.testing.assert_array_equal(train.x[train.groups == role][0], codes[:80])  # the role's first window
        assert test.y[test.groups == role][-1] == codes[-1]  # the role's last character is held out
    with pytest.raises(ValueError, match="no role with 1000 or more samples"):
        load_shakespeare(path, min_samples=1000)


def _leaf_user(text):
    return {"x": [text[i : i + 80] for i in range(len(text) - 80)], "y": [text[i + 80] for i in range(len(text) - 80)]}


def test_leaf_json_file_and_leafs_own_train_test_folders(tmp_path):
    speeches = speeches_by_role(PLAY)
    users = {"THE_FIRST_CITIZEN": _leaf_user(speeches["First Citizen"]),
             "THE_MENENIUS": _leaf_user(speeches["MENENIUS"])}
    document = {"users": list(users), "num_samples": [len(u["y"]) for u in users.values()], "user_data": users}
    (tmp_path / "all_data.json").write_text(json.dumps(document))
    from_json = load_shakespeare(tmp_path / "all_data.json", test_fraction=0.25, min_samples=5)
    (tmp_path / "play.txt").write_text(PLAY)
    from_text = load_shakespeare(tmp_path / "play.txt", test_fraction=0.25, min_samples=5)
    for a, b in zip(from_json, from_text, strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.groups, b.groups)

    for split, part in (("train", slice(0, 30)), ("test", slice(30, None))):
        (tmp_path / "leaf" / split).mkdir(parents=True)
        data = {u: {"x": d["x"][part], "y": d["y"][part]} for u, d in users.items()}
        (tmp_path / "leaf" / split / f"{split}.json").write_text(json.dumps({"users": list(users), "user_data": data}))
    train, test = load_shakespeare(tmp_path / "leaf", min_samples=5)
    assert np.bincount(train.groups).tolist() == [30, 30]
    assert len(test) == sum(len(d["y"]) for d in users.values()) - 60  # LEAF's split kept
    assert "".join(ALL_LETTERS[i] for i in train.x[0]) == users["THE_FIRST_CITIZEN"]["x"][0]


def test_malformed_leaf_json_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"users": ["u"], "user_data": {"u": {"x": ["short"], "y": ["a"]}}}))
    with pytest.raises(ValueError, match="user 'u' has an x of 5 characters; LEAF's are 80"):
        load_shakespeare(bad)
    bad.write_text(json.dumps({"people": []}))
    with pytest.raises(ValueError, match="is not LEAF's JSON"):
        load_shakespeare(bad)


@pytest.mark.skipif(not TINY.is_file(), reason=f"{TINY} is absent (CI has it at ../shared/data)")
def test_tinyshakespeare_splits_into_its_speaking_roles():
    train, test = load_shakespeare(TINY, min_samples=250, stride=40)
    roles = int(train.groups.max()) + 1
    assert 20 <= roles <= 60 and set(np.unique(test.groups)) == set(range(roles))
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
