"""Batched, seeded training augmentations: reflect-pad random crop and horizontal flip."""

import tensorflow as tf

AUGMENTATIONS = ("crop_flip", "crop", None)


def default_padding(image_shape):
    """Padding of the random crop: 1/8 of the smaller image side, at least 1.

    This is the papers' 4 pixels for 32x32 images and 1 pixel for 8x8 digits.
    """
    return max(1, round(min(image_shape[0], image_shape[1]) / 8))


def random_crop(images, padding, seed):
    """Reflect-pads a batch by `padding` pixels, then crops each image back to its size.

    Each image gets its own uniformly drawn offset in `[0, 2 * padding]` along each axis
    (the reference's `RandomCrop(32, padding=4, padding_mode="reflect")`).

    Args:
        images: float tensor `(B, H, W, C)`.
        padding: non-negative int, smaller than `H` and `W` (reflect padding).
        seed: stateless seed, shape `(2,)` int tensor.

    Returns:
        A tensor with the shape of `images`.

    Example:

    >>> x = tf.zeros((4, 32, 32, 3))
    >>> y = random_crop(x, 4, seed=tf.constant([1, 2]))
    """
    if padding == 0:
        return images
    images = tf.convert_to_tensor(images)
    height, width = images.shape[1], images.shape[2]
    if padding >= height or padding >= width:
        raise ValueError(
            f"Reflect padding must be smaller than the image size; received padding="
            f"{padding} for images of size {height}x{width}."
        )
    batch = tf.shape(images)[0]
    padded = tf.pad(
        images, [[0, 0], [padding, padding], [padding, padding], [0, 0]], mode="REFLECT"
    )
    offsets = tf.random.stateless_uniform(
        (2, batch), seed=seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32
    )
    rows = offsets[0][:, None] + tf.range(height)[None, :]  # (B, H)
    cols = offsets[1][:, None] + tf.range(width)[None, :]  # (B, W)
    out = tf.gather(padded, rows, axis=1, batch_dims=1)  # (B, H, W + 2p, C)
    out = tf.gather(out, cols, axis=2, batch_dims=1)  # (B, H, W, C)
    return out


def random_flip(images, seed):
    """Flips each image of a batch left-right with probability 1/2.

    Args:
        images: float tensor `(B, H, W, C)`.
        seed: stateless seed, shape `(2,)` int tensor.
    """
    images = tf.convert_to_tensor(images)
    batch = tf.shape(images)[0]
    flip = tf.random.stateless_uniform((batch,), seed=seed) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)


def augment(images, mode, seed, padding=None):
    """Applies a named training augmentation to a batch.

    Args:
        images: float tensor `(B, H, W, C)`.
        mode: `"crop_flip"` (random crop, then random horizontal flip), `"crop"`
            (random crop only: SVHN, digits) or `None` (identity).
        seed: stateless seed, shape `(2,)` int tensor.
        padding: crop padding; `None` uses `default_padding` (4 for 32x32, 1 for 8x8).

    Returns:
        The augmented batch, same shape.
    """
    check_mode(mode)
    if mode is None:
        return images
    if padding is None:
        padding = default_padding(images.shape[1:3])
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2), axis=0)
    images = random_crop(images, padding, crop_seed)
    if mode == "crop_flip":
        images = random_flip(images, flip_seed)
    return images


def check_mode(mode, name="augment"):
    if mode not in AUGMENTATIONS:
        raise ValueError(
            f"`{name}` must be one of {list(AUGMENTATIONS)}; received {mode!r}. Use "
            "'crop_flip' for CIFAR, 'crop' for SVHN and digits (no flip), None for no "
            "augmentation."
        )
