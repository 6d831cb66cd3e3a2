import numpy as np
import pytest
from PIL import Image

from keras_jem import metrics


def test_to_uint8():
    np.testing.assert_array_equal(
        metrics.to_uint8([-2.0, -1.0, 0.0, 1.0, 3.0]), np.array([0, 0, 128, 255, 255], np.uint8)
    )


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_image_grid_size(tmp_path, channels, mode):
    images = np.random.default_rng(0).uniform(-1, 1, (10, 8, 8, channels)).astype("float32")
    path = metrics.save_image_grid(images, tmp_path / "grid.png", num_cols=5)
    # 8x8 digits are upscaled x4 (nearest) to 32x32 tiles, 1 pixel of padding.
    with Image.open(path) as image:
        assert image.size == (5 * 33 - 1, 2 * 33 - 1)
        assert image.mode == mode
        pixels = np.asarray(image)
    tile = pixels[:32, :32]
    expected = np.repeat(np.repeat(metrics.to_uint8(images[0]), 4, 0), 4, 1)
    np.testing.assert_array_equal(tile.reshape(expected.shape), expected)


def test_make_grid_explicit_scale_and_large_images():
    grid = metrics.make_grid(np.zeros((4, 32, 32, 3)))
    assert grid.shape == (2 * 33 - 1, 2 * 33 - 1, 3)  # 32x32 is not upscaled
    assert metrics.make_grid(np.zeros((3, 8, 8)), scale=2, padding=0).shape == (32, 32, 1)
    assert metrics.make_grid(np.zeros((3, 8, 8)), num_cols=3, scale=2, padding=0).shape == (16, 48, 1)
    with pytest.raises(ValueError, match="C in"):
        metrics.make_grid(np.zeros((2, 8, 8, 2)))


def test_save_class_grid(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (30, 8, 8, 1))
    labels = np.arange(30) % 3
    path = metrics.save_class_grid(images, labels, tmp_path / "classes.png", num_classes=4,
                                   per_class=5)
    with Image.open(path) as image:
        assert image.size == (5 * 33 - 1, 4 * 33 - 1)  # 4 rows (class 3 is blank), 5 columns


def test_save_confidence_grids_order(tmp_path):
    values = np.linspace(-1, 1, 6)
    images = np.broadcast_to(values[:, None, None, None], (6, 8, 8, 1)).astype("float32")
    confidence = np.array([0.4, 0.9, 0.5, 0.99, 0.6, 0.45])
    probabilities = np.stack([confidence, (1 - confidence) / 2, (1 - confidence) / 2], axis=1)
    paths = metrics.save_confidence_grids(images, probabilities, tmp_path, count=2, prefix="s_")
    with Image.open(paths["most_confident"]) as image:
        first = np.asarray(image)[0, 0]
    with Image.open(paths["least_confident"]) as image:
        least = np.asarray(image)[0, 0]
    assert first == metrics.to_uint8(values[3])  # confidence 0.99
    assert least == metrics.to_uint8(values[0])  # confidence 0.4
