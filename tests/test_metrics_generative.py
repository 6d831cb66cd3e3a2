import warnings

import numpy as np
import pytest

from keras_jem import metrics
from keras_jem.metrics import generative


def _gaussian_fid(mu1, var1, mu2, var2):
    """Closed form for diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(v1) - sqrt(v2))^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2))


def test_frechet_distance_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    value = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert value == pytest.approx(_gaussian_fid(mu1, var1, mu2, var2), rel=1e-9)
    # A full-covariance case: rotate both Gaussians by the same orthogonal matrix.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = metrics.frechet_distance(q @ mu1, q @ np.diag(var1) @ q.T, q @ mu2,
                                       q @ np.diag(var2) @ q.T)
    assert rotated == pytest.approx(value, rel=1e-7)


def test_fid_of_gaussian_samples_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.zeros(4), np.array([0.5, -0.5, 0.0, 1.0])
    var1, var2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.5, 3.0])
    a = mu1 + np.sqrt(var1) * rng.standard_normal((20000, 4))
    b = mu2 + np.sqrt(var2) * rng.standard_normal((20000, 4))
    expected = _gaussian_fid(mu1, var1, mu2, var2)
    assert metrics.fid_from_activations(a, b) == pytest.approx(expected, rel=0.05)


def test_fid_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(1).normal(size=(1000, 32))
    assert metrics.fid_from_activations(features, features) == pytest.approx(0.0, abs=1e-6)


def test_fid_near_singular_covariances_never_complex():
    rng = np.random.default_rng(2)
    # Fewer samples than dimensions, and dead (constant) units: rank-deficient covariances.
    a = np.concatenate([rng.normal(size=(10, 40)), np.zeros((10, 24))], axis=1)
    b = np.concatenate([rng.normal(size=(12, 40)) + 0.1, np.ones((12, 24))], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = metrics.fid_from_activations(a, b)
        same = metrics.fid_from_activations(a, a)
    assert isinstance(value, float) and np.isfinite(value) and value > 0
    assert isinstance(same, float) and same == pytest.approx(0.0, abs=1e-3)
    # Rank-one covariances built by hand.
    u = rng.normal(size=(16, 1))
    v = rng.normal(size=(16, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = metrics.frechet_distance(np.zeros(16), u @ u.T, np.zeros(16), v @ v.T)
    expected = (u.T @ u + v.T @ v - 2 * abs(u.T @ v)).item()  # Tr of the rank-one sqrt product
    assert isinstance(value, float) and value == pytest.approx(expected, rel=1e-3, abs=1e-4)


def test_symmetric_fallback_is_used_when_sqrtm_fails(monkeypatch):
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(50, 5)), rng.normal(size=(50, 5)) * 2
    expected = metrics.fid_from_activations(a, b)
    monkeypatch.setattr(generative.scipy.linalg, "sqrtm",
                        lambda m: np.full(m.shape, np.nan) + 1j)
    with pytest.warns(RuntimeWarning, match="symmetric eigenvalue"):
        assert metrics.fid_from_activations(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="same feature extractor"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.activation_statistics(np.zeros((1, 4)))


def test_inception_score_bounds():
    num_classes = 10
    uniform = np.full((50, num_classes), 1.0 / num_classes)
    assert metrics.inception_score(uniform)[0] == pytest.approx(1.0)
    one_hot = np.eye(num_classes)[np.arange(100) % num_classes]
    mean, std = metrics.inception_score(one_hot, num_splits=2)
    assert mean == pytest.approx(num_classes) and std == pytest.approx(0.0)
    # Confident but always the same class: IS 1.
    assert metrics.inception_score(np.eye(num_classes)[np.zeros(20, int)])[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.inception_score(np.ones((4, 3)))


def test_statistics_round_trip(tmp_path):
    features = np.random.default_rng(4).normal(size=(30, 6))
    mu, sigma = metrics.activation_statistics(features)
    path = metrics.save_statistics(tmp_path / "ref", mu, sigma, dataset="digits", num_images=30)
    assert path.endswith(".npz")
    loaded = metrics.load_statistics(path)
    np.testing.assert_array_equal(loaded["mu"], mu)
    np.testing.assert_array_equal(loaded["sigma"], sigma)
    assert loaded["metadata"] == {"dataset": "digits", "num_images": 30}
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="missing arrays"):
        metrics.load_statistics(tmp_path / "bad.npz")


def test_select_top_k_per_class():
    confidence = np.array([0.9, 0.5, 0.8, 0.7, 0.95, 0.6, 0.55])
    predicted = np.array([0, 0, 0, 0, 1, 1, 1])
    probabilities = np.zeros((7, 2))
    probabilities[np.arange(7), predicted] = confidence
    probabilities[np.arange(7), 1 - predicted] = 1 - confidence
    np.testing.assert_array_equal(metrics.select_top_k_per_class(probabilities, 0.5), [0, 2, 4])
    np.testing.assert_array_equal(metrics.select_top_k_per_class(probabilities, 2), [0, 2, 4, 5])
    assert len(metrics.select_top_k_per_class(probabilities, 100)) == 7
    assert len(metrics.select_top_k_per_class(probabilities, 1.0)) == 7


def test_sample_quality_with_a_tiny_extractor():
    rng = np.random.default_rng(5)
    projection = rng.normal(size=(64, 8))

    def features(images):
        return images.reshape(len(images), -1) @ projection

    def probabilities(images):
        logits = features(images)[:, :4]
        exp = np.exp(logits - logits.max(1, keepdims=True))
        return exp / exp.sum(1, keepdims=True)

    extractor = metrics.FeatureExtractor(features, probabilities, batch_size=7, name="tiny")
    real = rng.uniform(-1, 1, (60, 8, 8, 1)).astype("float32")
    reference = dict(zip(("mu", "sigma"), metrics.activation_statistics(extractor.features(real))))
    quality = metrics.sample_quality(real, extractor, reference)
    assert quality["fid"] == pytest.approx(0.0, abs=1e-6)
    assert 1.0 <= quality["inception_score"] <= 4.0
    assert quality["extractor"] == "tiny" and quality["num_images"] == 60
    no_classifier = metrics.FeatureExtractor(features)
    quality = metrics.sample_quality(real, no_classifier, None)
    assert quality["inception_score"] is None and quality["fid"] is None
    assert set(quality["skipped"]) == {"inception_score", "fid"}


def test_inception_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        metrics.find_inception_weights()
    message = str(info.value)
    assert generative.INCEPTION_WEIGHTS_FILE in message and "cannot be downloaded" in message
    assert str(tmp_path / "models") in message
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        metrics.InceptionFeatureExtractor(str(tmp_path / "missing.h5"))
    # A file in the Keras cache folder is found without a path.
    (tmp_path / "models").mkdir()
    cached = tmp_path / "models" / generative.INCEPTION_WEIGHTS_FILE_NO_TOP
    cached.write_bytes(b"")
    assert metrics.find_inception_weights() == (str(cached), False)
    assert metrics.find_inception_weights(str(tmp_path / "models")) == (str(cached), False)


@pytest.mark.large  # building InceptionV3 takes 5-15 s on 2 CPU cores
def test_inception_extractor_random_weights():
    with pytest.warns(UserWarning, match="random weights"):
        extractor = metrics.InceptionFeatureExtractor(None, image_size=75, batch_size=3)
    images = np.random.default_rng(6).uniform(-1, 1, (4, 8, 8, 1)).astype("float32")
    features, probabilities = extractor.extract(images)
    assert features.shape == (4, 2048) and probabilities.shape == (4, 1000)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-4)


@pytest.mark.large  # writes and reads an 88 MB weights file: about a minute on 2 CPU cores
def test_inception_extractor_loads_a_local_keras_weights_file(tmp_path):
    """The offline path: a file with Keras' InceptionV3 weights name and layout is loaded."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    network = keras.applications.InceptionV3(
        include_top=False, weights=None, input_shape=(75, 75, 3), pooling="avg")
    path = tmp_path / generative.INCEPTION_WEIGHTS_FILE_NO_TOP
    with h5py.File(path, "w") as f:  # the legacy layout of the files Keras downloads
        legacy_h5_format.save_weights_to_hdf5_group(f, network)
    extractor = metrics.InceptionFeatureExtractor(str(path), image_size=75)
    assert not extractor.include_top and not extractor.has_probabilities
    images = np.random.default_rng(7).uniform(-1, 1, (3, 75, 75, 3)).astype("float32")
    np.testing.assert_allclose(extractor.features(images),
                               network.predict(images, verbose=0), rtol=1e-4, atol=1e-5)
