import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_jem import data
from keras_jem import metrics


@pytest.fixture(scope="module")
def digits_classifier():
    """A small MLP trained for a few seconds on scikit-learn's digits (about 95% test)."""
    keras.utils.set_random_seed(0)
    x_train, y_train = data.load("digits", "train")
    x_test, y_test = data.load("digits", "test")
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10),
    ])
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=15, batch_size=64, verbose=0)
    return model, x_test[:200], y_test[:200]


def test_pgd_reduces_accuracy_monotonically(digits_classifier):
    model, images, labels = digits_classifier
    epsilons = [0.0, 0.02, 0.05, 0.1, 0.2]
    for norm, eps in (("linf", epsilons), ("l2", [e * 8 for e in epsilons])):
        curve = metrics.robust_accuracy_curve(
            model, images, labels, eps, norm=norm, num_steps=10, seed=0)
        clean = metrics.classification_metrics(
            metrics.predict_logits(model, images), labels)["accuracy"]
        assert curve["accuracy"][0] == pytest.approx(clean)
        assert clean > 0.85
        raw = np.array(curve["per_epsilon_accuracy"])
        assert np.all(np.diff(raw) <= 1e-9), (norm, raw)  # the attack itself is monotone
        assert np.all(np.diff(curve["accuracy"]) <= 0)
        assert curve["accuracy"][-1] < 0.3 < clean
        # Settings and both units are in the output.
        assert curve["epsilon_unit"] == "pixel"
        np.testing.assert_allclose(curve["epsilons_data"], 2 * np.array(eps))
        assert max(p - e for p, e in zip(curve["max_perturbation_data"],
                                         curve["epsilons_data"])) <= 1e-5


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_range(digits_classifier, norm):
    model, images, labels = digits_classifier
    epsilon = 0.15 if norm == "linf" else 1.0  # pixel units: x2 in the [-1, 1] range
    adversarial = metrics.pgd_attack(
        model, images, labels, epsilon, norm=norm, num_steps=8, step_size=epsilon / 2,
        num_restarts=2, batch_size=64, seed=1)
    assert adversarial.shape == images.shape and adversarial.dtype == np.float32
    assert adversarial.min() >= -1.0 and adversarial.max() <= 1.0
    delta = (adversarial - images).reshape(len(images), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= 2 * epsilon + 1e-5
    assert size.max() > 1.5 * epsilon  # the attack uses its budget
    # Digits have many pixels at -1: the clipping must have been active.
    assert np.isclose(adversarial, -1.0).mean() > 0.1


def test_epsilon_units(digits_classifier):
    model, images, labels = digits_classifier
    assert metrics.to_data_units(8 / 255) == pytest.approx(16 / 255)
    assert metrics.to_data_units(0.3, "data") == 0.3
    pixel = metrics.pgd_attack(model, images[:20], labels[:20], 0.05, num_steps=3, seed=3)
    data_units = metrics.pgd_attack(model, images[:20], labels[:20], 0.1, num_steps=3, seed=3,
                                    epsilon_unit="data")
    np.testing.assert_allclose(pixel, data_units, atol=1e-6)
    with pytest.raises(ValueError, match="epsilon_unit"):
        metrics.to_data_units(0.1, "uint8")
    with pytest.raises(ValueError, match="norm"):
        metrics.pgd_attack(model, images, labels, 0.1, norm="l1")
    with pytest.raises(ValueError, match="data range"):
        metrics.pgd_attack(model, images * 3, labels, 0.1)


def test_project_clips_after_ball():
    original = tf.constant([[0.9, -0.5, 0.0]])
    moved = metrics.project(tf.constant([[2.0, -0.5, 0.3]]), original, 0.4, "l2")
    np.testing.assert_allclose(moved.numpy(), [[1.0, -0.5, 0.0 + 0.3 * 0.4 / np.hypot(1.1, 0.3)]],
                               rtol=1e-5)
    moved = metrics.project(tf.constant([[2.0, -2.0, 0.05]]), original, 0.2, "linf")
    np.testing.assert_allclose(moved.numpy(), [[1.0, -0.7, 0.05]], rtol=1e-6)


def test_refined_logits_are_differentiable(digits_classifier):
    model, images, labels = digits_classifier
    plain = metrics.RefinedLogits(model, num_steps=0, num_chains=1, init_noise=0.0)
    np.testing.assert_allclose(plain(images[:5]).numpy(), model(images[:5]).numpy(), rtol=1e-5)
    refined = metrics.RefinedLogits(model, num_steps=2, num_chains=3, seed=0)
    x = tf.constant(images[:4])
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = refined(x)
        target = tf.reduce_sum(logits[:, 0])
    gradient = tape.gradient(target, x)
    assert logits.shape == (4, 10)
    assert gradient is not None and np.all(np.isfinite(gradient.numpy()))
    # Refinement ascends logsumexp.
    ascended = metrics.sgld_refine(model, images[:20], num_steps=3, step_size=0.05,
                                   noise_scale=0.0)
    before = tf.reduce_logsumexp(model(images[:20]), -1)
    after = tf.reduce_logsumexp(model(ascended), -1)
    assert float(tf.reduce_mean(after - before)) > 0
    curve = metrics.robust_accuracy_curve(model, images[:20], labels[:20], [0.0, 0.2],
                                          num_steps=2, refine_steps=1, refine_chains=2)
    assert len(curve["accuracy"]) == 2
    assert curve["refinement"]["num_steps"] == 1 and curve["refinement"]["init_noise"] == 0.03


def _linear_logits(matrix):
    """logits = flatten(x) @ A^T for a fixed A (num_classes, features)."""
    a = tf.constant(matrix, tf.float32)
    return lambda x: tf.matmul(tf.reshape(x, [tf.shape(x)[0], -1]), a, transpose_b=True)


@pytest.mark.parametrize("gradient", ["straight_through", "exact"])
def test_refinement_gradient_matches_the_formula(gradient):
    # One noiseless step r = x + s * A^T p, p = softmax(A x), attacked through L = c . (A r).
    # JEM's attack_model.py adds the step with `x.data += ...`: dL/dx = A^T c ("straight_through").
    # Through the step: dL/dx = A^T c + s * A^T (diag(p) - p p^T) A A^T c ("exact").
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4))
    x = rng.normal(size=(1, 2, 2, 1))
    c = rng.normal(size=3)
    step = 0.7
    logits_fn = _linear_logits(a)
    images = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(images)
        refined = metrics.sgld_refine(logits_fn, images, num_steps=1, step_size=step,
                                      noise_scale=0.0, gradient=gradient)
        objective = tf.reduce_sum(logits_fn(refined) * tf.constant(c, tf.float32))
    got = tape.gradient(objective, images).numpy().reshape(-1)

    flat = x.reshape(-1)
    z = a @ flat
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(refined.numpy().reshape(-1), flat + step * a.T @ p, rtol=1e-5)
    expected = a.T @ c
    if gradient == "exact":
        expected = expected + step * a.T @ (np.diag(p) - np.outer(p, p)) @ a @ a.T @ c
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    # The two differ here, so each assertion tells the modes apart.
    assert np.abs(step * a.T @ (np.diag(p) - np.outer(p, p)) @ a @ a.T @ c).max() > 1e-2


