"""Datasets stored as IDX files on disk (Fashion-MNIST): where to find them and how to load them.

A dataset whose `DatasetInfo` has `idx_files` is looked for, split by split, in this order:

1. `data_dir` (the `--data_dir` flag), or its `<idx_dirname>` subdirectory (then the same for
   `manual_dir`, the directory of original archives, when given);
2. Keras' cache, `$KERAS_HOME/datasets/<idx_dirname>` (default `~/.keras/datasets/...`), where
   `keras.datasets.fashion_mnist.load_data()` keeps the same four files, so both agree;
3. the Debian/Ubuntu package's directory `/usr/share/datasets/<idx_dirname>`
   (`apt-get install dataset-fashion-mnist`).

Each file may be gzipped (`*.gz`, as distributed) or not. Nothing is downloaded here: with
`download=True` and no local files, `keras_jem.data.load` falls back to TFDS.
"""

import os

import numpy as np

from keras_jem.data import idx

SYSTEM_DATASETS_DIR = "/usr/share/datasets"


def keras_cache_dir():
    """Keras' dataset cache, resolved as `keras.utils.get_file` does.

    `$KERAS_HOME/datasets` when `KERAS_HOME` is set, else `~/.keras/datasets` (`/tmp/.keras/...`
    when the home directory is not writable).
    """
    if "KERAS_HOME" in os.environ:
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    return os.path.join(os.path.expanduser(home), "datasets")


def search_dirs(info, data_dir=None, manual_dir=None):
    """The directories searched for `info`'s IDX files, in order, as (label, path) pairs.

    Example:

    >>> [label for label, _ in search_dirs(get_info("fashion_mnist"), "/data")]
    ['data_dir', 'data_dir', 'keras_cache', 'debian_package']
    """
    dirs = []
    for label, directory in (("data_dir", data_dir), ("manual_dir", manual_dir)):
        if directory is not None:
            directory = os.path.expanduser(os.fspath(directory))
            dirs += [(label, directory), (label, os.path.join(directory, info.idx_dirname))]
    dirs.append(("keras_cache", os.path.join(keras_cache_dir(), info.idx_dirname)))
    dirs.append(("debian_package", os.path.join(SYSTEM_DATASETS_DIR, info.idx_dirname)))
    return dirs


def _existing(directory, file_name):
    """The path of `file_name` or `file_name.gz` in `directory`, or None."""
    for candidate in (file_name + ".gz", file_name):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def find_files(info, split, data_dir=None, manual_dir=None):
    """The first searched directory holding both IDX files of `split`.

    Args:
        info: a `DatasetInfo` with `idx_files`.
        split: a key of `info.idx_files` (`"train"` or `"test"`).
        data_dir: optional directory searched first.
        manual_dir: optional directory searched next.

    Returns:
        `(images_path, labels_path)`, or `None` when no searched directory holds both.
    """
    images_name, labels_name = info.idx_files[split]
    for _, directory in search_dirs(info, data_dir, manual_dir):
        images_path = _existing(directory, images_name)
        labels_path = _existing(directory, labels_name)
        if images_path and labels_path:
            return images_path, labels_path
    return None


def not_available_message(info, split, data_dir=None, manual_dir=None):
    """The message of the error raised when no searched directory holds the files."""
    images_name, labels_name = info.idx_files[split]
    searched = "\n".join(
        f"    {path}  ({label})" for label, path in search_dirs(info, data_dir, manual_dir)
    )
    package = f"dataset-{info.idx_dirname}"
    cache = os.path.join(keras_cache_dir(), info.idx_dirname)
    files = ", ".join(f"{name}.gz" for pair in info.idx_files.values() for name in pair)
    return (
        f"Dataset {info.name!r} ({split} split) was not found: no directory holds both "
        f"{images_name}[.gz] and {labels_name}[.gz]. Searched, in order:\n{searched}\n"
        f"Nothing was downloaded. To provide it, either:\n"
        f"  1. on Debian/Ubuntu: `sudo apt-get install {package}` (installs the original files "
        f"in {os.path.join(SYSTEM_DATASETS_DIR, info.idx_dirname)}); or\n"
        f"  2. fill Keras' cache: run `python -c \"import keras; "
        f"keras.datasets.{info.name}.load_data()\"` on a machine with internet access, or copy "
        f"the files {files} into {cache}; or\n"
        f"  3. put those four files in a directory DIR and pass `--data_dir DIR` "
        f"(keras_jem.data.load({info.name!r}, data_dir=DIR)).\n"
        f"With internet access, `--download` (download=True) fetches TFDS {info.tfds_name!r} "
        f"instead."
    )


def load_idx_dataset(info, split, data_dir=None, manual_dir=None):
    """Loads `split` of an IDX dataset: images float32 (N, H, W, C) in [-1, 1], labels int64.

    Args:
        info: a `DatasetInfo` with `idx_files`.
        split: a key of `info.idx_files`.
        data_dir: optional directory searched first (see the module docstring).
        manual_dir: optional directory searched next.

    Returns:
        `(images, labels)`, or `None` when the files are not found anywhere.

    Raises:
        keras_jem.data.idx.IDXFormatError: a file found is corrupt, has the wrong shape, the
            image and label counts differ or a label is out of range.
    """
    from keras_jem.data import preprocessing

    paths = find_files(info, split, data_dir, manual_dir)
    if paths is None:
        return None
    images_path, labels_path = paths
    height, width, channels = info.image_shape
    images = idx.read_idx(images_path, expected_shape=(None, height, width))
    labels = idx.read_idx(labels_path, expected_shape=(None,))
    if images.dtype != np.uint8:
        raise idx.IDXFormatError(
            f"{images_path!r} holds {images.dtype} pixels, expected uint8 (0-255)."
        )
    if len(images) != len(labels):
        raise idx.IDXFormatError(
            f"{images_path!r} holds {len(images)} images but {labels_path!r} holds "
            f"{len(labels)} labels; the two files must come from the same release and split."
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise idx.IDXFormatError(
            f"{labels_path!r} holds labels in [{labels.min()}, {labels.max()}], expected "
            f"[0, {info.num_classes - 1}]."
        )
    images = images.reshape((len(images), height, width, channels))
    return preprocessing.to_model_range(images, input_range=(0, 255)), labels
