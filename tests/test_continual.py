"""Class-incremental learning: `trainers.continual` and JEM's batch-restricted cross-entropy."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import keras_jem
from keras_jem.backbones import SmallCNN
from keras_jem.models.energy_model import Batch
from trainers import continual
from trainers.factory import ConfigError


def _logsumexp(values, axis=-1):
    top = values.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(values - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def _tiny_jem(ce_classes):
    model = keras_jem.JEM(SmallCNN(), num_classes=5, px_weight=0.0, buffer_size=16,
                          ce_classes=ce_classes, seed=0)
    model.build((None, 8, 8, 1))
    return model


def test_batch_restricted_cross_entropy_matches_hand_computation():
    model = _tiny_jem("batch")
    x = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    y = np.array([1, 3, 3, 1], np.int32)  # classes 0, 2, 4 absent from the batch
    with tf.GradientTape() as tape:
        loss, values = model.loss_passes(Batch(x, x, tf.constant(y), None), {})[0]()
    bias = model.head.bias
    gradient = tape.gradient(loss, bias).numpy()
    logits = model(x).numpy().astype(np.float64)
    # By hand: the softmax runs over classes 1 and 3 only.
    kept = logits[:, [1, 3]]
    expected = np.mean(_logsumexp(kept) - logits[np.arange(4), y])
    np.testing.assert_allclose(float(values["loss_ce"]), expected, rtol=1e-5)
    # d/d bias_c of the mean CE: mean(softmax over the kept classes - one_hot); 0 for absent.
    probabilities = np.zeros_like(logits)
    probabilities[:, [1, 3]] = np.exp(kept - _logsumexp(kept)[:, None])
    expected_gradient = np.mean(probabilities - np.eye(5)[y], axis=0)
    np.testing.assert_allclose(gradient, expected_gradient, atol=1e-6)
    assert np.all(gradient[[0, 2, 4]] == 0)
    # The logged logits (accuracy, predictions) keep every class.
    np.testing.assert_allclose(values["logits"].numpy(), logits, rtol=1e-5)
    # "all" is the plain cross-entropy over the 5 classes.
    full = _tiny_jem("all")
    full.set_weights(model.get_weights())
    _, values = full.loss_passes(Batch(x, x, tf.constant(y), None), {})[0]()
    np.testing.assert_allclose(float(values["loss_ce"]),
                               np.mean(_logsumexp(logits) - logits[np.arange(4), y]), rtol=1e-5)


def test_ce_classes_config_and_errors():
    model = _tiny_jem("batch")
    assert model.get_config()["ce_classes"] == "batch"
    assert keras_jem.JEM.from_config(model.get_config()).ce_classes == "batch"
    with pytest.raises(ValueError, match="`ce_classes` must be one of all, batch. Received: "
                                         "ce_classes='task'"):
        keras_jem.JEM(SmallCNN(), num_classes=5, ce_classes="task")


def test_accuracy_helpers_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    predictions = np.array([0, 1, 1, 1, 3, 2, 0])
    np.testing.assert_allclose(continual.per_class_accuracy(predictions, labels, 5)[:4],
                               [0.5, 1.0, 0.5, 0.0])
    assert np.isnan(continual.per_class_accuracy(predictions, labels, 5)[4])
    assert continual.seen_accuracy(predictions, labels, (0, 1)) == 0.75
    assert continual.seen_accuracy(predictions, labels, (2, 3)) == pytest.approx(1 / 3)
    # Only the seen classes compete: class 4 has the largest logit but was never trained.
    logits = np.array([[0.1, 0.5, 0.2, 0.0, 9.0], [2.0, 0.5, 3.0, 0.0, 9.0]])
    np.testing.assert_array_equal(continual.predict_among(logits, (0, 1)), [1, 0])
    np.testing.assert_array_equal(continual.predict_among(logits, (0, 1, 2, 3)), [1, 2])


TINY = ["--epochs", "1", "--steps_per_epoch", "2", "--batch_size", "16", "--noise_scale", "0",
        "--augment", "none",
        "--verbose", "0", "--sample_every", "0"]


def test_each_fit_sees_only_its_task(tmp_path, monkeypatch):
    """Every image of both streams each `fit` draws is one of that task's training images."""
    from keras_jem import data

    train_x, train_y = data.load("digits", "train")
    seen = []
    original_fit = keras_jem.JEM.fit

    def recording_fit(self, dataset, **kwargs):
        labels, images = [], []
        for x, y in dataset.take(kwargs["steps_per_epoch"] * kwargs["epochs"]):
            labels.append(y.numpy())
            images += [x["images"].numpy(), x["px_images"].numpy()]
        seen.append((np.concatenate(labels), np.concatenate(images)))
        return original_fit(self, dataset, **kwargs)

    monkeypatch.setattr(keras_jem.JEM, "fit", recording_fit)
    args, config = continual.resolve(
        ["--model", "softmax", "--tasks", "5", "--model_dir", str(tmp_path)] + TINY)
    result = continual.run(args, config)
    assert len(seen) == 5
    for t, (labels, images) in enumerate(seen):
        classes = {2 * t, 2 * t + 1}
        assert set(labels.tolist()) <= classes, (t, set(labels.tolist()))
        task_rows = {row.tobytes() for row in train_x[np.isin(train_y, list(classes))]}
        assert all(image.tobytes() in task_rows for image in images), t
    # The report: one row of per-class accuracies per task; the summaries agree with them.
    matrix = np.array(result["per_class_accuracy"])
    assert matrix.shape == (5, 10)
    on_disk = json.loads((tmp_path / "continual.json").read_text())
    assert on_disk["per_task"][-1]["seen"] == list(range(10))
    test_y = data.load("digits", "test")[1]
    counts = np.bincount(test_y, minlength=10)
    for t, summary in enumerate(result["per_task"]):
        seen_classes = summary["seen"]
        weighted = np.sum(matrix[t, seen_classes] * counts[seen_classes]) / counts[
            seen_classes].sum()
        assert summary["seen_accuracy"] == pytest.approx(weighted)
    assert result["average_accuracy"] == pytest.approx(
        np.mean([s["seen_accuracy"] for s in result["per_task"]]))
    assert os.path.getsize(tmp_path / "continual.png") > 1000
    assert "After task 5 (classes 8, 9" in (tmp_path / "continual.md").read_text()


