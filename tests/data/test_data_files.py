"""Loaders of on-disk formats: tiny files written here, read back exactly."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from fedsim.data import load_cifar10, load_mnist, load_npz, read_idx


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(directory, compress=False, num_train=3, num_test=2):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(num_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(num_test) + 5,
    }
    for name, array in arrays.items():
        data = _idx_bytes(array)
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files_exactly(tmp_path, compress):
    arrays = _write_mnist(tmp_path, compress=compress)
    train, test = load_mnist(tmp_path)
    assert train.x.shape == (3, 1, 28, 28) and test.x.shape == (2, 1, 28, 28)
    np.testing.assert_allclose(train.x[:, 0], arrays["train-images-idx3-ubyte"] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(test.y, [5, 6])
    assert train.y.dtype == np.int64 and train.num_classes == 10


def test_read_idx_keeps_header_shape_and_big_endian_values(tmp_path):
    values = np.array([[1, -2], [300, 4]], dtype=">i4")
    path = tmp_path / "ints.idx"
    path.write_bytes(struct.pack(">BBBBII", 0, 0, 0x0C, 2, 2, 2) + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), [[1, -2], [300, 4]])


def test_read_idx_rejects_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(path)


def test_read_idx_rejects_truncated_data(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(_idx_bytes(np.zeros((2, 3, 3)))[:-4])
    with pytest.raises(ValueError, match=r"shape \(2, 3, 3\) needs 18 data bytes; the file has 14"):
        read_idx(path)


def test_mnist_rejects_label_count_mismatch_and_missing_files(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(5)))
    with pytest.raises(ValueError, match="do not match"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


def _write_cifar(directory, per_batch=2):
    rng = np.random.default_rng(1)
    written = {}
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [(index + j) % 10 for j in range(per_batch)],
            b"batch_label": name.encode(),
        }
        (directory / name).write_bytes(pickle.dumps(batch))
        written[name] = batch
    return written


def test_cifar10_reads_python_batches_exactly(tmp_path):
    written = _write_cifar(tmp_path)
    train, test = load_cifar10(tmp_path)
    assert train.x.shape == (10, 3, 32, 32) and test.x.shape == (2, 3, 32, 32)
    first = written["data_batch_1"][b"data"][0]
    # Rows are channel-major: 1024 red, 1024 green, 1024 blue values.
    np.testing.assert_allclose(train.x[0, 1, 0, 5], first[1024 + 5] / 255.0, atol=1e-7)
    np.testing.assert_allclose(train.x[0].reshape(-1), first / 255.0, atol=1e-7)
    np.testing.assert_array_equal(train.y, [0, 1, 1, 2, 2, 3, 3, 4, 4, 5])
    np.testing.assert_array_equal(test.y, [5, 6])


def test_cifar10_rejects_missing_batch_missing_key_and_garbage(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(ValueError, match="lacks the keys"):
        load_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a pickled CIFAR batch"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path)


def test_npz_with_test_arrays_keeps_them(tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(4, 6)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.array([0, 1, 2, 1]), x_test=x[:2] * 2, y_test=np.array([4, 0]))
    train, test = load_npz(path)
    np.testing.assert_array_equal(train.x, x.astype(np.float32))
    np.testing.assert_array_equal(test.x, x[:2] * 2)
    assert train.num_classes == test.num_classes == 5 and test.y.tolist() == [4, 0]


def test_npz_without_test_arrays_is_split_and_images_get_a_channel(tmp_path):
    path = tmp_path / "d.npz"
    images = np.full((10, 5, 5), 255, dtype=np.uint8)
    np.savez(path, x=images, y=np.arange(10) % 2)
    train, test = load_npz(path, seed=0, test_fraction=0.2)
    assert train.x.shape == (8, 1, 5, 5) and test.x.shape == (2, 1, 5, 5)
    assert train.x.max() == 1.0 and train.num_classes == 2


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 2))}, r"lacks the arrays \['y'\]"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(2, int)}, r"expected \(3,\)"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3)}, "labels must be integers"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 0])}, "negative label"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3, int), "x_test": np.zeros((1, 2))}, "y_test"),
    ],
)
def test_npz_rejects_malformed_archives(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        load_npz(path)


def test_npz_rejects_a_file_that_is_no_archive(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        load_npz(path)
