import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn import metrics as sk_metrics

from keras_jem import metrics


def test_auroc_equals_sklearn():
    rng = np.random.default_rng(0)
    in_scores = rng.normal(1.0, 1.0, 300)
    out_scores = rng.normal(0.0, 1.5, 200)
    result = metrics.ood_metrics(in_scores, out_scores)
    labels = np.r_[np.ones(300), np.zeros(200)]
    expected = sk_metrics.roc_auc_score(labels, np.r_[in_scores, out_scores])
    assert result["auroc"] == pytest.approx(expected, abs=1e-12)
    assert result["num_in"] == 300 and result["num_out"] == 200


def test_fpr_at_95_tpr_hand_case():
    # In-distribution scores 1..20: keeping 95% of them (19 of 20) needs threshold 2.
    # OOD scores 0.5, 1.5, 2.5, 100: two of four are >= 2, so FPR = 0.5.
    in_scores = np.arange(1, 21, dtype=float)
    out_scores = np.array([0.5, 1.5, 2.5, 100.0])
    result = metrics.ood_metrics(in_scores, out_scores)
    assert result["fpr_at_95_tpr"] == pytest.approx(0.5)
    assert result["threshold_at_95_tpr"] == pytest.approx(2.0)
    # AUROC by counting pairs: (in > out) + ties / 2.
    pairs = (in_scores[:, None] > out_scores[None]).mean()
    assert result["auroc"] == pytest.approx(pairs)


def test_perfect_separation():
    result = metrics.ood_metrics([5.0, 6.0, 7.0], [1.0, 2.0])
    assert result["auroc"] == 1.0 and result["fpr_at_95_tpr"] == 0.0


def test_non_finite_scores_raise():
    with pytest.raises(ValueError, match="non-finite"):
        metrics.ood_metrics([1.0, np.nan], [0.0])
    with pytest.raises(ValueError, match="empty"):
        metrics.ood_metrics([], [0.0])


@pytest.fixture(scope="module")
def linear_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    return model


def test_score_functions_match_numpy(linear_model):
    images = np.random.default_rng(0).uniform(-1, 1, (7, 4, 4, 1)).astype("float32")
    kernel, bias = [np.asarray(w, np.float64) for w in linear_model.get_weights()]
    logits = images.reshape(7, -1) @ kernel + bias
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    lse = np.log(np.exp(logits).sum(1))
    np.testing.assert_allclose(
        metrics.get_score("logsumexp")(linear_model, images, batch_size=3), lse, rtol=1e-5)
    np.testing.assert_allclose(
        metrics.get_score("max_softmax")(linear_model, images, batch_size=3),
        probabilities.max(1), rtol=1e-5)
    # d logsumexp(Wx + b) / dx = W softmax(Wx + b).
    gradient = probabilities @ kernel.T
    np.testing.assert_allclose(
        metrics.get_score("grad_norm")(linear_model, images, batch_size=4),
        -np.linalg.norm(gradient, axis=1), rtol=1e-4)


def test_energy_score_and_registry(linear_model):
    class WithEnergy:
        def energy(self, x, y=None, training=False):
            return tf.reduce_sum(x, axis=[1, 2, 3])

    images = np.ones((5, 4, 4, 1), "float32")
    np.testing.assert_allclose(metrics.get_score("energy")(WithEnergy(), images), -16.0)
    with pytest.raises(TypeError, match="energy"):
        metrics.get_score("energy")(linear_model, images)
    with pytest.raises(ValueError, match="Unknown OOD score"):
        metrics.get_score("p_x_y")
    assert {"logsumexp", "max_softmax", "grad_norm", "energy"} <= set(metrics.available_scores())

    @metrics.register_score("test_mean_pixel")
    def mean_pixel(model, images, batch_size=100):
        return images.mean(axis=(1, 2, 3))

    assert metrics.get_score("test_mean_pixel") is mean_pixel
    assert metrics.get_score(mean_pixel) is mean_pixel


def test_score_histogram_png(tmp_path):
    rng = np.random.default_rng(0)
    path = metrics.score_histogram(
        rng.normal(size=100), {"noise": rng.normal(3, 1, 50), "faces": [1e9] + [0.0] * 20},
        tmp_path / "hist.png", score_name="logsumexp")
    with Image.open(path) as image:
        assert image.format == "PNG"
