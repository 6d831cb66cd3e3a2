import time

import numpy as np
import pytest
import tensorflow as tf

from keras_jem import data


def _first_batches(dataset, count):
    return [batch for _, batch in zip(range(count), dataset)]


def _row_set(images):
    return {x.tobytes() for x in np.asarray(images, np.float32)}


def _unique_images(num_examples, image_shape=(8, 8, 1), seed=0):
    """Distinct images in [-1, 1]; labels are the index mod 10."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(num_examples,) + image_shape).astype("float32")
    labels = np.arange(num_examples) % 10
    return images, labels


# Registry and loading.


def test_available_and_get_info():
    assert set(data.available()) == {
        "digits",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "svhn",
        "celeb_a",
        "synthetic",
    }
    info = data.get_info("svhn")
    assert info.tfds_name == "svhn_cropped"
    assert info.image_shape == (32, 32, 3)
    assert info.augment == "crop"
    assert data.get_info("cifar10").augment == "crop_flip"
    assert data.get_info("celeb_a").ood_only
    with pytest.raises(ValueError, match="Unknown dataset name: 'mnist'.*cifar10"):
        data.get_info("mnist")
    with pytest.raises(ValueError, match="Unknown dataset name"):
        data.load("imagenet")


def test_digits_split():
    x_train, y_train = data.load("digits", "train")
    x_test, y_test = data.load("digits", "test")
    assert x_train.shape == (1347, 8, 8, 1) and x_test.shape == (450, 8, 8, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_train.min() == -1.0 and x_train.max() == 1.0
    assert set(y_train) == set(range(10)) and set(y_test) == set(range(10))
    # Stratified: each class keeps its share of the full set in the test split.
    full = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
    np.testing.assert_allclose(np.bincount(y_test, minlength=10), full / 4, atol=1)
    # Deterministic.
    x_again, y_again = data.load("digits", "test")
    np.testing.assert_array_equal(x_again, x_test)
    np.testing.assert_array_equal(y_again, y_test)
    x_small, _ = data.load("digits", "train", num_examples=10)
    np.testing.assert_array_equal(x_small, x_train[:10])


def test_load_bad_arguments():
    with pytest.raises(ValueError, match="Unknown split 'validation'.*'train', 'test'"):
        data.load("digits", "validation")
    with pytest.raises(ValueError, match="Unknown split 'valid'"):
        data.load("cifar10", "valid")
    with pytest.raises(ValueError, match="only applies to the 'synthetic'"):
        data.load("digits", image_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="num_examples"):
        data.load("digits", num_examples=0)


def test_synthetic():
    x, y = data.load(
        "synthetic", "train", image_shape=(8, 8, 1), num_classes=3, num_examples=50, seed=1
    )
    assert x.shape == (50, 8, 8, 1) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    assert y.dtype == np.int64 and set(y) <= {0, 1, 2}
    x2, _ = data.load(
        "synthetic", "train", image_shape=(8, 8, 1), num_classes=3, num_examples=50, seed=1
    )
    np.testing.assert_array_equal(x, x2)
    x_test, _ = data.load(
        "synthetic", "test", image_shape=(8, 8, 1), num_classes=3, num_examples=50, seed=1
    )
    assert not np.array_equal(x, x_test)
    x_default, _ = data.load("synthetic")
    assert x_default.shape == (1024, 32, 32, 3)
    with pytest.raises(ValueError, match="image_shape"):
        data.load("synthetic", image_shape=(8, 8, 2))


def test_to_model_range():
    x = np.array([0, 51, 255], np.uint8)
    np.testing.assert_allclose(data.to_model_range(x), [-1.0, -0.6, 1.0], atol=1e-6)
    np.testing.assert_allclose(data.to_model_range(np.array([0.0, 0.5, 1.0])), [-1, 0, 1])
    np.testing.assert_allclose(
        data.to_model_range(np.array([0.0, 16.0]), input_range=(0, 16)), [-1, 1]
    )
    assert data.to_model_range(x).dtype == np.float32
    with pytest.raises(ValueError, match="already in \\[-1, 1\\]"):
        data.to_model_range(np.array([-1.0, 1.0]))


# TFDS paths, mocked.


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("svhn", 10), ("cifar100", 100)])
def test_tfds_datasets_mocked(name, num_classes):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        x, y = data.load(name, "test")
        x_few, _ = data.load(name, "train", num_examples=5)
    assert x.shape == (12, 32, 32, 3) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    assert y.dtype == np.int64 and y.min() >= 0 and y.max() < num_classes
    assert x_few.shape == (5, 32, 32, 3)


def test_celeb_a_mocked_is_resized():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):
        x, y = data.load("celeb_a", "test")
        ood = data.load_ood("celeb_a", like=(8, 8, 1))
    assert x.shape == (4, 32, 32, 3) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(y, np.zeros(4, np.int64))
    assert ood.shape == (4, 8, 8, 1)


def test_tfds_missing_data_fails_fast(tmp_path):
    start = time.time()
    with pytest.raises(data.DatasetNotAvailableError) as info:
        data.load("cifar10", "train", data_dir=str(tmp_path), download=False)
    assert time.time() - start < 10
    message = str(info.value)
    assert "'cifar10'" in message
    assert str(tmp_path) in message
    assert "--download" in message and "manual_dir" in message
    assert "cifar-10-binary.tar.gz" in message
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(data.DatasetNotAvailableError, match="svhn_cropped"):
        data.load_ood("svhn", like=(32, 32, 3), data_dir=str(tmp_path))


def test_manual_dir_missing_archives(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(data.DatasetNotAvailableError, match="missing archive.*train_32x32.mat"):
        data.load("svhn", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))


# Training pipeline.


def test_train_dataset_streams():
    images, labels = _unique_images(96)
    lookup = {x.tobytes(): y for x, y in zip(images, labels)}
    dataset = data.make_train_dataset(
        images, labels, batch_size=16, px_batch_size=8, augment="crop_flip", seed=3
    )
    spec_inputs, spec_labels = dataset.element_spec
    assert spec_inputs["images"].shape == (16, 8, 8, 1)
    assert spec_inputs["px_images"].shape == (8, 8, 8, 1)
    assert spec_labels.shape == (16,) and spec_labels.dtype == tf.int64
    num_augmented = 0
    for inputs, y in _first_batches(dataset, 12):
        x_ce = inputs["images"].numpy()
        x_px = inputs["px_images"].numpy()
        # px stays clean: every image is exactly one of the dataset images.
        assert _row_set(x_px) <= set(lookup)
        num_augmented += sum(x.tobytes() not in lookup for x in x_ce)
        assert not np.array_equal(x_ce[:8], x_px)
    assert num_augmented > 100  # Most CE images were cropped or flipped.


def test_train_dataset_labels_and_epochs():
    images, labels = _unique_images(50)
    lookup = {x.tobytes(): y for x, y in zip(images, labels)}
    dataset = data.make_train_dataset(images, labels, batch_size=10, augment=None, seed=0)
    batches = _first_batches(dataset, 10)
    ce_epochs = [[], []]
    px_first_epoch = []
    for step, (inputs, y) in enumerate(batches):
        for x, label in zip(inputs["images"].numpy(), y.numpy()):
            assert lookup[x.tobytes()] == label
            ce_epochs[step // 5].append(x.tobytes())
        if step < 5:
            px_first_epoch += [x.tobytes() for x in inputs["px_images"].numpy()]
    # Each epoch visits each image once, in a new order; the two streams differ.
    assert set(ce_epochs[0]) == set(ce_epochs[1]) == set(lookup)
    assert ce_epochs[0] != ce_epochs[1]
    assert set(px_first_epoch) == set(lookup) and px_first_epoch != ce_epochs[0]


def test_train_dataset_is_reproducible_with_seed():
    images, labels = _unique_images(40)

    def first(seed):
        inputs, y = next(
            iter(data.make_train_dataset(images, labels, batch_size=8, noise_scale=0.03, seed=seed))
        )
        return inputs["images"].numpy(), inputs["px_images"].numpy(), y.numpy()

    a, b, c = first(7), first(7), first(8)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])


def test_train_dataset_noise_scale():
    images = np.zeros((64, 8, 8, 3), np.float32)
    labels = np.zeros(64, np.int64)
    dataset = data.make_train_dataset(
        images,
        labels,
        batch_size=32,
        augment="crop_flip",
        augment_px=True,
        noise_scale=0.1,
        seed=0,
    )
    inputs, _ = next(iter(dataset))
    for key in ("images", "px_images"):
        x = inputs[key].numpy()
        assert abs(x.std() - 0.1) < 0.01 and abs(x.mean()) < 0.01
    clean, _ = next(iter(data.make_train_dataset(images, labels, batch_size=32)))
    assert np.all(clean["images"].numpy() == 0) and np.all(clean["px_images"].numpy() == 0)


def test_augment_px():
    images, labels = _unique_images(64, (16, 16, 3))
    dataset = data.make_train_dataset(
        images, labels, batch_size=32, augment="crop_flip", augment_px=True, seed=1
    )
    inputs, _ = next(iter(dataset))
    x_px = inputs["px_images"].numpy()
    assert x_px.shape == (32, 16, 16, 3)
    assert len(_row_set(x_px) - _row_set(images)) > 16


def _windows(image, padding):
    padded = np.pad(image, [(padding, padding), (padding, padding), (0, 0)], mode="reflect")
    h, w = image.shape[:2]
    return {
        padded[dy : dy + h, dx : dx + w].tobytes(): (dy, dx)
        for dy in range(2 * padding + 1)
        for dx in range(2 * padding + 1)
    }


def test_random_crop_and_flip_on_handmade_image():
    image = np.arange(6 * 5, dtype=np.float32).reshape(6, 5, 1) / 30.0
    batch = np.repeat(image[None], 64, axis=0)
    windows = _windows(image, 2)
    flipped_windows = _windows(image[:, ::-1], 2)

    cropped = data.random_crop(batch, 2, seed=tf.constant([1, 2])).numpy()
    offsets = {windows[x.tobytes()] for x in cropped}  # KeyError if not a valid window.
    assert len(offsets) > 10

    flipped = data.random_flip(batch, seed=tf.constant([3, 4])).numpy()
    is_flipped = [np.array_equal(x, image[:, ::-1]) for x in flipped]
    assert all(np.array_equal(x, image) or f for x, f in zip(flipped, is_flipped))
    assert 10 < sum(is_flipped) < 54

    crop_only = data.augment(batch, "crop", seed=tf.constant([5, 6]), padding=2).numpy()
    assert all(x.tobytes() in windows for x in crop_only)  # Never flipped.
    both = data.augment(batch, "crop_flip", seed=tf.constant([5, 6]), padding=2).numpy()
    num_flipped = sum(x.tobytes() in flipped_windows and x.tobytes() not in windows for x in both)
    assert all(x.tobytes() in windows or x.tobytes() in flipped_windows for x in both)
    assert num_flipped > 10
    np.testing.assert_array_equal(data.augment(batch, None, seed=tf.constant([0, 0])), batch)


def test_eval_dataset():
    images, labels = _unique_images(25)
    batches = list(data.make_eval_dataset(images, labels, batch_size=10))
    assert [len(y) for _, y in batches] == [10, 10, 5]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), images)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)
    noisy = np.concatenate(list(data.make_eval_dataset(images, batch_size=10, noise_scale=0.05)))
    assert noisy.shape == images.shape
    assert abs((noisy - images).std() - 0.05) < 0.01


def test_split_validation_and_steps():
    images = np.arange(100)[:, None]
    labels = np.arange(100)
    (x_train, y_train), (x_val, y_val) = data.split_validation(images, labels, 20)
    assert len(x_train) == 80 and len(x_val) == 20
    np.testing.assert_array_equal(x_train[:, 0], y_train)
    assert set(y_train).isdisjoint(y_val) and set(y_train) | set(y_val) == set(range(100))
    (_, y_train2), _ = data.split_validation(images, labels, 20)
    np.testing.assert_array_equal(y_train, y_train2)
    (_, y_train3), _ = data.split_validation(images, labels, 20, seed=1)
    assert not np.array_equal(y_train, y_train3)
    (_, y_all), (x_none, _) = data.split_validation(images, labels, 0)
    assert len(y_all) == 100 and len(x_none) == 0
    with pytest.raises(ValueError, match="num_validation"):
        data.split_validation(images, labels, 100)
    assert data.steps_per_epoch(45000, 64) == 703
    assert data.steps_per_epoch(50000, 128) == 390
    assert data.steps_per_epoch(10, 4, drop_remainder=False) == 3


def test_pipeline_input_validation():
    images, labels = _unique_images(20)
    with pytest.raises(ValueError, match="to_model_range"):
        data.make_train_dataset((images * 127.5 + 127.5).astype(np.uint8), labels)
    with pytest.raises(ValueError, match=r"\[-1, 1\].*received values in \[0, 255\]"):
        data.make_train_dataset(np.linspace(0, 255, 20 * 64).reshape(20, 8, 8, 1), labels)
    with pytest.raises(ValueError, match=r"rank-4.*received shape \(20, 8, 8\)"):
        data.make_train_dataset(images[..., 0], labels)
    with pytest.raises(ValueError, match="batch_size.*positive"):
        data.make_train_dataset(images, labels, batch_size=0)
    with pytest.raises(ValueError, match="px_batch_size"):
        data.make_train_dataset(images, labels, batch_size=4, px_batch_size=-1)
    with pytest.raises(ValueError, match="larger than the number of examples"):
        data.make_train_dataset(images, labels, batch_size=64)
    with pytest.raises(ValueError, match="augment.*'crop_flip'"):
        data.make_train_dataset(images, labels, batch_size=4, augment="flip")
    with pytest.raises(ValueError, match="same length"):
        data.make_train_dataset(images, labels[:5], batch_size=4)
    with pytest.raises(ValueError, match="noise_scale"):
        data.make_train_dataset(images, labels, batch_size=4, noise_scale=-0.1)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_eval_dataset(images, labels, batch_size=0)


# OOD sets.


@pytest.mark.parametrize("image_shape", [(8, 8, 1), (32, 32, 3)])
@pytest.mark.parametrize(
    "name", ["uniform_noise", "gaussian_noise", "constant", "interpolation", "faces", "photos",
             "vertical_flip", "mnist_like_digits"]
)
def test_ood_sets(name, image_shape):
    reference, _ = data.load("synthetic", "test", image_shape=image_shape, num_examples=30)
    x = data.load_ood(name, like=image_shape, reference_images=reference, num_examples=30, seed=1)
    assert x.shape == (30,) + image_shape and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05
    again = data.load_ood(
        name, like=image_shape, reference_images=reference, num_examples=30, seed=1
    )
    np.testing.assert_array_equal(x, again)


def test_ood_set_details():
    constant = data.load_ood("constant", like=(8, 8, 3), num_examples=5)
    assert np.all(constant == constant[:, :1, :1, :])
    reference, _ = _unique_images(10)
    interp = data.load_ood("interpolation", like=(8, 8, 1), reference_images=reference)
    assert interp.shape == (10, 8, 8, 1)
    pairs = (reference[:, None] + reference[None, :]) / 2  # (10, 10, 8, 8, 1)
    for x in interp:
        i, j = np.argwhere(np.all(np.isclose(pairs, x), axis=(2, 3, 4)))[0]
        assert i != j
    assert data.load_ood("faces", like="cifar10").shape == (100, 32, 32, 3)
    assert data.load_ood("uniform_noise", like="digits").shape == (1000, 8, 8, 1)


def test_ood_bad_arguments():
    with pytest.raises(ValueError, match="Unknown OOD set: 'mnist'.*uniform_noise"):
        data.load_ood("mnist", like=(8, 8, 1))
    with pytest.raises(ValueError, match="reference_images"):
        data.load_ood("interpolation", like=(8, 8, 1))
    with pytest.raises(ValueError, match="like.*channels"):
        data.load_ood("uniform_noise", like=(8, 8, 2))
    with pytest.raises(ValueError, match="Unknown dataset name"):
        data.load_ood("uniform_noise", like="mnist")
