"""Fashion-MNIST: the IDX reader, where the files are looked for, the real files, its OOD sets."""

import gzip
import os
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from keras_jem import data
from keras_jem.data import idx
from keras_jem.data import idx_datasets

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_bytes(array, type_code=0x08):
    """An IDX file written by hand from the format description (independent of the reader)."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path, content, compress):
    if compress:
        path, content = path + ".gz", gzip.compress(content)
    with open(path, "wb") as f:
        f.write(content)
    return path


def _write_split(directory, split, images, labels, compress=True):
    os.makedirs(directory, exist_ok=True)
    images_name, labels_name = FILES[split]
    _write(os.path.join(directory, images_name), _idx_bytes(images), compress)
    _write(os.path.join(directory, labels_name), _idx_bytes(labels), compress)


def _tiny_split(label, count=5):
    """`count` 28x28 images with pixel (i, j) of image k = (k + i + j) % 256; labels all `label`."""
    k, i, j = np.meshgrid(np.arange(count), np.arange(28), np.arange(28), indexing="ij")
    return ((k + i + j) % 256).astype(np.uint8), np.full(count, label, np.uint8)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty Keras cache and Debian directory: only what a test writes is found."""
    keras_home = tmp_path / "keras_home"
    system = tmp_path / "usr_share_datasets"
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    monkeypatch.setattr(idx_datasets, "SYSTEM_DATASETS_DIR", str(system))
    return {
        "data_dir": str(tmp_path / "data_dir"),
        "keras": str(keras_home / "datasets" / "fashion-mnist"),
        "debian": str(system / "fashion-mnist"),
        "empty": str(tmp_path / "empty"),
    }


# The IDX reader.


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_tiny_files(tmp_path, compress):
    images = np.array([[[0, 1, 2], [3, 4, 255]], [[10, 20, 30], [40, 50, 60]]], np.uint8)
    path = _write(str(tmp_path / "images-idx3-ubyte"), _idx_bytes(images), compress)
    out = idx.read_idx(path, expected_shape=(None, 2, 3))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)
    # Multi-byte big-endian types come back with the right values in native order.
    values = np.array([1, -2, 70000, -(2**31)], np.int32)
    path = _write(str(tmp_path / "values-idx1"), _idx_bytes(values, 0x0C), compress)
    out = idx.read_idx(path)
    assert out.dtype == np.dtype("int32") and out.dtype.isnative
    assert out.tolist() == [1, -2, 70000, -(2**31)]
    floats = np.array([[0.5, -1.25]], np.float32)
    path = _write(str(tmp_path / "floats-idx2"), _idx_bytes(floats, 0x0D), compress)
    assert idx.read_idx(path).tolist() == [[0.5, -1.25]]


def test_read_idx_rejects_corrupt_files(tmp_path):
    good = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))

    def read(content, name, **kwargs):
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(content)
        return idx.read_idx(path, **kwargs)

    with pytest.raises(idx.IDXFormatError, match=r"'.*bad_magic'.*magic number.*08 03"):
        read(b"\x00\x01" + good[2:], "bad_magic")
    with pytest.raises(idx.IDXFormatError, match="magic number.*found bytes 00 00 07 03"):
        read(b"\x00\x00\x07" + good[3:], "bad_type")
    with pytest.raises(idx.IDXFormatError, match=r"has 35 bytes.*needs exactly 40.*truncated"):
        read(good[:-5], "short")
    with pytest.raises(idx.IDXFormatError, match="longer than its header says"):
        read(good + b"\x00", "long")
    with pytest.raises(idx.IDXFormatError, match="truncated inside its header"):
        read(good[:9], "header")
    with pytest.raises(idx.IDXFormatError, match="too short"):
        read(b"\x00\x00", "tiny")
    with pytest.raises(idx.IDXFormatError, match=r"shape \(2, 3, 4\), expected \('any', 28, 28\)"):
        read(good, "dims", expected_shape=(None, 28, 28))
    with pytest.raises(idx.IDXFormatError, match=r"shape \(2, 3, 4\), expected \('any',\)"):
        read(good, "rank", expected_shape=(None,))
    with pytest.raises(idx.IDXFormatError, match="damaged gzip file"):
        read(gzip.compress(good)[:-12], "cut.gz")


# Where the files are looked for.


