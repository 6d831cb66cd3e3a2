"""Pixel-range conversion, shape conversion and input checks for image arrays."""

import numpy as np
import tensorflow as tf

# Images a little outside [-1, 1] (float rounding) are still accepted.
_RANGE_TOLERANCE = 1e-4


def to_model_range(images, input_range=None):
    """Maps images to the library's pixel range: float32 in [-1, 1].

    This is `ToTensor()` followed by `Normalize(0.5, 0.5)` of the reference code.

    Args:
        images: a numpy array (or anything `np.asarray` accepts) of images, e.g.
            uint8 in [0, 255] or float in [0, 1].
        input_range: optional `(low, high)` pixel range of `images`. By default it is
            inferred: integer dtypes are taken as `(0, 255)`; float arrays as `(0, 1)`
            when their maximum is <= 1, else as `(0, 255)`.

    Returns:
        A float32 numpy array of the same shape, with values in [-1, 1].

    Raises:
        ValueError: if the range cannot be inferred (float arrays with negative
            values, e.g. images that are already in [-1, 1]) or `input_range` is
            not a valid `(low, high)` pair.

    Example:

    >>> x = np.array([[0, 255]], dtype="uint8")
    >>> keras_jem.data.to_model_range(x)
    array([[-1.,  1.]], dtype=float32)
    """
    images = np.asarray(images)
    if input_range is None:
        if images.dtype == bool:
            input_range = (0, 1)
        elif np.issubdtype(images.dtype, np.integer):
            input_range = (0, 255)
        elif np.issubdtype(images.dtype, np.floating):
            if images.size and float(np.min(images)) < 0:
                raise ValueError(
                    "Cannot infer the pixel range of float images with negative values "
                    f"(received min={float(np.min(images)):.4g}, "
                    f"max={float(np.max(images)):.4g}). If they are already in [-1, 1] "
                    "they need no conversion; otherwise pass `input_range=(low, high)`."
                )
            high = float(np.max(images)) if images.size else 1.0
            input_range = (0, 1) if high <= 1.0 else (0, 255)
        else:
            raise ValueError(f"Expected numeric images, received dtype {images.dtype}.")
    try:
        low, high = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"`input_range` must be a pair (low, high), received {input_range!r}."
        ) from None
    if not high > low:
        raise ValueError(f"`input_range` must satisfy low < high, received {input_range!r}.")
    scale = np.float32(2.0 / (high - low))
    out = images.astype(np.float32) - np.float32(low)
    out *= scale
    out -= np.float32(1.0)
    np.clip(out, -1.0, 1.0, out=out)
    return out


def check_images(images, name="images"):
    """Checks that `images` is a float NHWC batch in [-1, 1]; returns it as a numpy array.

    Args:
        images: the array to check.
        name: the argument name used in error messages.

    Returns:
        `images` as a numpy float32 array.

    Raises:
        ValueError: if the rank, dtype or value range is wrong.
    """
    array = np.asarray(images)
    if array.ndim != 4:
        raise ValueError(
            f"`{name}` must be a rank-4 NHWC array (batch, height, width, channels) in "
            f"[-1, 1]; received shape {array.shape}. For a single image, add a batch "
            "axis; for grayscale images of shape (N, H, W), add a channel axis "
            "(`x[..., None]`)."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"`{name}` must be floating point in [-1, 1] (NHWC); received dtype "
            f"{array.dtype} with shape {array.shape}. Convert uint8 images with "
            "`keras_jem.data.to_model_range(images)`."
        )
    if array.size:
        low, high = float(np.min(array)), float(np.max(array))
        if not np.isfinite(low) or not np.isfinite(high):
            raise ValueError(f"`{name}` contains NaN or infinite values.")
        if low < -1.0 - _RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
            raise ValueError(
                f"`{name}` must have values in [-1, 1] (NHWC float); received values in "
                f"[{low:.4g}, {high:.4g}] with shape {array.shape}. Convert images in "
                "[0, 255] or [0, 1] with `keras_jem.data.to_model_range(images)`."
            )
    return array.astype(np.float32, copy=False)


def check_labels(labels, num_images, name="labels"):
    """Checks that `labels` is a rank-1 integer array of length `num_images`.

    Returns:
        `labels` as a numpy int64 array.
    """
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(
            f"`{name}` must be a rank-1 array of integer class ids; received shape "
            f"{array.shape}. One-hot labels can be converted with `np.argmax(y, -1)`."
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise ValueError(f"`{name}` must hold integer class ids; received dtype {array.dtype}.")
    if len(array) != num_images:
        raise ValueError(
            f"`{name}` and images must have the same length; received {len(array)} labels "
            f"for {num_images} images."
        )
    return array.astype(np.int64, copy=False)


def check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, received {value!r}.")
    return int(value)


def check_image_shape(image_shape, name="image_shape"):
    """Checks an `(height, width, channels)` tuple with 1 or 3 channels; returns a tuple."""
    try:
        shape = tuple(int(d) for d in image_shape)
    except (TypeError, ValueError):
        shape = None
    if shape is None or len(shape) != 3 or min(shape) < 1 or shape[-1] not in (1, 3):
        raise ValueError(
            f"`{name}` must be (height, width, channels) with 1 or 3 channels, "
            f"received {image_shape!r}."
        )
    return shape


def match_image_shape(images, image_shape, batch_size=512):
    """Resizes images and converts their channels to `image_shape`.

    Spatial size is changed with antialiased bilinear resizing (a plain resize, no
    crop: crop first if the aspect ratio differs). RGB -> grayscale uses the ITU-R
    601 luma weights; grayscale -> RGB repeats the channel.

    Args:
        images: float array (N, H, W, C) with C in {1, 3} (any value range).
        image_shape: target `(height, width, channels)`.
        batch_size: images resized per TensorFlow call (bounds peak memory).

    Returns:
        A float32 numpy array of shape `(N,) + image_shape`.
    """
    image_shape = check_image_shape(image_shape)
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Expected images of shape (N, H, W, 1 or 3), received {images.shape}.")
    if images.shape[1:] == image_shape:
        return images
    height, width, channels = image_shape
    outputs = []
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(images[start : start + batch_size])
        if x.shape[-1] == 3 and channels == 1:
            x = tf.image.rgb_to_grayscale(x)
        elif x.shape[-1] == 1 and channels == 3:
            x = tf.image.grayscale_to_rgb(x)
        if tuple(x.shape[1:3]) != (height, width):
            x = tf.image.resize(x, (height, width), method="bilinear", antialias=True)
        outputs.append(x.numpy())
    if not outputs:
        return np.zeros((0,) + image_shape, np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)
