"""Evaluation with known answers: every number recomputed here from a model whose logits are
known in closed form.

- `python -m trainers.evaluate` (a subprocess, the real CLI) on a linear model
  `logits = flatten(x) @ K + c` with K fitted by least squares: accuracy, the per-example
  correctness, ECE (20 bins) and the AUROC of each OOD score on each OOD set are recomputed
  in numpy / scikit-learn from the same images.
- PGD (`keras_jem.metrics.robust_accuracy_curve`) on a model that reads one pixel: the exact
  robust accuracy at each epsilon is known (the worst case sits at an end of the allowed
  interval of that pixel).
- Evaluation leaves BatchNorm moving statistics untouched and uses them (inference mode).
- Swapping in- and out-of-distribution turns the AUROC into 1 - AUROC.
"""

import json
import os

import numpy as np
from sklearn import metrics as sk_metrics

import keras_jem
from keras_jem import data as data_lib
from keras_jem import metrics
from tests import testing

SHAPE = (8, 8, 1)
NUM_EXAMPLES, OOD_EXAMPLES = 60, 40
OOD_SETS = ("uniform_noise", "interpolation", "faces")
SCORES = ("logsumexp", "max_softmax", "grad_norm")


def _linear_jem(kernel, bias):
    """A JEM whose logits are `flatten(x) @ kernel + bias` (identity head)."""
    model = keras_jem.JEM(testing.LinearBackbone(kernel.shape[1]), kernel.shape[1],
                          buffer_size=10, sampler=testing.tiny_sgld(), seed=0)
    model.build((None,) + SHAPE)
    values = {kernel.shape: kernel, bias.shape: bias}
    head_kernel = np.eye(kernel.shape[1])
    backbone_vars = model.backbone.trainable_variables
    testing.assign_by_shape(backbone_vars, values)
    head_vars = [v for v in model.trainable_variables
                 if all(v is not b for b in backbone_vars)]
    testing.assign_by_shape(head_vars, {head_kernel.shape: head_kernel,
                                        (kernel.shape[1],): np.zeros(kernel.shape[1])})
    return model


def _softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _ece(probabilities, labels, num_bins=20):
    """Equal-width bins (b/n, (b+1)/n]: sum_b n_b/N |accuracy_b - confidence_b|."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    ece = 0.0
    for b in range(num_bins):
        low, high = b / num_bins, (b + 1) / num_bins
        members = (confidence > low) & (confidence <= high)
        if b == 0:
            members |= confidence == 0
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return ece


def _hand_scores(kernel, bias, images):
    """logsumexp, max softmax and -||d logsumexp / dx|| of linear logits, in float64."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    logits = flat @ kernel + bias
    top = logits.max(1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(1))
    probabilities = _softmax(logits)
    gradient = probabilities @ kernel.T  # d logsumexp / dx
    return logits, {"logsumexp": lse, "max_softmax": probabilities.max(1),
                    "grad_norm": -np.linalg.norm(gradient, axis=1)}


class EvaluateCLIKnownAnswersTest(testing.TestCase):
    def test_accuracy_ece_and_every_auroc(self):
        train_x, train_y = testing.load_digits("train", num_examples=500)
        # Least-squares linear classifier: a reasonable but imperfect, over/under-confident
        # model (accuracy and ECE both far from 0 and 1).
        design = np.concatenate([train_x.reshape(len(train_x), -1),
                                 np.ones((len(train_x), 1))], 1).astype(np.float64)
        solution = np.linalg.lstsq(design, 6.0 * np.eye(10)[train_y], rcond=None)[0]
        kernel, bias = solution[:-1], solution[-1]
        model = _linear_jem(kernel, bias)
        directory = self.get_temp_dir()
        model_dir = os.path.join(directory, "model")
        os.makedirs(model_dir)
        model.save(os.path.join(model_dir, "model.keras"))
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump({"model": "jem", "dataset": "digits", "image_shape": list(SHAPE),
                       "num_classes": 10, "data_dir": None}, f)
        output_dir = os.path.join(directory, "eval")
        argv = ["trainers.evaluate", "--model_dir", model_dir, "--output_dir", output_dir,
                "--tasks", "accuracy,calibration,ood", "--num_examples", str(NUM_EXAMPLES),
                "--ood_examples", str(OOD_EXAMPLES), "--ood_sets", ",".join(OOD_SETS),
                "--ood_scores", ",".join(SCORES), "--batch_size", "25", "--seed", "0"]
        # The real CLI module as __main__, with the test backbone registered first.
        testing.run_in_subprocess(f"""
            import runpy, sys
            from tests import testing
            sys.argv = {argv!r}
            runpy.run_module("trainers.evaluate", run_name="__main__", alter_sys=True)
        """, timeout=300)
        with open(os.path.join(output_dir, "eval.json")) as f:
            tasks = json.load(f)["tasks"]

        # The same images, from the public data API (the CLI's documented selection: the
        # first --num_examples test images; OOD set i drawn with seed --seed + 1 + i).
        images, labels = data_lib.load("digits", split="test", download=False,
                                       num_examples=NUM_EXAMPLES)
        logits, in_scores = _hand_scores(kernel, bias, np.asarray(images))
        probabilities = _softmax(logits)
        correct = logits.argmax(1) == labels
        accuracy = correct.mean()
        self.assertBetween(accuracy, 0.6, 0.97)
        self.assertAllClose(tasks["accuracy"]["results"]["accuracy"], accuracy, atol=1e-12)
        predictions = np.load(os.path.join(output_dir, "predictions.npz"))
        self.assertAllEqual(predictions["correct"], correct)
        self.assertAllEqual(predictions["labels"], labels)
        ece = _ece(probabilities, labels)
        self.assertGreater(ece, 0.02)
        self.assertAllClose(tasks["calibration"]["results"]["ece"], ece, atol=1e-5)

        ood = tasks["ood"]["results"]
        flips = 0
        for index, name in enumerate(OOD_SETS):
            out_images = data_lib.load_ood(name, like=SHAPE, reference_images=images,
                                           num_examples=OOD_EXAMPLES, seed=1 + index,
                                           download=False)
            _, out_scores = _hand_scores(kernel, bias, np.asarray(out_images))
            for score in SCORES:
                truth = np.concatenate([np.ones(NUM_EXAMPLES), np.zeros(OOD_EXAMPLES)])
                auroc = sk_metrics.roc_auc_score(
                    truth, np.concatenate([in_scores[score], out_scores[score]]))
                self.assertAllClose(ood[score][name]["auroc"], auroc, atol=2e-3,
                                    msg=f"{score} on {name}")
                flips += abs(auroc - 0.5) > 0.1
        # The AUROCs are informative (far from chance), so a swapped set or score shows.
        self.assertGreaterEqual(flips, 6)