def test_lookup_order(isolated):
    # Each place holds files with a different label, so the label says which place was read.
    for place, label in (("data_dir", 1), ("keras", 2), ("debian", 3)):
        _write_split(isolated[place], "test", *_tiny_split(label))

    def label_read(**kwargs):
        _, labels = data.load("fashion_mnist", "test", **kwargs)
        return set(labels.tolist())

    assert label_read(data_dir=isolated["data_dir"]) == {1}
    assert label_read() == {2}
    assert label_read(data_dir=isolated["empty"]) == {2}  # an empty data_dir falls through
    for name in os.listdir(isolated["keras"]):
        os.remove(os.path.join(isolated["keras"], name))
    assert label_read() == {3}
    # data_dir may also hold a fashion-mnist/ subdirectory (uncompressed files here);
    # manual_dir (a directory of original archives) is searched after data_dir.
    nested = os.path.join(isolated["empty"], "fashion-mnist")
    _write_split(nested, "test", *_tiny_split(4), compress=False)
    assert label_read(data_dir=isolated["empty"]) == {4}
    assert label_read(manual_dir=isolated["empty"]) == {4}
    assert label_read(data_dir=isolated["data_dir"], manual_dir=isolated["empty"]) == {1}
    # A directory holding only one of the two files of a split does not count.
    _write_split(isolated["keras"], "test", *_tiny_split(5))
    os.remove(os.path.join(isolated["keras"], FILES["test"][1] + ".gz"))
    assert label_read() == {3}


def test_tiny_files_load_in_model_range(isolated):
    images, labels = _tiny_split(7, count=6)
    _write_split(isolated["debian"], "train", images, labels, compress=False)
    x, y = data.load("fashion_mnist", "train", num_examples=4)
    assert x.shape == (4, 28, 28, 1) and x.dtype == np.float32
    assert y.dtype == np.int64 and y.tolist() == [7] * 4
    # Pixel p -> p / 127.5 - 1, computed here from the pattern that was written.
    k, i, j = np.meshgrid(np.arange(4), np.arange(28), np.arange(28), indexing="ij")
    expected = ((k + i + j) % 256) / 127.5 - 1.0
    np.testing.assert_allclose(x[..., 0], expected, atol=1e-6)


def test_mismatched_or_bad_files_are_clear_errors(isolated):
    images, labels = _tiny_split(0, count=5)
    _write_split(isolated["debian"], "test", images, labels[:4])
    with pytest.raises(idx.IDXFormatError, match="5 images but .* 4 labels"):
        data.load("fashion_mnist", "test")
    _write_split(isolated["debian"], "test", images, np.full(5, 10, np.uint8))
    with pytest.raises(idx.IDXFormatError, match=r"labels in \[10, 10\], expected \[0, 9\]"):
        data.load("fashion_mnist", "test")
    _write_split(isolated["debian"], "test", images[:, :27], labels)
    with pytest.raises(idx.IDXFormatError, match=r"shape \(5, 27, 28\)"):
        data.load("fashion_mnist", "test")
    with pytest.raises(ValueError, match="Unknown split 'test\\[:10\\]'.*num_examples"):
        data.load("fashion_mnist", "test[:10]")


def test_missing_files_fail_fast_naming_the_three_ways(isolated):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotAvailableError) as error:
        data.load("fashion_mnist", "train", data_dir=isolated["empty"])
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"the missing-data error took {elapsed:.2f} s"
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert isolated["keras"] in message and "keras.datasets.fashion_mnist.load_data()" in message
    assert "--data_dir DIR" in message
    assert "train-images-idx3-ubyte" in message and "Nothing was downloaded" in message
    # Every searched directory is listed, in the search order.
    positions = [message.index(path) for path in
                 (isolated["empty"], isolated["keras"], isolated["debian"])]
    assert positions == sorted(positions)


# The real files (the Debian package dataset-fashion-mnist; .ci/run installs it).


def _real_dir_or_skip():
    info = data.get_info("fashion_mnist")
    if idx_datasets.find_files(info, "train") is None or idx_datasets.find_files(
        info, "test"
    ) is None:
        pytest.skip(
            "Fashion-MNIST files not found (searched "
            f"{[path for _, path in idx_datasets.search_dirs(info)]}); install them with "
            "`apt-get install dataset-fashion-mnist`"
        )
    return os.path.dirname(idx_datasets.find_files(info, "test")[0])


def _plain_read(path, offset):
    # What keras.datasets.fashion_mnist.load_data() does: fixed offsets, no checks.
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def test_real_files():
    directory = _real_dir_or_skip()
    x_train, y_train = data.load("fashion_mnist", "train")
    x_test, y_test = data.load("fashion_mnist", "test")
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_train.min() == -1.0 and x_train.max() == 1.0
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    raw_images = _plain_read(os.path.join(directory, FILES["test"][0] + ".gz"), 16)
    raw_labels = _plain_read(os.path.join(directory, FILES["test"][1] + ".gz"), 8)
    np.testing.assert_array_equal(y_test, raw_labels)
    np.testing.assert_allclose(x_test.reshape(-1), raw_images / 127.5 - 1.0, atol=1e-6)


