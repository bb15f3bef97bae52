"""npz archives stored uncompressed are memory-mapped, compressed ones read: same arrays."""

import numpy as np

from fedsim.data import load_npz


def test_an_uncompressed_float32_archive_is_mapped_and_a_compressed_one_read_to_the_same_numbers(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.random((50, 3), dtype=np.float32), "y": np.arange(50) % 4,
              "x_test": rng.random((7, 3), dtype=np.float32), "y_test": np.arange(7) % 4}
    np.savez(tmp_path / "stored.npz", **arrays)
    np.savez_compressed(tmp_path / "compressed.npz", **arrays)
    (mapped, mapped_test), (read, read_test) = load_npz(tmp_path / "stored.npz"), load_npz(tmp_path / "compressed.npz")
    assert isinstance(mapped.x, np.memmap) and not mapped.x.flags.writeable
    assert not isinstance(read.x, np.memmap)
    for a, b in ((mapped, read), (mapped_test, read_test)):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(mapped.subset(np.array([3, 9])).x, arrays["x"][[3, 9]])
