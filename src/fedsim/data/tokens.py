"""Text as blocks of token ids for a causal language model: tokenizers, and Shakespeare's roles
as documents.

A tokenizer is either trained here, a byte-level BPE (Sennrich et al., "Neural Machine
Translation of Rare Words with Subword Units", arXiv 1508.07909, on bytes as GPT-2 does) of
``vocab_size`` tokens learnt with the ``tokenizers`` library from the run's training text, or
read from a local directory's ``tokenizer.json``. ``tokenizers`` is imported when one is
built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.array_dataset import ArrayDataset
from fedsim.data.shakespeare import speeches_by_role


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer of at most ``vocab_size`` tokens (the 256 bytes, then the
    merges learnt from ``texts`` in order of frequency), deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path):
    """The tokenizer of a local directory (its ``tokenizer.json``) or of a ``tokenizer.json`` file."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer: {file} does not exist (a tokenizers tokenizer.json)")
    return Tokenizer.from_file(str(file))


def token_blocks(ids: list[int], seq_len: int) -> np.ndarray:
    """Non-overlapping blocks of ``seq_len + 1`` tokens, ``(N, seq_len + 1)`` int64; a block's
    last token is the next block's first, so every token but the first is predicted once."""
    count = max(0, (len(ids) - 1) // seq_len)
    values = np.asarray(ids[: count * seq_len + 1], dtype=np.int64)
    if count == 0:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    return np.lib.stride_tricks.sliding_window_view(values, seq_len + 1)[::seq_len].copy()


def load_shakespeare_tokens(path: str | Path, tokenizer: dict[str, Any], seq_len: int, test_fraction: float = 0.2,
                            min_samples: int = 10) -> tuple[ArrayDataset, ArrayDataset]:
    """Play text as token blocks, one natural client per speaking role.

    Each role's speech (:func:`fedsim.data.shakespeare.speeches_by_role`) is cut by
    characters: its first ``1 - test_fraction`` is training text, the rest held out. A ``bpe``
    tokenizer is trained on the roles' training texts; each text is then tokenized and cut into
    :func:`token_blocks`. ``y`` is a block's last token (the dataset's label contract; the
    model predicts every position, :meth:`fedsim.models.causal_lm.CausalLM.targets`).

    Parameters
    ----------
    path : str or Path
        Play text with speaker lines.
    tokenizer : dict
        ``{kind: bpe, vocab_size}`` or ``{kind: local, path}``.
    seq_len : int
        Tokens a block predicts.
    test_fraction : float, default 0.2
        Held-out share of each role's characters.
    min_samples : int, default 10
        Roles with fewer blocks (train and test together) are dropped.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)``, ``num_classes`` the tokenizer's vocabulary (a BPE's ``vocab_size``),
        ``groups`` the role.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shakespeare: {path} is not a play text file")
    speeches = speeches_by_role(path.read_text(encoding="utf-8", errors="replace"))
    cuts = {role: len(text) - int(np.ceil(test_fraction * len(text))) for role, text in speeches.items()}
    train_texts = {role: text[: cuts[role]] for role, text in speeches.items()}
    test_texts = {role: text[cuts[role] :] for role, text in speeches.items()}
    if tokenizer["kind"] == "bpe":
        encoder = train_bpe(list(train_texts.values()), tokenizer["vocab_size"])
    else:
        encoder = load_tokenizer(tokenizer["path"])
    pairs = []
    for role in speeches:
        train = token_blocks(encoder.encode(train_texts[role]).ids, seq_len)
        test = token_blocks(encoder.encode(test_texts[role]).ids, seq_len)
        if len(train) and len(train) + len(test) >= min_samples:
            pairs.append((train, test))
    if not pairs:
        raise ValueError(f"shakespeare: {path} has no role with {min_samples} or more blocks of {seq_len + 1} "
                         "tokens (data.min_samples, data.seq_len)")
    # a trained BPE may learn fewer merges than asked from a short text: its ids stay below
    vocab = tokenizer["vocab_size"] if tokenizer["kind"] == "bpe" else encoder.get_vocab_size()
    return tuple(_dataset([p[i] for p in pairs], vocab) for i in (0, 1))


def _dataset(blocks: list[np.ndarray], vocab: int) -> ArrayDataset:
    x = np.concatenate(blocks)
    groups = np.concatenate([np.full(len(b), role, dtype=np.int64) for role, b in enumerate(blocks)])
    return ArrayDataset(x=x, y=x[:, -1].copy(), num_classes=vocab, name="shakespeare", groups=groups)
