"""`keras_jem.data.load`: named datasets as numpy arrays in the library's pixel range."""

import os

import numpy as np
import tensorflow as tf

from keras_jem.data import idx_datasets
from keras_jem.data import preprocessing
from keras_jem.data import registry

# Seed of the digits train/test split (scikit-learn `train_test_split(random_state=...)`).
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25
# CelebA's aligned images are 218 (height) x 178 (width); we keep the centred 178x178 square.
_CELEB_A_CROP = (20, 0, 178, 178)


class DatasetNotAvailableError(RuntimeError):
    """Raised when a dataset is not available locally and may not be downloaded.

    The message names the dataset, the directories that were searched and the ways to
    provide the data (for TFDS sets: download on a machine with internet access, or prepare
    it from archives in a `manual_dir`; for Fashion-MNIST: the Debian package, Keras' cache
    or `data_dir`).
    """


def load(
    name,
    split="train",
    data_dir=None,
    download=False,
    manual_dir=None,
    num_examples=None,
    image_shape=None,
    num_classes=None,
    seed=None,
):
    """Loads a named dataset as numpy arrays: images float32 NHWC in [-1, 1], labels int64.

    Datasets (see `keras_jem.data.available()`):

    - `"digits"`: scikit-learn's 1797 8x8 digits, bundled (no download), pixel values
      0..16 mapped to [-1, 1], shape (8, 8, 1). A fixed stratified split
      (`train_test_split(test_size=0.25, stratify=labels, random_state=0)`) gives
      1347 train and 450 test images (every class has 33-46 test images).
    - `"fashion_mnist"`: Fashion-MNIST's 60000 train and 10000 test 28x28 images, read
      from the original IDX files (gzipped or not), looked for in `data_dir` (or its
      `fashion-mnist/` subdirectory), then Keras' cache `~/.keras/datasets/fashion-mnist/`
      (what `keras.datasets.fashion_mnist.load_data()` uses), then the Debian package's
      `/usr/share/datasets/fashion-mnist/` (`apt-get install dataset-fashion-mnist`).
      Only with `download=True` and no local files, TFDS `"fashion_mnist"` is used.
      Pixels 0..255 mapped to [-1, 1], shape (28, 28, 1).
    - `"cifar10"`, `"cifar100"` (fine labels), `"svhn"` (TFDS `"svhn_cropped"`, splits
      train/test/extra): read through TensorFlow Datasets.
    - `"celeb_a"`: OOD only; centre-cropped to 178x178, resized to 32x32; labels are 0.
    - `"synthetic"`: made-up images of any `image_shape` with `num_classes` classes:
      each class has a fixed random prototype (from `seed`), examples are the prototype
      plus Gaussian noise (std 0.3), clipped to [-1, 1]; train and test draw different
      noise. Learnable, so it is useful for fast tests and benchmarks.

    TFDS datasets are read from `data_dir` (default: `$TFDS_DATA_DIR` or
    `~/tensorflow_datasets`). Nothing is downloaded unless `download=True`; when the
    data is missing a `DatasetNotAvailableError` is raised at once. Note that
    `download=True` on a machine without internet access makes TFDS retry for several
    minutes before it fails.

    Args:
        name: dataset name, one of `keras_jem.data.available()`.
        split: `"train"`, `"test"` or another split listed in
            `keras_jem.data.get_info(name).splits`. TFDS datasets also accept TFDS
            slicing such as `"train[:1000]"`.
        data_dir: TFDS data directory. `None` uses the TFDS default.
        download: whether TFDS may download and prepare the data if it is missing.
        manual_dir: a directory holding the dataset's original archives (see
            `get_info(name).archives`, e.g. `cifar-10-binary.tar.gz`). The dataset is
            then prepared offline into `data_dir` with `builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))`.
        num_examples: keep only the first `num_examples` examples of the split. For
            `"synthetic"`, the number of examples to make (default 1024 for train,
            256 otherwise).
        image_shape: `"synthetic"` only: `(height, width, channels)`, default (32, 32, 3).
        num_classes: `"synthetic"` only: number of classes, default 10.
        seed: `"synthetic"` only: seed of the class prototypes and noise.

    Returns:
        A tuple `(images, labels)`: float32 array `(N, H, W, C)` in [-1, 1] and int64
        array `(N,)`.

    Raises:
        ValueError: unknown name or split, or arguments that do not apply.
        DatasetNotAvailableError: the TFDS data is not prepared (Fashion-MNIST: its files
            are found nowhere) and `download=False`.
        keras_jem.data.idx.IDXFormatError: a Fashion-MNIST file is corrupt.

    Example:

    >>> x_train, y_train = keras_jem.data.load("digits", "train")
    >>> x_train.shape, y_train.shape
    ((1347, 8, 8, 1), (1347,))
    >>> x, y = keras_jem.data.load("cifar10", "test", data_dir="/data/tfds")
    """
    info = registry.get_info(name)
    _check_split(info, split)
    if num_examples is not None:
        num_examples = preprocessing.check_positive_int(num_examples, "num_examples")
    if name != "synthetic":
        for arg, value in (("image_shape", image_shape), ("num_classes", num_classes)):
            if value is not None:
                raise ValueError(
                    f"`{arg}` only applies to the 'synthetic' dataset; received "
                    f"{arg}={value!r} for dataset {name!r}, whose shape is fixed "
                    f"({info.image_shape}, {info.num_classes} classes)."
                )
    if name == "digits":
        images, labels = _load_digits(split)
    elif name == "synthetic":
        images, labels = _make_synthetic(split, num_examples, image_shape, num_classes, seed)
    elif info.idx_files:
        images, labels = _load_idx(info, split, data_dir, download, manual_dir, num_examples)
    else:
        images, labels = _load_tfds(info, split, data_dir, download, manual_dir, num_examples)
    if num_examples is not None:
        images, labels = images[:num_examples], labels[:num_examples]
    return images, labels


