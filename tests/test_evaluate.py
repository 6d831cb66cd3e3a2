"""End-to-end tests of `python -m trainers.evaluate` on tiny models (digits and mock CIFAR-10)."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_jem import metrics
from tests import testing
from trainers import evaluate

# Tiny settings shared by the end-to-end runs.
FAST = [
    "--num_examples", "60", "--ood_examples", "40", "--batch_size", "50",
    "--attack_examples", "16", "--attack_steps", "2", "--epsilons", "0,8/255,0.2",
    "--l2_epsilons", "0,1", "--num_samples", "20", "--sample_steps", "2",
    "--num_fresh_samples", "30", "--fid_reference_examples", "60",
]


def _save_model_dir(directory, model, dataset, image_shape):
    os.makedirs(directory, exist_ok=True)
    model.save(os.path.join(directory, "model.keras"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model": "jem", "dataset": dataset, "image_shape": list(image_shape),
                   "num_classes": 10, "data_dir": None}, f)
    return str(directory)


@pytest.fixture(scope="module")
def digits_model_dir(tmp_path_factory):
    """A tiny JEM trained for 10 steps on digits, saved in the trainers.fit layout."""
    keras.utils.set_random_seed(0)
    model = testing.make_model(backbone=testing.small_cnn(filters=(8,), feature_dim=16),
                               buffer_size=100)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images, labels = testing.load_digits("train", num_examples=320)
    model.fit(images, labels, batch_size=32, epochs=1, verbose=0)
    return _save_model_dir(tmp_path_factory.mktemp("jem_digits"), model, "digits", (8, 8, 1))


@pytest.fixture(autouse=True)
def no_inception_weights(tmp_path, monkeypatch):
    """An empty Keras cache: the default InceptionV3 weights lookup finds nothing."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))


def _run(model_dir, output_dir, *extra):
    return evaluate.main(["--model_dir", model_dir, "--output_dir", str(output_dir), *FAST,
                          *extra])


def _load(output_dir):
    with open(os.path.join(output_dir, "eval.json")) as f:
        return json.load(f)


def _check_report_figures(output_dir):
    with open(os.path.join(output_dir, "report.md")) as f:
        report = f.read()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    for figure in figures:
        assert not os.path.isabs(figure)
        assert os.path.isfile(os.path.join(output_dir, figure)), figure
    return report, figures


def test_end_to_end_digits(digits_model_dir, tmp_path):
    output_dir = tmp_path / "eval"
    assert _run(digits_model_dir, output_dir) == 0
    result = _load(output_dir)
    assert {name: task["status"] for name, task in result["tasks"].items()} == {
        name: "ok" for name in evaluate.DEFAULT_TASKS}
    tasks = result["tasks"]
    accuracy = tasks["accuracy"]["results"]["accuracy"]
    assert 0.0 <= accuracy <= 1.0 and tasks["accuracy"]["settings"]["num_examples"] == 60
    assert tasks["calibration"]["results"]["num_bins"] == 20
    assert tasks["calibration"]["results"]["accuracy"] == pytest.approx(accuracy)
    ood = tasks["ood"]["results"]
    assert set(ood) == {"logsumexp", "max_softmax", "grad_norm"}
    assert set(ood["logsumexp"]) == {"uniform_noise", "interpolation", "faces", "photos"}
    assert all(0 <= v["auroc"] <= 1 for per_set in ood.values() for v in per_set.values())
    linf = tasks["robustness"]["results"]["linf"]
    assert linf["epsilons"] == pytest.approx([0, 8 / 255, 0.2])
    assert linf["epsilons_data"] == pytest.approx([0, 16 / 255, 0.4])
    assert linf["num_steps"] == 2 and linf["step_sizes_data"][1] == pytest.approx(4 / 255)
    assert linf["accuracy"][0] >= linf["accuracy"][-1]
    generation = tasks["generation"]
    assert "IS/FID" not in generation.get("reason", "")
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels" in (
        generation["skipped"]["inception_score_and_fid"])
    assert generation["results"]["samples_per_class"]["method"].startswith("model.sample(y=")
    assert generation["results"]["replay_buffer"]["size"] == 100
    # Settings that produced the numbers are recorded.
    assert result["settings"]["seed"] == 0 and result["dataset"] == "digits"
    assert result["command"].startswith("python -m trainers.evaluate --model_dir")
    report, figures = _check_report_figures(output_dir)
    for name in ("reliability_diagram.png", "ood_histogram_logsumexp.png", "robustness_linf.png",
                 "samples.png", "samples_per_class.png", "buffer_most_confident.png"):
        assert name in figures
    assert "AUROC" in report and "ECE (20 bins)" in report
    predictions = np.load(output_dir / "predictions.npz")
    assert predictions["correct"].shape == (60,)


