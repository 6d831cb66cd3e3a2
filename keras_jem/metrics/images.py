"""Image grids: samples, per-class rows and most/least confident samples, saved as PNG."""

import math
import os

import numpy as np
import skimage.util


def to_uint8(images):
    """Map images from the library range [-1, 1] to uint8 [0, 255].

    Values outside [-1, 1] are clipped.

    Args:
        images: array-like of shape `(..., H, W, C)` in [-1, 1].

    Returns:
        A uint8 numpy array of the same shape.

    Example:

    >>> to_uint8(np.array([-1.0, 0.0, 1.0]))
    array([  0, 128, 255], dtype=uint8)
    """
    images = np.asarray(images, dtype=np.float32)
    return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _default_scale(height, width, min_size):
    return max(1, math.ceil(min_size / max(1, min(height, width))))


def make_grid(images, num_cols=None, padding=1, scale=None, min_size=32, pad_value=255):
    """Tile a batch of images into one uint8 grid image.

    Small images (e.g. 8x8 digits) are upscaled with nearest-neighbour repetition so that a
    person can see them.

    Args:
        images: array of shape `(N, H, W, C)` (or `(N, H, W)`) in [-1, 1], with C in {1, 3}.
        num_cols: int, number of columns. Defaults to `ceil(sqrt(N))`.
        padding: int, pixels between tiles (after upscaling). Defaults to `1`.
        scale: int, nearest-neighbour upscaling factor. Defaults to `None`: the smallest factor
            that makes each tile at least `min_size` pixels high and wide.
        min_size: int, minimum tile size used when `scale=None`. Defaults to `32`.
        pad_value: int in [0, 255], colour of the padding. Defaults to `255` (white).

    Returns:
        A uint8 array of shape `(rows * (H*scale + padding) - padding,
        cols * (W*scale + padding) - padding, C)`.

    Example:

    >>> grid = make_grid(np.zeros((10, 8, 8, 1)), num_cols=5, scale=4)
    >>> grid.shape
    (65, 164, 1)
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            "Expected images of shape (N, H, W, C) with C in {1, 3}. "
            f"Received: shape={images.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError("Cannot make a grid from zero images. Received: shape=" + str(images.shape))
    num_images, height, width = images.shape[:3]
    if scale is None:
        scale = _default_scale(height, width, min_size)
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"`scale` must be a positive integer. Received: scale={scale}")
    if num_cols is None:
        num_cols = math.ceil(math.sqrt(num_images))
    num_cols = max(1, min(int(num_cols), num_images))
    num_rows = math.ceil(num_images / num_cols)

    # Nearest-neighbour upscaling by an integer factor: an exact repeat of each pixel.
    tiles = np.repeat(np.repeat(to_uint8(images), scale, axis=1), scale, axis=2)
    padding = int(padding)
    grid = skimage.util.montage(tiles, fill=(pad_value,) * tiles.shape[-1], grid_shape=(num_rows, num_cols),
                                padding_width=padding, channel_axis=-1)
    # `montage` also pads the outer border; the grid has padding only between tiles.
    if padding:
        grid = grid[padding:-padding, padding:-padding]
    return grid.astype(np.uint8)


def save_png(array, path):
    """Save a uint8 `(H, W, C)` array (C in {1, 3}) as a PNG at `path` and return the path."""
    import keras

    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    array = np.asarray(array, dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    keras.utils.save_img(path, array, data_format="channels_last", file_format="png",
                         scale=False)
    return path


def save_image_grid(images, path, num_cols=None, padding=1, scale=None, min_size=32):
    """Save a batch of [-1, 1] images as one PNG grid.

    Args:
        images: array of shape `(N, H, W, C)` in [-1, 1].
        path: output `.png` path; parent folders are created.
        num_cols, padding, scale, min_size: see `make_grid`.

    Returns:
        The path written.

    Example:

    >>> save_image_grid(samples, "samples.png")  # doctest: +SKIP
    """
    grid = make_grid(images, num_cols=num_cols, padding=padding, scale=scale, min_size=min_size)
    return save_png(grid, path)


def save_class_grid(
    images, labels, path, num_classes=None, per_class=10, padding=1, scale=None, min_size=32
):
    """Save a grid with one row per class (the first `per_class` images of that class).

    Rows of classes with fewer images are padded with blank (mid-grey) tiles.

    Args:
        images: array `(N, H, W, C)` in [-1, 1].
        labels: int array `(N,)`: the class (given or predicted) of each image.
        path: output `.png` path.
        num_classes: int, number of rows. Defaults to `max(labels) + 1`.
        per_class: int, images per row. Defaults to `10`.
        padding, scale, min_size: see `make_grid`.

    Returns:
        The path written.

    Example:

    >>> save_class_grid(images, predicted_labels, "per_class.png", num_classes=10)  # doctest: +SKIP
    """
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            "`images` and `labels` must have the same length. "
            f"Received: {images.shape[0]} images and {labels.shape[0]} labels"
        )
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 1
    blank = np.zeros((1,) + images.shape[1:], dtype=np.float32)
    rows = []
    for label in range(num_classes):
        chosen = images[labels == label][:per_class]
        if chosen.shape[0] < per_class:
            fill = np.repeat(blank, per_class - chosen.shape[0], axis=0)
            chosen = np.concatenate([chosen.astype(np.float32), fill], axis=0)
        rows.append(chosen)
    grid = make_grid(
        np.concatenate(rows, axis=0),
        num_cols=per_class,
        padding=padding,
        scale=scale,
        min_size=min_size,
    )
    return save_png(grid, path)


def confidence_order(probabilities):
    """Indices sorting examples by max-softmax confidence, most confident first."""
    probabilities = np.asarray(probabilities)
    return np.argsort(-probabilities.max(axis=-1), kind="stable")


def save_confidence_grids(images, probabilities, directory, count=64, prefix="", **grid_kwargs):
    """Save the `count` most and least confident images (by max class probability).

    Args:
        images: array `(N, H, W, C)` in [-1, 1].
        probabilities: array `(N, num_classes)`: class probabilities of each image.
        directory: folder for `{prefix}most_confident.png` and `{prefix}least_confident.png`.
        count: int, images per grid. Defaults to `64`.
        prefix: str prepended to the file names. Defaults to `""`.
        **grid_kwargs: forwarded to `make_grid` (`num_cols`, `padding`, `scale`, `min_size`).

    Returns:
        A dict `{"most_confident": path, "least_confident": path}`.

    Example:

    >>> save_confidence_grids(buffer_images, probs, "eval/", prefix="buffer_")  # doctest: +SKIP
    """
    images = np.asarray(images)
    probabilities = np.asarray(probabilities)
    if images.shape[0] != probabilities.shape[0]:
        raise ValueError(
            "`images` and `probabilities` must have the same length. "
            f"Received: {images.shape[0]} images and {probabilities.shape[0]} probability rows"
        )
    order = confidence_order(probabilities)
    count = max(1, min(int(count), order.shape[0]))
    directory = os.fspath(directory)
    return {
        "most_confident": save_image_grid(
            images[order[:count]],
            os.path.join(directory, f"{prefix}most_confident.png"),
            **grid_kwargs,
        ),
        "least_confident": save_image_grid(
            images[order[::-1][:count]],
            os.path.join(directory, f"{prefix}least_confident.png"),
            **grid_kwargs,
        ),
    }