def test_refinement_gradient_is_checked_and_reported():
    with pytest.raises(ValueError, match="straight_through"):
        metrics.RefinedLogits(lambda x: x, num_steps=1, gradient="stop")
    logits_fn = _linear_logits(np.eye(2, 4))
    images = np.zeros((2, 2, 2, 1), np.float32)
    default = metrics.robust_accuracy_curve(logits_fn, images, [0, 1], [0.0], refine_steps=1)
    assert default["refinement"]["gradient"] == "straight_through"
    exact = metrics.robust_accuracy_curve(logits_fn, images, [0, 1], [0.0], refine_steps=1,
                                          refine_gradient="exact")
    assert exact["refinement"]["gradient"] == "exact"


def test_curve_json_and_plot(tmp_path, digits_classifier):
    model, images, labels = digits_classifier
    curve = metrics.robust_accuracy_curve(model, images[:30], labels[:30], [0, 4 / 255],
                                          num_steps=2)
    path = metrics.save_robustness_json([curve], tmp_path / "curve.json")
    with open(path) as f:
        assert json.load(f)[0]["epsilons"] == [0.0, 4 / 255]
    png = metrics.save_robustness_plot(curve, tmp_path / "curve.png", title="t")
    with Image.open(png) as image:
        assert image.format == "PNG"
