"""LEAF's Shakespeare: next-character prediction, one natural client per speaking role.

Two sources give the same samples:

- LEAF's JSON, as its preprocessing writes it (``data/shakespeare/preprocess`` of
  TalwalkarLab/leaf): ``{"users": [...], "user_data": {user: {"x": [80-character strings],
  "y": [next characters]}}}``. A folder with ``train/`` and ``test/`` subfolders (LEAF's
  ``-t sample`` split) keeps LEAF's split; a single file, or a folder of files, is split
  per role here.
- Plain play text with speaker lines (``NAME:`` starting a paragraph, then the speech, as in
  Karpathy's tinyshakespeare): each role's speech is joined into one text, newlines become
  spaces and runs of spaces one space, and every character that has 80 before it is a sample
  (LEAF's ``txt_to_data`` in ``preprocess_shakespeare.py``, ``seq_length=80``, step 1).

Characters are indices into LEAF's vocabulary ``ALL_LETTERS``
(``models/utils/language_utils.py``), 80 characters; a character outside it becomes a space
(LEAF's ``str.find`` would give -1). Samples are ``x``: ``(N, 80)`` int64 windows and ``y``:
``(N,)`` int64 next characters; ``groups`` is the role of every sample.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from fedsim.data.array_dataset import ArrayDataset

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
"""LEAF's character vocabulary (TalwalkarLab/leaf, models/utils/language_utils.py)."""
NUM_LETTERS = len(ALL_LETTERS)
SEQ_LENGTH = 80
"""LEAF's window: 80 characters predict the 81st."""

_CODES = np.full(128, ALL_LETTERS.index(" "), dtype=np.int64)
_CODES[[ord(c) for c in ALL_LETTERS]] = np.arange(NUM_LETTERS)
_SPEAKER = re.compile(r"^([A-Z][A-Za-z' .&-]{0,60}):\s*(.*)$")
_SPACES = re.compile(r"  +")


def encode(text: str) -> np.ndarray:
    """Indices of ``text``'s characters in ``ALL_LETTERS``, int64; others become a space."""
    ascii_text = "".join(c if ord(c) < 128 else " " for c in text) if not text.isascii() else text
    return _CODES[np.frombuffer(ascii_text.encode("ascii"), dtype=np.uint8)]


def speeches_by_role(text: str) -> dict[str, str]:
    """Each role's speech, in order of first appearance, as LEAF joins it: newlines become
    spaces, runs of spaces one. A paragraph (lines between blank lines) starting ``NAME:``
    starts a speech by NAME (the speech may go on on the same line); a paragraph without a
    speaker line continues the previous speech; text before the first speaker is dropped."""
    lines: dict[str, list[str]] = {}
    role, new_paragraph = None, True
    for line in text.splitlines():
        if not line.strip():
            new_paragraph = True
            continue
        match = _SPEAKER.match(line.strip()) if new_paragraph else None
        new_paragraph = False
        if match:
            role = match.group(1).strip()
            line = match.group(2)
        if role is not None and line.strip():
            lines.setdefault(role, []).append(line.strip())
    return {name: _SPACES.sub(" ", " ".join(parts)) for name, parts in lines.items()}


