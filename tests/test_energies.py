"""Tests of keras_jem.energies and the models' energy methods."""

import numpy as np
import tensorflow as tf

from keras_jem import energies
from tests import testing


def _logsumexp(logits):
    top = logits.max(-1, keepdims=True)
    return (np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top)[:, 0]


class EnergiesTest(testing.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        # Large logits too: a naive log(sum(exp)) would overflow in float32.
        self.logits = (rng.normal(size=(6, 5)) * np.array([1, 1, 1, 10, 100, 1])[:, None]
                       ).astype("float32")
        self.labels = np.array([0, 4, 2, 3, 1, 4])

    def test_logsumexp_energy(self):
        energy = testing.to_numpy(energies.logsumexp_energy(self.logits))
        self.assertEqual(energy.shape, (6,))
        self.assertAllClose(energy, -_logsumexp(self.logits.astype("float64")), rtol=1e-5)
        self.assertTrue(np.isfinite(energy).all())

    def test_logsumexp_energy_of_zero_logits_is_minus_log_num_classes(self):
        energy = testing.to_numpy(energies.logsumexp_energy(tf.zeros((2, 10))))
        self.assertAllClose(energy, [-np.log(10.0)] * 2)

    def test_class_energy(self):
        energy = testing.to_numpy(energies.class_energy(self.logits, self.labels))
        self.assertAllEqual(energy, -self.logits[np.arange(6), self.labels])

    def test_class_energy_accepts_column_labels(self):
        energy = energies.class_energy(self.logits, self.labels.reshape(-1, 1))
        self.assertAllEqual(energy, -self.logits[np.arange(6), self.labels])

    def test_classifier_energy_dispatches_on_labels(self):
        self.assertAllEqual(energies.classifier_energy(self.logits),
                            energies.logsumexp_energy(self.logits))
        self.assertAllEqual(energies.classifier_energy(self.logits, self.labels),
                            energies.class_energy(self.logits, self.labels))

    def test_class_energy_is_consistent_with_softmax(self):
        # E(x, y) - E(x) = -log p(y | x).
        log_prob = testing.to_numpy(tf.nn.log_softmax(self.logits.astype("float64")))
        difference = (testing.to_numpy(energies.class_energy(self.logits, self.labels))
                      - testing.to_numpy(energies.logsumexp_energy(self.logits)))
        self.assertAllClose(difference, -log_prob[np.arange(6), self.labels], rtol=1e-4,
                            atol=1e-4)

    def test_mahalanobis_logits(self):
        rng = np.random.default_rng(1)
        features = rng.normal(size=(7, 3)).astype("float32")
        centers = rng.normal(size=(4, 3)).astype("float32")
        expected = -0.5 * ((features[:, None, :] - centers[None]) ** 2).sum(-1)
        logits = testing.to_numpy(energies.mahalanobis_logits(features, centers))
        self.assertEqual(logits.shape, (7, 4))
        self.assertAllClose(logits, expected, rtol=1e-5, atol=1e-5)


class ModelEnergyTest(testing.TestCase):
    def test_energy_matches_logits(self):
        model = testing.make_model(buffer_size=20)
        x = np.random.default_rng(0).uniform(-1, 1, (5, 8, 8, 1)).astype("float32")
        y = np.array([0, 3, 9, 3, 1])
        logits = testing.to_numpy(model(x, training=False)).astype("float64")
        self.assertEqual(logits.shape, (5, 10))
        self.assertAllClose(model.energy(x), -_logsumexp(logits), rtol=1e-5, atol=1e-5)
        self.assertAllClose(model.energy(x, y), -logits[np.arange(5), y], rtol=1e-6, atol=1e-6)

    def test_energy_from_stem_matches_energy(self):
        model = testing.make_model(buffer_size=20)
        x = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype("float32")
        y = np.array([1, 2, 3])
        self.assertAllClose(model.energy_from_stem(model.stem(x)), model.energy(x), atol=1e-6)
        self.assertAllClose(model.energy_from_stem(model.stem(x), y=y), model.energy(x, y),
                            atol=1e-6)