def test_saliency_task_and_tensorboard_summaries(digits_model_dir, tmp_path):
    import tensorflow as tf

    output_dir, logs = tmp_path / "eval", tmp_path / "logs"
    assert _run(digits_model_dir, output_dir, "--tasks", "calibration,saliency",
                "--saliency_baseline", digits_model_dir, "--saliency_images", "24",
                "--tensorboard_dir", str(logs)) == 0
    task = _load(output_dir)["tasks"]["saliency"]
    assert task["status"] == "ok" and task["settings"]["num_images"] == 24
    # The model and the baseline (here the same network) have the same vanilla maps
    # (SmoothGrad draws its own noise per model).
    assert set(task["results"]) == {"softmax", "jem"}
    model, baseline = task["results"]["jem"]["vanilla"], task["results"]["softmax"]["vanilla"]
    assert model["object_auroc"] == pytest.approx(baseline["object_auroc"], abs=1e-6)
    assert {"vanilla", "smoothgrad"} <= set(task["results"]["jem"])
    assert os.path.getsize(output_dir / "saliency.png") > 1000
    tags = set()
    for path in tf.io.gfile.glob(str(logs / "**" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    assert {"calibration/reliability_diagram", "saliency/saliency"} <= tags, sorted(tags)


def test_failing_task_keeps_the_others(digits_model_dir, tmp_path, monkeypatch):
    def broken(context):
        raise RuntimeError("score exploded")

    monkeypatch.setitem(evaluate.TASK_FUNCTIONS, "ood", broken)
    output_dir = tmp_path / "eval"
    code = _run(digits_model_dir, output_dir, "--tasks", "accuracy,ood,calibration",
                "--refine_steps", "1")
    assert code == 1
    tasks = _load(output_dir)["tasks"]
    assert tasks["accuracy"]["settings"]["refine_steps"] == 1
    assert tasks["accuracy"]["status"] == "ok" and tasks["calibration"]["status"] == "ok"
    assert tasks["ood"]["status"] == "failed"
    assert "RuntimeError: score exploded" in tasks["ood"]["error"]
    assert "score exploded" in tasks["ood"]["traceback"]
    report, _ = _check_report_figures(output_dir)
    assert "score exploded" in report


def test_generation_leaves_batchnorm_statistics_alone(tmp_path):
    # JEM++ samples with BatchNorm in training mode: each sampler pass would move the moving
    # statistics towards its batches before the buffer is classified.
    from keras_jem.models import JEMPP
    from trainers.evaluation import context as context_lib
    from trainers.evaluation import generation

    keras.utils.set_random_seed(0)
    images, labels = testing.load_digits("train", num_examples=200)
    model = testing.make_model(
        cls=JEMPP, backbone=testing.small_cnn(filters=(8,), feature_dim=16, norm="batch"),
        buffer_size=100, adapt=(images, labels))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(images, labels, batch_size=50, epochs=1, verbose=0)
    model_dir = _save_model_dir(tmp_path / "jempp", model, "digits", (8, 8, 1))
    args = evaluate._validate_args(evaluate.build_parser().parse_args(
        ["--model_dir", model_dir, "--output_dir", str(tmp_path / "eval"), *FAST,
         "--tasks", "generation"]))
    context = context_lib.prepare(args)
    model = context.model
    assert model.sample_in_training_mode
    statistics = {v.path: keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables
                  if "moving" in v.path}
    assert len(statistics) >= 2, sorted(v.path for v in model.non_trainable_variables)
    buffer = keras.ops.convert_to_numpy(model.buffer.images)
    before = np.asarray(model.predict(buffer, batch_size=50, verbose=0))

    task = generation.task(context)

    assert task["status"] == "ok", task
    for variable in model.non_trainable_variables:
        if variable.path in statistics:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable),
                                          statistics[variable.path], err_msg=variable.path)
    after = np.asarray(model.predict(buffer, batch_size=50, verbose=0))
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    counts = task["results"]["replay_buffer"]["predicted_class_counts"]
    assert counts == np.bincount(before.argmax(1), minlength=10).tolist()