def windows(codes: np.ndarray, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """LEAF's samples of one role's encoded text: the 80 characters before each character
    (every ``stride``-th one; LEAF takes every one) and that character."""
    if len(codes) <= SEQ_LENGTH:
        return np.zeros((0, SEQ_LENGTH), dtype=np.int64), np.zeros(0, dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(codes, SEQ_LENGTH + 1)[::stride]
    return np.ascontiguousarray(view[:, :SEQ_LENGTH]), np.ascontiguousarray(view[:, SEQ_LENGTH])


def load_shakespeare(
    path: str | Path, *, test_fraction: float = 0.2, min_samples: int = 10, stride: int = 1
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load LEAF's Shakespeare from LEAF's JSON or from play text, split per role.

    Parameters
    ----------
    path : str or Path
        A LEAF JSON file, a folder of them (``train/`` and ``test/`` subfolders keep LEAF's
        split), or a play text file with speaker lines (any other suffix).
    test_fraction : float, default 0.2
        Held-out fraction of each role's samples, its last ones (contiguous, so a test window
        shares no character with a training window but at the boundary); LEAF's ``--tf 0.8``.
        Not used when the folder has LEAF's own split.
    min_samples : int, default 10
        Roles with fewer samples (train and test together) are dropped: LEAF's ``-k``.
    stride : int, default 1
        Every ``stride``-th window of play text (LEAF: 1, a sample at every character, about
        640 bytes per character of text); JSON samples are all kept.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)``, ``groups`` the role index, roles numbered in order of appearance.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"shakespeare: {path} does not exist")
    if stride < 1:
        raise ValueError(f"shakespeare: stride {stride} must be >= 1")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"shakespeare: test_fraction {test_fraction} is not in (0, 1)")
    if path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir():
        train, test = _read_leaf_files(path / "train"), _read_leaf_files(path / "test")
        roles = [r for r in train if len(train[r][1]) + len(test.get(r, _EMPTY)[1]) >= min_samples]
        pairs = {r: (train[r], test.get(r, _EMPTY)) for r in roles}
    else:
        samples = _read_leaf_files(path) if path.is_dir() or path.suffix == ".json" else _read_play(path, stride)
        pairs = {r: _split(xy, test_fraction) for r, xy in samples.items() if len(xy[1]) >= min_samples}
        pairs = {r: p for r, p in pairs.items() if len(p[0][1])}
    if not pairs:
        raise ValueError(f"shakespeare: {path} has no role with {min_samples} or more samples (data.min_samples)")
    return _dataset([p[0] for p in pairs.values()]), _dataset([p[1] for p in pairs.values()])


_EMPTY = (np.zeros((0, SEQ_LENGTH), dtype=np.int64), np.zeros(0, dtype=np.int64))
Samples = tuple[np.ndarray, np.ndarray]


def _read_play(path: Path, stride: int) -> dict[str, Samples]:
    speeches = speeches_by_role(path.read_text(encoding="utf-8", errors="replace"))
    if not speeches:
        raise ValueError(f"shakespeare: {path} has no speaker line ('NAME:' starting a paragraph)")
    return {role: windows(encode(speech), stride) for role, speech in speeches.items()}


def _read_leaf_files(path: Path) -> dict[str, Samples]:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"shakespeare: {path} holds no .json file")
    parts: dict[str, list[Samples]] = {}
    for file in files:
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
            users, user_data = document["users"], document["user_data"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"shakespeare: {file} is not LEAF's JSON (users, user_data): {err}") from err
        for user in users:
            parts.setdefault(user, []).append(_leaf_samples(file, user, user_data[user]))
    return {user: (np.concatenate([x for x, _ in xy]), np.concatenate([y for _, y in xy])) for user, xy in parts.items()}


def _leaf_samples(file: Path, user: str, data: dict) -> Samples:
    xs, ys = data["x"], data["y"]
    if len(xs) != len(ys):
        raise ValueError(f"shakespeare: {file} user {user!r} has {len(xs)} x but {len(ys)} y")
    bad = next((s for s in xs if len(s) != SEQ_LENGTH), None)
    if bad is not None:
        raise ValueError(f"shakespeare: {file} user {user!r} has an x of {len(bad)} characters; "
                         f"LEAF's are {SEQ_LENGTH}")
    bad = next((c for c in ys if len(c) != 1), None)
    if bad is not None:
        raise ValueError(f"shakespeare: {file} user {user!r} has a y of {len(bad)} characters; expected one")
    return encode("".join(xs)).reshape(len(xs), SEQ_LENGTH), encode("".join(ys))


def _split(samples: Samples, test_fraction: float) -> tuple[Samples, Samples]:
    x, y = samples
    cut = len(y) - int(np.ceil(test_fraction * len(y)))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def _dataset(parts: list[Samples]) -> ArrayDataset:
    groups = np.concatenate([np.full(len(y), role, dtype=np.int64) for role, (_, y) in enumerate(parts)])
    return ArrayDataset(x=np.concatenate([x for x, _ in parts]), y=np.concatenate([y for _, y in parts]),
                        num_classes=NUM_LETTERS, name="shakespeare", groups=groups)