def _check_split(info, split):
    if not isinstance(split, str):
        raise ValueError(f"`split` must be a string, received {split!r}.")  # noqa: TRY004
    if info.tfds_name is not None and not info.idx_files:
        # TFDS slicing: "train[:10%]", "train+test".
        bases = [part.split("[")[0].strip() for part in split.split("+")]
    else:
        bases = [split]
    for base in bases:
        if base not in info.splits:
            raise ValueError(
                f"Unknown split {split!r} for dataset {info.name!r}. Expected one of "
                f"{list(info.splits)}"
                + (" (TFDS slicing such as 'train[:1000]' is accepted)."
                   if info.tfds_name and not info.idx_files
                   else "; use `num_examples` for a subset." if info.idx_files else ".")
            )


def _load_digits(split):
    from sklearn import datasets
    from sklearn import model_selection

    digits = datasets.load_digits()
    images = digits.images.astype(np.float32)[..., None]
    labels = digits.target.astype(np.int64)
    indices = np.arange(len(labels))
    train_idx, test_idx = model_selection.train_test_split(
        indices,
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    idx = train_idx if split == "train" else test_idx
    images = preprocessing.to_model_range(images[idx], input_range=(0, 16))
    return images, labels[idx]


def _make_synthetic(split, num_examples, image_shape, num_classes, seed):
    info = registry.get_info("synthetic")
    image_shape = preprocessing.check_image_shape(
        info.image_shape if image_shape is None else image_shape
    )
    num_classes = preprocessing.check_positive_int(
        info.num_classes if num_classes is None else num_classes, "num_classes"
    )
    if num_examples is None:
        num_examples = info.num_examples.get(split, info.num_examples["test"])
    seed = 0 if seed is None else int(seed)
    prototypes = (
        np.random.default_rng([seed, 0])
        .uniform(-0.7, 0.7, size=(num_classes,) + image_shape)
        .astype(np.float32)
    )
    split_id = 1 if split == "train" else 2
    rng = np.random.default_rng([seed, split_id])
    labels = rng.integers(0, num_classes, size=num_examples).astype(np.int64)
    images = rng.standard_normal((num_examples,) + image_shape, dtype=np.float32)
    images *= np.float32(0.3)
    images += prototypes[labels]
    np.clip(images, -1.0, 1.0, out=images)
    return images, labels


def _load_idx(info, split, data_dir, download, manual_dir, num_examples):
    loaded = idx_datasets.load_idx_dataset(info, split, data_dir, manual_dir)
    if loaded is not None:
        return loaded
    if not download:
        raise DatasetNotAvailableError(
            idx_datasets.not_available_message(info, split, data_dir, manual_dir)
        )
    return _load_tfds(info, split, data_dir, download, None, num_examples)


def _default_data_dir():
    import tensorflow_datasets as tfds

    return os.path.expanduser(tfds.core.constants.DATA_DIR)


def _not_available_message(info, data_dir_root, version_dir, extra=""):
    archives = ", ".join(info.archives) or "(see the TFDS catalog)"
    where = f" from {info.homepage}" if info.homepage else ""
    return (
        f"Dataset {info.name!r} (TFDS {info.tfds_name!r}) is not prepared in data_dir "
        f"{str(data_dir_root)!r} (looked for {str(version_dir)!r}), and download=False, so "
        f"nothing was downloaded.{extra} To provide it, either:\n"
        f"  1. on a machine with internet access, run with `--download` (or call "
        f"keras_jem.data.load({info.name!r}, download=True, data_dir=DIR)), then copy "
        f"DIR/{info.tfds_name} into {str(data_dir_root)!r} (or pass that DIR as data_dir); "
        f"or\n"
        f"  2. put the original archive(s) {archives}{where} in a local directory MANUAL and "
        f"call keras_jem.data.load({info.name!r}, manual_dir=MANUAL, data_dir=...), which "
        f"prepares the dataset offline with builder.download_and_prepare(download_config="
        f"tfds.download.DownloadConfig(manual_dir=MANUAL)).\n"
        f"Note: download=True without internet access makes TFDS retry for several "
        f"minutes before it fails."
    )


def _prepare_from_manual_dir(builder, info, manual_dir, data_dir_root):
    import tensorflow_datasets as tfds

    manual_dir = os.path.expanduser(str(manual_dir))
    missing = [f for f in info.archives if not os.path.exists(os.path.join(manual_dir, f))]
    if missing:
        raise DatasetNotAvailableError(
            f"Cannot prepare dataset {info.name!r} from manual_dir {manual_dir!r}: missing "
            f"archive(s) {missing} (expected all of {list(info.archives)}"
            + (f", from {info.homepage}" if info.homepage else "")
            + "). Nothing was downloaded."
        )
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    builder.download_and_prepare(download_config=config)


def _load_tfds(info, split, data_dir, download, manual_dir, num_examples):
    import tensorflow_datasets as tfds

    data_dir = None if data_dir is None else os.path.expanduser(str(data_dir))
    data_dir_root = data_dir or _default_data_dir()
    builder = tfds.builder(info.tfds_name, data_dir=data_dir)
    if manual_dir is not None and not builder.is_prepared():
        _prepare_from_manual_dir(builder, info, manual_dir, data_dir_root)
    elif download:
        builder.download_and_prepare()
    try:
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError as error:
        # TFDS raises `AssertionError("Dataset x: could not find data in ...")`.
        if "could not find data" not in str(error):
            raise
        raise DatasetNotAvailableError(
            _not_available_message(info, data_dir_root, builder.data_dir)
        ) from None
    if num_examples is not None:
        dataset = dataset.take(num_examples)

    label_key = info.label_key
    is_celeb_a = info.name == "celeb_a"

    def select(example):
        image = example["image"]
        if is_celeb_a:
            image = tf.image.crop_to_bounding_box(image, *_CELEB_A_CROP)
            image = tf.image.resize(image, info.image_shape[:2], antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
        label = (
            tf.cast(example[label_key], tf.int64)
            if label_key is not None
            else tf.zeros((), tf.int64)
        )
        return image, label

    dataset = dataset.map(select, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(2048).prefetch(2)
    images, labels = [], []
    for x, y in tfds.as_numpy(dataset):
        images.append(x)
        labels.append(y)
    if not images:
        return (
            np.zeros((0,) + info.image_shape, np.float32),
            np.zeros((0,), np.int64),
        )
    images = np.concatenate(images)
    labels = np.concatenate(labels).astype(np.int64)
    if images.shape[1:] != info.image_shape:
        raise ValueError(
            f"TFDS dataset {info.tfds_name!r} returned images of shape {images.shape[1:]}, "
            f"expected {info.image_shape}."
        )
    return preprocessing.to_model_range(images, input_range=(0, 255)), labels