class InOutSwapTest(testing.TestCase):
    def test_swapping_in_and_out_flips_the_auroc(self):
        rng = np.random.default_rng(0)
        in_scores, out_scores = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 150)
        forward = metrics.ood_metrics(in_scores, out_scores)["auroc"]
        backward = metrics.ood_metrics(out_scores, in_scores)["auroc"]
        truth = np.concatenate([np.ones(200), np.zeros(150)])
        self.assertAllClose(forward, sk_metrics.roc_auc_score(
            truth, np.concatenate([in_scores, out_scores])), atol=1e-12)
        self.assertGreater(forward, 0.7)
        self.assertAllClose(backward, 1.0 - forward, atol=1e-12)


class PGDKnownAnswerTest(testing.TestCase):
    PIXEL = (3, 4, 0)
    SLOPE, THRESHOLD = 3.0, 0.1

    def _model(self):
        """Reads one pixel t: class 0 if t > THRESHOLD else class 1; the others never win."""
        kernel = np.zeros((64, 10))
        index = np.ravel_multi_index(self.PIXEL, SHAPE)
        kernel[index, 0], kernel[index, 1] = self.SLOPE, -self.SLOPE
        bias = np.full(10, -30.0)
        bias[0], bias[1] = -self.SLOPE * self.THRESHOLD, self.SLOPE * self.THRESHOLD
        return _linear_jem(kernel, bias)

    def test_linf_robust_accuracy_is_exact(self):
        rng = np.random.default_rng(1)
        t = np.linspace(-0.95, 0.95, 48) + 0.013  # no value on a decision boundary
        images = rng.uniform(-1, 1, (48,) + SHAPE).astype(np.float32)
        images[(slice(None),) + self.PIXEL] = t
        predicted = np.where(t > self.THRESHOLD, 0, 1)
        labels = predicted.copy()
        labels[::7] = 1 - labels[::7]  # a few wrong already on clean images
        epsilons = [0.0, 0.05, 0.1, 0.2]  # [0, 1] pixel scale: 2x in data units

        curve = metrics.robust_accuracy_curve(self._model(), images, labels, epsilons,
                                              norm="linf", num_steps=10, seed=0,
                                              batch_size=16)
        expected = []
        for epsilon in epsilons:
            low = np.maximum(t - 2 * epsilon, -1.0)
            high = np.minimum(t + 2 * epsilon, 1.0)
            # The class of a 1-D linear threshold is constant on the interval iff it is the
            # same at both ends: robust iff the label wins at both ends.
            robust = (np.where(low > self.THRESHOLD, 0, 1) == labels) & (
                np.where(high > self.THRESHOLD, 0, 1) == labels)
            expected.append(robust.mean())
        self.assertAllClose(curve["accuracy"], expected, atol=1e-12)
        # The curve is informative: each epsilon changes the answer.
        self.assertLen(set(np.round(expected, 6)), len(epsilons))


class BatchNormUntouchedTest(testing.TestCase):
    def test_evaluation_keeps_and_uses_moving_statistics(self):
        model = testing.make_model(backbone=testing.small_cnn(filters=(4,), feature_dim=8,
                                                              norm="batch"))
        x, y = testing.load_digits(num_examples=32)
        rng = np.random.default_rng(0)
        norms = [v for v in model.non_trainable_variables if "moving" in v.path]
        self.assertNotEmpty(norms)
        for variable in norms:  # statistics far from anything the test batch would give
            variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype(np.float32))
        before = [testing.to_numpy(v).copy() for v in norms]
        weights = [testing.to_numpy(v).copy() for v in model.weights]

        logits = metrics.predict_logits(model, x, batch_size=16)
        for name in SCORES:
            metrics.get_score(name)(model, x, batch_size=16)
        metrics.robust_accuracy_curve(model, x[:8], y[:8], [0.0, 8 / 255], num_steps=2,
                                      seed=0)
        metrics.predict_logits(model, x[:8], refine_steps=2, seed=0)

        for variable, value in zip(norms, before):
            self.assertAllEqual(testing.to_numpy(variable), value, msg=variable.path)
        for variable, value in zip(model.weights, weights):
            self.assertAllEqual(testing.to_numpy(variable), value, msg=variable.path)
        # Inference mode: the moving statistics are used, not the batch's.
        inference = testing.to_numpy(model(x, training=False))
        batch_mode = testing.to_numpy(model(x, training=True))
        self.assertAllClose(logits, inference, atol=1e-5)
        self.assertGreater(float(np.abs(batch_mode - inference).max()), 100 * 1e-5)
