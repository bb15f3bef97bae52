"""Any labelled dataset saved as a numpy ``.npz`` archive."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedsim.data.array_dataset import ArrayDataset, split_train_test


def load_npz(
    path: str | Path, *, seed: int = 0, test_fraction: float = 0.2
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load ``x`` and ``y`` (and optionally ``x_test``, ``y_test``) from an ``.npz``.

    ``x`` keeps its sample shape, except that ``(N, H, W)`` images get a channel axis,
    ``(N, 1, H, W)``; uint8 inputs are taken as 8-bit pixels and scaled to [0, 1],
    other inputs are cast to float32 as they are. Labels must be non-negative
    integers; ``num_classes`` is the largest label plus one. float32 inputs stored
    uncompressed (``np.savez``) are memory-mapped, not read: a client's rows are read from
    the file when it takes them (with test arrays in the archive; a split copies the rows).

    Parameters
    ----------
    path : str or Path
        The archive.
    seed : int, default 0
        Seed of the train/test split when the archive has no test arrays.
    test_fraction : float, default 0.2
        Fraction held out when the archive has no test arrays.

    Returns
    -------
    tuple[ArrayDataset, ArrayDataset]
        ``(train, test)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz: {path} is not a file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: mapped if (mapped := _mapped(path, archive.zip, key)) is not None else archive[key]
                      for key in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ValueError(f"npz: {path} is not a readable .npz archive ({err})") from err
    missing = [key for key in ("x", "y") if key not in arrays]
    has_test = [key for key in ("x_test", "y_test") if key in arrays]
    if len(has_test) == 1:
        missing.append("y_test" if has_test == ["x_test"] else "x_test")
    if missing:
        raise ValueError(
            f"npz: {path} lacks the arrays {missing}; has {sorted(arrays)}; "
            "expected x, y and optionally both x_test, y_test"
        )
    x, y = _checked(path, arrays["x"], arrays["y"], "x", "y")
    if not has_test:
        num_classes = int(y.max()) + 1 if len(y) else 0
        full = ArrayDataset(x=x, y=y, num_classes=num_classes, name="npz")
        return split_train_test(full, test_fraction, seed)
    x_test, y_test = _checked(path, arrays["x_test"], arrays["y_test"], "x_test", "y_test")
    if x_test.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"npz: {path} x_test samples have shape {x_test.shape[1:]} but x samples "
            f"have {x.shape[1:]}"
        )
    num_classes = int(max(y.max(initial=-1), y_test.max(initial=-1))) + 1
    return (
        ArrayDataset(x=x, y=y, num_classes=num_classes, name="npz"),
        ArrayDataset(x=x_test, y=y_test, num_classes=num_classes, name="npz"),
    )


def _mapped(path: Path, archive: zipfile.ZipFile, key: str) -> np.memmap | None:
    """Member ``key`` of the archive as a read-only memory map, where it is a float32 array
    stored uncompressed; else None (it is read)."""
    info = archive.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        local = file.read(30)  # the member's local header: its name and extra field lengths follow
        file.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(file)
        offset = file.tell()
    if dtype != np.float32 or fortran or 0 in shape:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _checked(
    path: Path, x: np.ndarray, y: np.ndarray, x_key: str, y_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one ``(x, y)`` pair and convert it to float32 inputs, int64 labels."""
    if x.ndim < 2:
        raise ValueError(f"npz: {path} {x_key} has shape {x.shape}; expected (N, ...)")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(
            f"npz: {path} {y_key} has shape {y.shape}; expected ({len(x)},) to match {x_key}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"npz: {path} {y_key} has dtype {y.dtype}; labels must be integers")
    if len(y) and y.min() < 0:
        raise ValueError(f"npz: {path} {y_key} has a negative label {y.min()}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"npz: {path} {x_key} has dtype {x.dtype}; expected numbers")
    inputs = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
    if not np.isfinite(inputs).all():
        bad = int(np.size(inputs) - np.count_nonzero(np.isfinite(inputs)))
        raise ValueError(f"npz: {path} {x_key} holds {bad} NaN or infinite values; inputs must be finite")
    if inputs.ndim == 3:
        inputs = inputs[:, None, :, :]
    return inputs, y.astype(np.int64)