def test_keras_cache_layout_agrees_with_keras(tmp_path):
    """Files in Keras' cache are what keras.datasets.fashion_mnist.load_data() reads, offline."""
    directory = _real_dir_or_skip()
    cache = tmp_path / "keras_home" / "datasets" / "fashion-mnist"
    cache.mkdir(parents=True)
    for pair in FILES.values():
        for name in pair:
            os.symlink(os.path.join(directory, name + ".gz"), cache / (name + ".gz"))
    script = textwrap.dedent(
        """
        import numpy as np
        import keras
        from keras_jem import data
        from keras_jem.data import idx_datasets
        idx_datasets.SYSTEM_DATASETS_DIR = "/nonexistent"  # only the Keras cache may be read
        (_, _), (x_keras, y_keras) = keras.datasets.fashion_mnist.load_data()
        x, y = data.load("fashion_mnist", "test")
        assert np.array_equal(y, y_keras), "labels differ"
        assert np.array_equal(np.round((x[..., 0] + 1) * 127.5), x_keras), "images differ"
        print("agree", len(y))
        """
    )
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "keras_home"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, check=False,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "agree 10000" in result.stdout


# OOD sets for Fashion-MNIST.


def _reference(count=50, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (count, 28, 28, 1)).astype(np.float32)


def test_fashion_mnist_ood_sets_shapes():
    names = data.ood_sets_for("fashion_mnist")
    assert set(names) == {"uniform_noise", "vertical_flip", "mnist_like_digits",
                          "interpolation", "constant"}
    reference = _reference()
    for name in names:
        images = data.load_ood(name, like="fashion_mnist", reference_images=reference,
                               num_examples=30, seed=3)
        assert images.shape == (30, 28, 28, 1) and images.dtype == np.float32, name
        assert images.min() >= -1.0 and images.max() <= 1.0, name
    constant = data.load_ood("constant", like="fashion_mnist", num_examples=30)
    assert np.all(constant.max(axis=(1, 2, 3)) == constant.min(axis=(1, 2, 3)))
    assert constant.std() > 0.3  # different images, different values
    assert data.ood_sets_for("digits") == ("uniform_noise", "interpolation", "faces", "photos")
    assert data.ood_sets_for("unknown_dataset") == ("uniform_noise", "interpolation")


def test_vertical_flip_is_the_reversed_rows():
    reference = _reference(count=7)
    flipped = data.load_ood("vertical_flip", like=(28, 28, 1), reference_images=reference)
    assert flipped.shape == reference.shape
    for k in range(7):
        for row in range(28):
            np.testing.assert_array_equal(flipped[k, row], reference[k, 27 - row])
    # More images than references: the references again, in order.
    more = data.load_ood("vertical_flip", like=(28, 28, 1), reference_images=reference,
                         num_examples=10)
    np.testing.assert_array_equal(more[7:], flipped[:3])
    with pytest.raises(ValueError, match="'vertical_flip'.*reference_images"):
        data.load_ood("vertical_flip", like=(28, 28, 1))


def test_mnist_like_digits_are_scikit_learn_digits_upscaled_and_padded():
    from scipy import ndimage
    from sklearn import datasets

    images = data.load_ood("mnist_like_digits", like="fashion_mnist", seed=5)
    assert images.shape == (1797, 28, 28, 1)
    # A 4-pixel background frame (MNIST: 20x20 digit box in 28x28), exactly -1.
    frame = np.ones((28, 28), bool)
    frame[4:24, 4:24] = False
    assert np.all(images[:, frame] == -1.0)
    # The 20x20 centre is each scikit-learn digit upscaled 2.5x, bilinearly, with pixel-centre
    # alignment: SciPy's zoom(order=1, grid_mode=True), an independent implementation.
    digits = datasets.load_digits().images / 8.0 - 1.0
    zoomed = ndimage.zoom(digits, (1, 2.5, 2.5), order=1, grid_mode=True, mode="nearest")
    centres = images[:, 4:24, 4:24, 0].reshape(1797, -1)
    zoomed = zoomed.reshape(1797, -1)
    distances = (
        (centres**2).sum(1)[:, None] + (zoomed**2).sum(1)[None] - 2 * centres @ zoomed.T
    )
    match = distances.argmin(1)
    assert np.abs(centres - zoomed[match]).max() < 1e-4
    # One seeded pass shows every digit once.
    assert sorted(match.tolist()) == list(range(1797))
    again = data.load_ood("mnist_like_digits", like="fashion_mnist", seed=5, num_examples=100)
    np.testing.assert_array_equal(again, images[:100])