def test_learners_settings(tmp_path):
    _, config = continual.resolve(["--model", "jem", "--model_dir", str(tmp_path)])
    assert (config["px_weight"], config["pxy_weight"]) == (0.0, 1.0)
    assert continual.construct(config, keras_jem.data.get_info("digits")).ce_classes == "batch"
    _, config = continual.resolve(["--model", "jem", "--pxy_weight", "0.5"])
    assert config["pxy_weight"] == 0.5  # the user's flags win
    with pytest.raises(ConfigError, match="buffer_init gaussian_mixture"):
        continual.resolve(["--model", "jem", "--buffer_init", "gaussian_mixture"])
    with pytest.raises(ConfigError, match="must be conditional"):
        continual.resolve(["--model", "igebm", "--no-conditional"])
    with pytest.raises(SystemExit):
        continual.resolve(["--model", "gmmc"])


@pytest.mark.large
def test_energy_model_keeps_more_old_class_accuracy_than_softmax(tmp_path):
    """Three tasks of digits: IGEBM's old classes survive better than fine-tuned softmax's."""
    old = {}
    for name in ("softmax", "igebm"):
        args, config = continual.resolve(
            ["--model", name, "--tasks", "5", "--epochs", "15", "--verbose", "0",
             "--sample_every", "0", "--model_dir", str(tmp_path / name)])
        result = continual.run(args, config)
        old[name] = np.mean([s["old_classes_accuracy"] for s in result["per_task"][1:]])
    assert old["igebm"] > old["softmax"] + 0.1, old