def test_generation_scores_buffer_and_fresh_samples(digits_model_dir, tmp_path, monkeypatch):
    # Any file with a Keras InceptionV3 weights name passes the weights check; the extractor
    # itself is replaced by a tiny one (InceptionV3 is too slow for the default suite).
    weights = tmp_path / "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
    weights.write_bytes(b"")
    projection = np.random.default_rng(0).normal(size=(64, 6))
    created = []

    def tiny_extractor(path, image_size=299, batch_size=50, include_top=None):
        created.append(path)

        def features(images):
            return images.reshape(len(images), -1) @ projection

        def probabilities(images):
            logits = features(images)
            exp = np.exp(logits - logits.max(1, keepdims=True))
            return exp / exp.sum(1, keepdims=True)

        return metrics.FeatureExtractor(features, probabilities, batch_size, name="tiny")

    monkeypatch.setattr(metrics, "InceptionFeatureExtractor", tiny_extractor)
    output_dir = tmp_path / "eval"
    code = _run(digits_model_dir, output_dir, "--tasks", "generation", "--fid_weights",
                str(weights), "--is_top_k", "0.5", "--fid_top_k", "5")
    assert code == 0
    assert created == [str(weights)]
    results = _load(output_dir)["tasks"]["generation"]["results"]
    buffer = results["replay_buffer_top_k"]
    assert buffer["inception_score"]["top_k"] == 0.5 and buffer["fid"]["top_k"] == 5
    assert buffer["fid"]["value"] >= 0 and buffer["inception_score"]["value"] >= 1
    assert buffer["fid"]["num_images"] <= 5 * 10
    fresh = results["fresh_samples"]
    assert fresh["num_images"] == 30 and fresh["fid"] >= 0 and fresh["inception_score"] >= 1
    reference = results["fid_reference"]
    assert reference["num_images"] == 60 and reference["extractor"] == "tiny"
    assert os.path.isfile(reference["path"])
    # The saved reference statistics are reused.
    assert _run(digits_model_dir, output_dir, "--tasks", "generation", "--fid_weights",
                str(weights), "--fid_reference", reference["path"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "accuracy,sampling"], "Unknown task"),
        (["--ood_sets", "uniform_noise,imagenet"], "Unknown OOD set"),
        (["--ood_scores", "logsumexp,svm"], "Unknown OOD score"),
        (["--tasks", "ood", "--ood_sets", "svhn"], "not available"),
        (["--dataset", "synthetic"], "Shape mismatch"),
        (["--tasks", "generation", "--fid_weights", "/nowhere/inception.h5"],
         "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"),
        (["--epsilons", "8/0"], "Could not read epsilon"),
        (["--norms", "l1"], "Unknown --norms"),
    ],
)
def test_bad_input_fails_before_computing(digits_model_dir, tmp_path, capsys, extra, message):
    output_dir = tmp_path / "eval"
    data_dir = tmp_path / "empty_tfds"
    code = evaluate.main(["--model_dir", digits_model_dir, "--output_dir", str(output_dir),
                          "--data_dir", str(data_dir), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (output_dir / "eval.json").exists()


def test_model_dir_without_model(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "epoch_001.keras").write_bytes(b"")
    assert evaluate.main(["--model_dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "No trained model" in error and "--checkpoint" in error and "trainers.fit" in error


def test_command_line_entry_point(tmp_path):
    """`python -m trainers.evaluate` validates before importing TensorFlow: fast exit code 2."""
    result = subprocess.run(
        [sys.executable, "-m", "trainers.evaluate", "--model_dir", str(tmp_path),
         "--tasks", "accuracy,nope"],
        cwd=testing.REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2 and "Unknown task" in result.stderr


def test_end_to_end_mock_cifar10(tmp_path):
    import tensorflow_datasets as tfds

    keras.utils.set_random_seed(0)
    model = testing.make_model(image_shape=(32, 32, 3),
                               backbone=testing.small_cnn(filters=(4,), feature_dim=8),
                               buffer_size=20)
    model_dir = _save_model_dir(tmp_path / "jem_cifar", model, "cifar10", (32, 32, 3))
    output_dir = tmp_path / "eval"
    with tfds.testing.mock_data(num_examples=24):
        code = evaluate.main([
            "--model_dir", model_dir, "--output_dir", str(output_dir), "--batch_size", "24",
            "--tasks", "accuracy,calibration,ood,robustness,generation",
            "--ood_scores", "logsumexp,max_softmax", "--attack_examples", "8",
            "--attack_steps", "1", "--epsilons", "0,8/255", "--norms", "linf",
            "--num_samples", "10", "--sample_steps", "1",
        ])
    assert code == 0
    result = _load(output_dir)
    tasks = result["tasks"]
    assert all(task["status"] == "ok" for task in tasks.values()), tasks
    assert tasks["accuracy"]["results"]["num_examples"] == 24
    assert set(tasks["ood"]["results"]["logsumexp"]) == {"svhn", "cifar100", "celeb_a",
                                                         "interpolation"}
    assert tasks["ood"]["settings"]["ood_sets"]["svhn"] == 24
    _check_report_figures(output_dir)


@keras.saving.register_keras_serializable(package="keras_jem_tests")
class UnconditionalStandIn(keras.Model):
    """An IGEBM-like unconditional model: `call` gives (B, 1) = -energy, no `sample`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.dense(self.flatten(x))

    def energy(self, x, y=None, training=False):
        return -keras.ops.squeeze(self(x, training=training), -1)


def test_unconditional_model_skips_classifier_tasks(tmp_path):
    model = UnconditionalStandIn()
    model(np.zeros((1, 8, 8, 1), "float32"))
    model_dir = tmp_path / "igebm"
    _save_model_dir(model_dir, model, "digits", (8, 8, 1))
    with open(model_dir / "config.json") as f:
        config = json.load(f)
    config["model"] = "igebm"
    with open(model_dir / "config.json", "w") as f:
        json.dump(config, f)
    output_dir = tmp_path / "eval"
    code = _run(str(model_dir), output_dir, "--ood_sets", "uniform_noise,faces")
    assert code == 0
    tasks = _load(output_dir)["tasks"]
    for name in ("accuracy", "calibration", "robustness", "generation"):
        assert tasks[name]["status"] == "skipped", name
    assert "unconditional" in tasks["accuracy"]["reason"]
    assert tasks["ood"]["status"] == "ok"
    assert set(tasks["ood"]["results"]) == {"energy", "logsumexp", "grad_norm"}
    assert "max_softmax" in tasks["ood"]["skipped"]
    # For a (B, 1) output, logsumexp is the output itself: the same AUROC as -energy.
    energy, lse = tasks["ood"]["results"]["energy"], tasks["ood"]["results"]["logsumexp"]
    assert energy["faces"]["auroc"] == pytest.approx(lse["faces"]["auroc"])
