"""keras_jem.metrics.saliency: tf-keras-vis maps, deletion curves, object alignment, figures."""

import json
import os
import tempfile

import keras
import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from keras_jem.metrics import saliency
from tests import testing

SHAPE = (4, 4, 1)
NUM_CLASSES = 3


def linear_model(weights):
    """logits = flatten(x) @ weights: the gradient of class c is weights[:, c], whatever x is."""
    inputs = keras.Input(SHAPE)
    layer = keras.layers.Dense(NUM_CLASSES, use_bias=False)
    outputs = layer(keras.layers.Flatten()(inputs))
    layer.set_weights([weights])
    return keras.Model(inputs, outputs)


class SaliencyTest(testing.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        # Distinct magnitudes: no ties in the pixel ranking.
        magnitudes = rng.permutation(np.arange(1, 17 * NUM_CLASSES + 1))[: 16 * NUM_CLASSES]
        signs = rng.choice([-1.0, 1.0], size=16 * NUM_CLASSES)
        self.weights = (signs * magnitudes / 10.0).reshape(16, NUM_CLASSES).astype("float32")
        self.model = linear_model(self.weights)
        self.images = rng.uniform(-1, 1, (12,) + SHAPE).astype("float32")
        self.logits = self.images.reshape(12, -1) @ self.weights
        self.predicted = self.logits.argmax(-1)

    def expected_maps(self, classes):
        magnitude = np.abs(self.weights[:, classes].T)  # (n, 16)
        low = magnitude.min(1, keepdims=True)
        high = magnitude.max(1, keepdims=True)
        return ((magnitude - low) / (high - low)).reshape(-1, 4, 4)

    def test_vanilla_map_of_a_linear_model_is_its_weight_pattern(self):
        maps = saliency.saliency_maps(self.model, self.images, method="vanilla")
        self.assertEqual(maps.shape, (12, 4, 4))
        self.assertAllClose(maps, self.expected_maps(self.predicted), atol=1e-5)
        given = np.full(12, 2)
        self.assertAllClose(
            saliency.saliency_maps(self.model, self.images, labels=given, method="vanilla"),
            self.expected_maps(given), atol=1e-5)

    def test_smoothgrad_of_a_linear_model_equals_vanilla(self):
        # The gradient does not depend on x: averaging it over noisy copies changes nothing.
        maps = saliency.saliency_maps(self.model, self.images, method="smoothgrad",
                                      smooth_samples=5, batch_size=5)
        self.assertEqual(maps.shape, (12, 4, 4))
        self.assertAllClose(maps, self.expected_maps(self.predicted), atol=1e-5)

    def test_deletion_curve_matches_numpy(self):
        labels = self.predicted.copy()
        labels[:3] = (labels[:3] + 1) % NUM_CLASSES  # some images misclassified from the start
        maps = self.expected_maps(self.predicted)
        fill = -0.25
        fractions = [0.0, 0.25, 0.5, 1.0]
        curve = saliency.deletion_curve(self.model, self.images, labels, maps,
                                        fractions=fractions, fill_value=fill, num_random=2)
        expected = []
        for fraction in fractions:
            count = round(fraction * 16)
            flat = self.images.reshape(12, -1).copy()
            for i in range(12):
                top = np.argsort(-np.abs(self.weights[:, self.predicted[i]]))[:count]
                flat[i, top] = fill
            expected.append(np.mean((flat @ self.weights).argmax(-1) == labels))
        self.assertAllClose(curve["salient_accuracy"], expected)
        self.assertEqual(curve["salient_accuracy"][0], 0.75)
        self.assertEqual(curve["random_accuracy"][0], 0.75)
        # Everything removed: salient and random orders leave the same constant image.
        self.assertAllClose(curve["salient_accuracy"][-1], curve["random_accuracy"][-1])
        self.assertAllClose(curve["salient_auc"], np.sum(
            (np.array(expected[1:]) + expected[:-1]) / 2 * np.diff(fractions)))
        default = saliency.deletion_curve(self.model, self.images, labels, maps,
                                          fractions=[0.0])
        self.assertAllClose(default["fill_value"], self.images.mean())

    def test_object_alignment_matches_scikit_learn(self):
        rng = np.random.default_rng(1)
        masks = rng.random((5, 6, 6)) > 0.6
        maps = np.round(rng.random((5, 6, 6)), 1)  # ties, counted one half
        expected = [roc_auc_score(m.ravel(), v.ravel()) for m, v in zip(masks, maps)]
        result = saliency.object_alignment(maps, masks)
        self.assertAllClose(result["per_image"], expected)
        self.assertAllClose(result["auroc"], np.mean(expected))
        self.assertAllClose(saliency.object_alignment(masks * 1.0, masks)["auroc"], 1.0)
        self.assertAllClose(saliency.object_alignment(1.0 - masks, masks)["auroc"], 0.0)

    def test_object_masks(self):
        images = -np.ones((2, 4, 4, 1), "float32")
        images[0, 1:3, 1:3] = 1.0
        images[1, 0] = 0.2
        masks = saliency.object_masks(images)
        self.assertAllEqual(masks[0], images[0, ..., 0] > 0)
        self.assertAllEqual(masks[1], images[1, ..., 0] > -0.5)

    def test_run_saliency_task_writes_picture_curves_and_numbers(self):
        other = linear_model(self.weights[:, ::-1].copy())
        labels = self.predicted
        with tempfile.TemporaryDirectory() as directory:
            result = saliency.run_saliency_task(
                {"A": self.model, "B": other}, self.images, labels, directory, num_shown=5,
                smooth_samples=3)
            for path in result["paths"].values():
                self.assertTrue(os.path.isfile(path), path)
            with Image.open(result["paths"]["saliency"]) as image:
                width, height = image.size
            self.assertGreater(width, height)  # 5 columns, 1 + 2 models x 2 methods rows
            self.assertLen(result["figures"]["saliency"].axes, 5 * 5)
            with open(result["paths"]["json"]) as f:
                stored = json.load(f)
        self.assertEqual(stored["num_images"], 12)
        self.assertEqual(result["metrics"]["A"]["accuracy"], 1.0)
        for name in ("A", "B"):
            for method in ("vanilla", "smoothgrad"):
                entry = stored["metrics"][name][method]
                self.assertLen(entry["deletion"]["salient_accuracy"], 6)
                self.assertBetween(entry["object_auroc"], 0.0, 1.0)
        self.assertAllClose(
            stored["metrics"]["A"]["vanilla"]["deletion"]["salient_accuracy"],
            saliency.deletion_curve(self.model, self.images, labels,
                                    self.expected_maps(self.predicted))["salient_accuracy"])

    def test_wraps_a_subclassed_keras_jem_model(self):
        model = testing.make_model()
        images = testing.load_digits("test", 3)[0]
        maps = saliency.saliency_maps(model, images, method="smoothgrad", smooth_samples=2)
        self.assertEqual(maps.shape, (3, 8, 8))
        self.assertAllInRange(maps, 0.0, 1.0)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "method"):
            saliency.saliency_maps(self.model, self.images, method="gradcam")
        with self.assertRaisesRegex(ValueError, "Received shape"):
            saliency.saliency_maps(self.model, self.images[0], method="vanilla")
        with self.assertRaisesRegex(ValueError, "one class per image"):
            saliency.saliency_maps(self.model, self.images, labels=[0, 1], method="vanilla")
        with self.assertRaisesRegex(ValueError, "maps"):
            saliency.deletion_curve(self.model, self.images, self.predicted,
                                    np.zeros((12, 3, 3)))
        with self.assertRaisesRegex(ValueError, "fractions"):
            saliency.deletion_curve(self.model, self.images, self.predicted,
                                    np.zeros((12, 4, 4)), fractions=[0.5, 0.1])
