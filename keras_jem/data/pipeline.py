"""tf.data pipelines: the two-stream JEM training dataset and finite evaluation datasets."""

import numpy as np
import tensorflow as tf

from keras_jem.data import augmentation
from keras_jem.data import preprocessing


def make_train_dataset(
    images,
    labels,
    batch_size=64,
    px_batch_size=None,
    augment="crop_flip",
    augment_px=False,
    noise_scale=0.0,
    shuffle=True,
    seed=None,
    drop_remainder=True,
    padding=None,
):
    """Builds the infinite two-stream training dataset of the JEM family.

    Each element is `({"images": x_ce, "px_images": x_px}, y)`:

    - `images` / `y`: a labelled stream for the cross-entropy term, shuffled and
      augmented (`augment`);
    - `px_images`: a second, independently shuffled stream for the log p(x) term,
      augmented only if `augment_px=True` (SADA-JEM keeps it clean: `augment_px=False`;
      JEM/JEM++/GMMC draw both streams from the same augmented loader: pass
      `augment_px=True`).

    Gaussian noise `x += noise_scale * N(0, 1)` is added to both streams after the
    augmentation (the papers' sigma: 0.03 for JEM, JEM++ and GMMC; 0 for SADA-JEM). The
    noisy images are not clipped, as in the references.

    Augmentation follows the references: reflect-pad by `padding` pixels, random crop back
    to the image size, then (with `"crop_flip"`) a random horizontal flip. `padding`
    defaults to 1/8 of the image side (4 for 32x32 CIFAR/SVHN, 1 for 8x8 digits).

    Each stream is reshuffled every epoch; with `drop_remainder=True` (the references'
    `drop_last=True`) an epoch of a stream is `len(images) // batch_size` batches and every
    batch has a static shape. The dataset repeats forever: pass `steps_per_epoch` to
    `model.fit` (see `keras_jem.data.steps_per_epoch`).

    Args:
        images: float array (N, H, W, C) in [-1, 1]. Use
            `keras_jem.data.to_model_range` to convert uint8 images.
        labels: int array (N,) of class ids.
        batch_size: batch size of the labelled (cross-entropy) stream.
        px_batch_size: batch size of the p(x) stream; defaults to `batch_size`
            (SADA-JEM: CE 128, p(x) 64).
        augment: `"crop_flip"`, `"crop"` (no flip: SVHN, digits) or `None`.
        augment_px: whether the p(x) stream is augmented too.
        noise_scale: std of the Gaussian noise added to both streams.
        shuffle: whether to shuffle. With `False` both streams run in dataset order.
        seed: optional int; makes shuffling, augmentation and noise reproducible.
        drop_remainder: drop each epoch's last partial batch.
        padding: optional crop padding in pixels.

    Returns:
        An infinite `tf.data.Dataset`.

    Example:

    >>> x, y = keras_jem.data.load("digits", "train")
    >>> ds = keras_jem.data.make_train_dataset(x, y, batch_size=32, augment="crop",
    ...                                         noise_scale=0.03, seed=0)
    >>> inputs, labels = next(iter(ds))
    >>> inputs["images"].shape, inputs["px_images"].shape, labels.shape
    (TensorShape([32, 8, 8, 1]), TensorShape([32, 8, 8, 1]), TensorShape([32]))
    """
    images = preprocessing.check_images(images)
    labels = preprocessing.check_labels(labels, len(images))
    batch_size = preprocessing.check_positive_int(batch_size, "batch_size")
    px_batch_size = preprocessing.check_positive_int(
        batch_size if px_batch_size is None else px_batch_size, "px_batch_size"
    )
    augmentation.check_mode(augment)
    noise_scale = _check_noise_scale(noise_scale)
    num_examples = len(images)
    if num_examples == 0:
        raise ValueError("`images` is empty: cannot build a training dataset.")
    if drop_remainder:
        for arg, value in (("batch_size", batch_size), ("px_batch_size", px_batch_size)):
            if value > num_examples:
                raise ValueError(
                    f"`{arg}`={value} is larger than the number of examples ({num_examples}) "
                    "with drop_remainder=True, so no batch could be formed. Use a smaller "
                    "batch size or drop_remainder=False."
                )
    if padding is None:
        padding = augmentation.default_padding(images.shape[1:3])
    elif augment is not None:
        padding = int(padding)
        if padding < 0 or padding >= min(images.shape[1:3]):
            raise ValueError(
                f"`padding` must be in [0, {min(images.shape[1:3]) - 1}] for images of size "
                f"{images.shape[1]}x{images.shape[2]}; received {padding}."
            )
    seeds = _stream_seeds(seed, 3)

    images_t = tf.constant(images)
    labels_t = tf.constant(labels)

    def index_stream(stream_batch_size, shuffle_seed):
        ds = tf.data.Dataset.range(num_examples)
        if shuffle:
            ds = ds.shuffle(num_examples, seed=shuffle_seed, reshuffle_each_iteration=True)
        return ds.batch(stream_batch_size, drop_remainder=drop_remainder).repeat()

    random_seeds = tf.data.Dataset.random(seed=seeds[2], rerandomize_each_iteration=True).batch(2)
    dataset = tf.data.Dataset.zip(
        (index_stream(batch_size, seeds[0]), index_stream(px_batch_size, seeds[1]), random_seeds)
    )

    def make_batch(ce_index, px_index, random_seed):
        ce_seed, px_seed, ce_noise_seed, px_noise_seed = tf.unstack(
            tf.random.experimental.stateless_split(random_seed, num=4), axis=0
        )
        x_ce = tf.gather(images_t, ce_index)
        y = tf.gather(labels_t, ce_index)
        x_px = tf.gather(images_t, px_index)
        x_ce = augmentation.augment(x_ce, augment, ce_seed, padding=padding)
        if augment_px:
            x_px = augmentation.augment(x_px, augment, px_seed, padding=padding)
        if noise_scale > 0:
            x_ce = x_ce + noise_scale * tf.random.stateless_normal(
                tf.shape(x_ce), seed=ce_noise_seed
            )
            x_px = x_px + noise_scale * tf.random.stateless_normal(
                tf.shape(x_px), seed=px_noise_seed
            )
        return {"images": x_ce, "px_images": x_px}, y

    dataset = dataset.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(images, labels=None, batch_size=100, noise_scale=0.0, seed=None):
    """Builds a finite, unshuffled evaluation dataset.

    JEM adds its training noise (sigma=0.03) to test and OOD images too
    (`noise_scale=0.03`); JEM++, GMMC and SADA-JEM evaluate on clean images.

    Args:
        images: float array (N, H, W, C) in [-1, 1].
        labels: optional int array (N,). Without labels the dataset yields images only.
        batch_size: batch size; the last batch may be smaller.
        noise_scale: std of Gaussian noise added to every image.
        seed: optional int seed of the noise.

    Returns:
        A finite `tf.data.Dataset` yielding `(x, y)` batches, or `x` batches when
        `labels` is `None`.

    Example:

    >>> x, y = keras_jem.data.load("digits", "test")
    >>> ds = keras_jem.data.make_eval_dataset(x, y, batch_size=100)
    >>> model.evaluate(ds)
    """
    images = preprocessing.check_images(images)
    batch_size = preprocessing.check_positive_int(batch_size, "batch_size")
    noise_scale = _check_noise_scale(noise_scale)
    if labels is None:
        dataset = tf.data.Dataset.from_tensor_slices(images)
    else:
        labels = preprocessing.check_labels(labels, len(images))
        dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    dataset = dataset.batch(batch_size)
    if noise_scale > 0:
        random_seeds = tf.data.Dataset.random(seed=_stream_seeds(seed, 1)[0]).batch(2)
        dataset = tf.data.Dataset.zip((dataset, random_seeds))

        def add_noise(batch, random_seed):
            x = batch if labels is None else batch[0]
            x = x + noise_scale * tf.random.stateless_normal(tf.shape(x), seed=random_seed)
            return x if labels is None else (x, batch[1])

        dataset = dataset.map(add_noise, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(num_examples, batch_size, drop_remainder=True):
    """Number of batches in one pass over `num_examples` examples.

    Args:
        num_examples: dataset size.
        batch_size: batch size.
        drop_remainder: whether the last partial batch is dropped (the references'
            `drop_last=True`: 45000 // 64 = 703 JEM iterations per epoch).

    Example:

    >>> keras_jem.data.steps_per_epoch(45000, 64)
    703
    """
    num_examples = preprocessing.check_positive_int(num_examples, "num_examples")
    batch_size = preprocessing.check_positive_int(batch_size, "batch_size")
    if drop_remainder:
        if batch_size > num_examples:
            raise ValueError(
                f"`batch_size`={batch_size} is larger than `num_examples`={num_examples}: an "
                "epoch would have no full batch."
            )
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def split_validation(images, labels, num_validation, seed=1234):
    """Holds out a random validation set, like the references' `n_valid` split.

    The indices are shuffled with `np.random.RandomState(seed)` (the references call
    `np.random.seed(1234); np.random.shuffle(inds)`), the first `num_validation` become
    the validation set and the rest the training set (in shuffled order).

    Args:
        images: array (N, ...).
        labels: array (N,).
        num_validation: number of validation examples, in [0, N). JEM, JEM++ and GMMC
            use 5000 on CIFAR; SADA-JEM uses 0.
        seed: seed of the shuffle.

    Returns:
        `((train_images, train_labels), (validation_images, validation_labels))`.

    Example:

    >>> x, y = keras_jem.data.load("cifar10", "train")
    >>> (x_train, y_train), (x_val, y_val) = keras_jem.data.split_validation(x, y, 5000)
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(
            f"`images` and `labels` must have the same length; received {len(images)} and "
            f"{len(labels)}."
        )
    if (
        isinstance(num_validation, bool)
        or not isinstance(num_validation, (int, np.integer))
        or not 0 <= num_validation < len(images)
    ):
        raise ValueError(
            f"`num_validation` must be an integer in [0, {len(images)}) (the number of "
            f"examples); received {num_validation!r}."
        )
    indices = np.arange(len(images))
    np.random.RandomState(seed).shuffle(indices)
    val_idx, train_idx = indices[:num_validation], indices[num_validation:]
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def _check_noise_scale(noise_scale):
    try:
        value = float(noise_scale)
    except (TypeError, ValueError):
        value = -1.0
    if not value >= 0:
        raise ValueError(f"`noise_scale` must be a float >= 0, received {noise_scale!r}.")
    return value


def _stream_seeds(seed, count):
    """Derives `count` distinct int seeds from `seed` (or random ones if `seed` is None)."""
    if seed is None:
        return [None] * count
    sequence = np.random.SeedSequence(int(seed))
    return [int(s) for s in sequence.generate_state(count, dtype=np.uint32) >> 1]
