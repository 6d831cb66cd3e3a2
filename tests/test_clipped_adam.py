"""ClippedAdam (IGEBM's custom Adam) against the update rule written out in numpy."""

import json

import keras
import numpy as np

from keras_jem.optimizers import ClippedAdam
from tests import testing


def _reference(w0, gradients, lr, beta_1, beta_2, epsilon, clip_std, clip_offset):
    """The update of `custom_adam.py`, step by step in float64."""
    w = np.array(w0, np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(gradients, start=1):
        bound = clip_std * np.sqrt(v / (1 - beta_2**t)) + clip_offset
        g = np.clip(np.asarray(g, np.float64), -bound, bound)
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        w = w - lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t) * m / (np.sqrt(v) + epsilon)
    return w


class ClippedAdamTest(testing.TestCase):
    def _run(self, optimizer, w0, gradients):
        variable = keras.Variable(np.asarray(w0, np.float32))
        for g in gradients:
            optimizer.apply_gradients([(keras.ops.convert_to_tensor(g, "float32"), variable)])
        return variable.numpy()

    def test_matches_the_formula_over_steps_with_a_spike(self):
        rng = np.random.default_rng(0)
        w0 = rng.normal(size=(3, 4))
        # Ordinary gradients, then a spike 100x their size: the clip must bite on the spike.
        gradients = [rng.normal(scale=0.05, size=(3, 4)) for _ in range(6)]
        gradients.append(np.full((3, 4), 5.0))
        gradients.append(rng.normal(scale=0.05, size=(3, 4)))
        args = {"lr": 0.01, "beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-8, "clip_std": 3.0,
                "clip_offset": 0.1}
        expected = _reference(w0, gradients, **args)
        got = self._run(
            ClippedAdam(
                learning_rate=args["lr"], beta_1=args["beta_1"], beta_2=args["beta_2"],
                epsilon=args["epsilon"], clip_std=args["clip_std"],
                clip_offset=args["clip_offset"],
            ),
            w0, gradients,
        )
        self.assertAllClose(got, expected, atol=1e-6, rtol=1e-5)
        # Plain Adam on the same gradients ends far away: the test can tell the clip is there.
        plain = self._run(
            keras.optimizers.Adam(learning_rate=0.01, beta_1=0.5, beta_2=0.9, epsilon=1e-8),
            w0, gradients,
        )
        self.assertGreater(np.max(np.abs(plain - expected)), 1e-3)

    def test_sparse_gradients_of_a_gather(self):
        # A per-class table read with `take` gets an IndexedSlices gradient (repeated rows):
        # the update is the formula's on the dense, summed gradient.
        import tensorflow as tf

        rng = np.random.default_rng(1)
        w0 = rng.normal(size=(4, 3))
        rows = [np.array([0, 2, 2, 3]), np.array([1, 1, 0, 3])]
        values = [rng.normal(scale=0.5, size=(4, 3)) for _ in rows]
        dense = []
        for r, v in zip(rows, values):
            g = np.zeros((4, 3))
            np.add.at(g, r, v)
            dense.append(g)
        args = {"lr": 0.01, "beta_1": 0.0, "beta_2": 0.999, "epsilon": 1e-8, "clip_std": 3.0,
                "clip_offset": 0.1}
        expected = _reference(w0, dense, **args)
        optimizer = ClippedAdam(learning_rate=0.01)
        variable = keras.Variable(np.asarray(w0, np.float32))
        for r, v in zip(rows, values):
            sparse = tf.IndexedSlices(tf.constant(v, tf.float32), tf.constant(r),
                                      tf.constant([4, 3]))
            optimizer.apply_gradients([(sparse, variable)])
        self.assertAllClose(variable.numpy(), expected, atol=1e-6, rtol=1e-5)

    def test_first_step_clips_to_the_offset(self):
        # v = 0 before the first step, so the bound is clip_offset: a gradient of 7 acts as 0.1.
        optimizer = ClippedAdam(learning_rate=1.0, beta_1=0.0, beta_2=0.999, epsilon=0.0)
        got = self._run(optimizer, [0.0], [[7.0]])
        # m = 0.1, v = 0.001 * 0.01, alpha = sqrt(0.001): w = -sqrt(0.001) * 0.1 / sqrt(1e-5) = -1.
        self.assertAllClose(got, [-1.0], atol=1e-5)

    def test_config_round_trip_and_errors(self):
        optimizer = ClippedAdam(3e-4, clip_std=2.0, clip_offset=0.05)
        config = json.loads(json.dumps(keras.saving.serialize_keras_object(optimizer)))
        restored = keras.saving.deserialize_keras_object(config)
        self.assertIsInstance(restored, ClippedAdam)
        self.assertEqual((restored.clip_std, restored.clip_offset), (2.0, 0.05))
        self.assertEqual(restored.beta_1, 0.0)
        with self.assertRaisesRegex(ValueError, "clip_offset"):
            ClippedAdam(clip_offset=0.0)
        with self.assertRaisesRegex(ValueError, "amsgrad"):
            ClippedAdam(amsgrad=True)
