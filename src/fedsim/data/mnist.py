"""MNIST (and MNIST-format datasets such as Fashion-MNIST) from local idx files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fedsim.data.array_dataset import ArrayDataset

# idx type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed, by a ``.gz`` suffix).

    Parsed with numpy because no maintained library in fedsim's stack reads idx
    files without also downloading them (torchvision is not a dependency).

    Parameters
    ----------
    path : str or Path
        The idx file.

    Returns
    -------
    np.ndarray
        The array, in native byte order, with the shape stored in the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an idx file (magic number {raw[:4].hex() or 'missing'}; "
            f"expected 0000 then a type byte in "
            f"{', '.join(f'{code:02x}' for code in _IDX_DTYPES)} and the rank)"
        )
    dtype = _IDX_DTYPES[raw[2]]
    rank = raw[3]
    header_end = 4 + 4 * rank
    if len(raw) < header_end:
        raise ValueError(f"{path}: idx header promises {rank} dimensions but the file ends")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise ValueError(
            f"{path}: idx header shape {shape} needs {expected} data bytes; "
            f"the file has {len(raw) - header_end}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def load_mnist(path: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """Load MNIST from a directory of idx files, with its official test split.

    Parameters
    ----------
    path : str or Path
        Directory with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each possibly
        with a ``.gz`` suffix.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)`` with ``x`` of shape ``(N, 1, 28, 28)`` in [0, 1].
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"mnist: {directory} is not a directory")
    arrays = {}
    for split, (image_name, label_name) in _FILES.items():
        images = read_idx(_find(directory, image_name))
        labels = read_idx(_find(directory, label_name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"mnist: {split} images of shape {images.shape} and labels of shape "
                f"{labels.shape} do not match; expected (N, H, W) and (N,)"
            )
        arrays[split] = ArrayDataset(
            x=(images.astype(np.float32) / 255.0)[:, None, :, :],
            y=labels.astype(np.int64),
            num_classes=10,
            name="mnist",
        )
    return arrays["train"], arrays["test"]


def _find(directory: Path, name: str) -> Path:
    """Return ``directory/name`` or its ``.gz`` version, whichever exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"mnist: {directory} holds neither {name} nor {name}.gz")
