"""Tests of keras_jem.sampling.MALA (Metropolis-adjusted Langevin on tensorflow-probability)."""

import json

import numpy as np
import tensorflow as tf

from keras_jem import sampling
from keras_jem.sampling import MALA
from tests import testing

MEAN = np.array([1.0, -0.5])
COVARIANCE = np.array([[1.0, 0.6], [0.6, 0.8]])
PRECISION = np.linalg.inv(COVARIANCE)


def _seed(a, b=0):
    return tf.constant([a, b], tf.int64)


def _gaussian_energy(x):
    centered = x - tf.constant(MEAN, tf.float32)
    return 0.5 * tf.reduce_sum(
        tf.matmul(centered, tf.constant(PRECISION, tf.float32)) * centered, axis=-1
    )


def _numpy_acceptance(x, step_size, seed=0):
    """Mean MH acceptance probability of one MALA proposal from x, written out in numpy."""
    rng = np.random.default_rng(seed)

    def energy(v):
        centered = v - MEAN
        return 0.5 * np.einsum("bi,ij,bj->b", centered, PRECISION, centered)

    def grad(v):
        return (v - MEAN) @ PRECISION

    def log_q(to, frm):  # log N(to; frm - eps/2 grad E(frm), eps I), up to a constant
        return -np.sum((to - frm + step_size / 2 * grad(frm)) ** 2, axis=-1) / (2 * step_size)

    proposal = x - step_size / 2 * grad(x) + np.sqrt(step_size) * rng.normal(size=x.shape)
    log_ratio = -energy(proposal) + energy(x) + log_q(x, proposal) - log_q(proposal, x)
    return np.mean(np.exp(np.minimum(log_ratio, 0.0)))


class QuadraticTarget:
    """`E(x) = 1/2 ||x - centers[y]||^2` per example, recording its calls."""

    def __init__(self, centers):
        self.centers = tf.constant(centers, tf.float32)
        self.calls = []

    def energy(self, x, y=None, training=False):
        self.calls.append({"y": y, "training": training})
        center = tf.gather(self.centers, y)
        return 0.5 * tf.reduce_sum(tf.reshape(tf.square(x - center), (tf.shape(x)[0], -1)), -1)


class MALATest(testing.TestCase):
    def test_recovers_gaussian_mean_and_covariance_where_langevin_is_biased(self):
        # MALA's step 0.8 is SGLD's step 0.4 with noise sqrt(0.8): the unadjusted chain's
        # stationary covariance (I - 0.2 P)^-1 Sigma is off by 0.47 (3x too wide along the minor
        # axis). Only the Metropolis-Hastings correction brings the chains back to Sigma.
        step_size = 0.8
        langevin_covariance = np.linalg.inv(np.eye(2) - step_size / 4 * PRECISION) @ COVARIANCE
        self.assertGreater(np.abs(langevin_covariance - COVARIANCE).max(), 0.3)
        start = np.random.default_rng(0).uniform(-3.0, 3.0, (4000, 2)).astype("float32")
        sampler = MALA(num_steps=200, step_size=step_size)
        result = tf.function(lambda x: sampler.run(_gaussian_energy, x, seed=_seed(3, 4)))(start)
        samples = testing.to_numpy(result.samples).astype("float64")
        self.assertAllClose(samples.mean(0), MEAN, atol=0.06)
        self.assertAllClose(np.cov(samples.T), COVARIANCE, atol=0.07)
        acceptance = testing.to_numpy(result.acceptance_rate)
        self.assertEqual(acceptance.shape, (4000,))
        self.assertAllInRange(acceptance, 0.0, 1.0)
        self.assertBetween(float(acceptance.mean()), 0.4, 0.95)

    def test_acceptance_rate_matches_the_metropolis_hastings_formula(self):
        # Chains started at the target: every step's expected acceptance is the stationary one,
        # computed here independently from the MALA proposal and MH ratio in numpy.
        rng = np.random.default_rng(1)
        start = rng.multivariate_normal(MEAN, COVARIANCE, size=4000).astype("float32")
        for step_size in (0.5, 1.5):
            sampler = MALA(num_steps=50, step_size=step_size)
            result = sampler.run(_gaussian_energy, start, seed=_seed(5))
            expected = _numpy_acceptance(
                rng.multivariate_normal(MEAN, COVARIANCE, size=200000), step_size)
            measured = float(np.mean(testing.to_numpy(result.acceptance_rate)))
            self.assertAllClose(measured, expected, atol=0.015, msg=f"step_size={step_size}")
        self.assertLess(expected, 0.5)  # the larger step is rejected more often

    def test_adaptation_reaches_the_target_rate(self):
        start = np.random.default_rng(2).multivariate_normal(MEAN, COVARIANCE, 2000)
        sampler = MALA(num_steps=250, step_size=0.01, num_adaptation_steps=150,
                       target_acceptance_rate=0.574)
        result = sampler.run(_gaussian_energy, start.astype("float32"), seed=_seed(7))
        self.assertGreater(float(result.step_size), 0.3)  # grew from 0.01 by 50x or more
        self.assertAllClose(float(np.mean(testing.to_numpy(result.acceptance_rate))), 0.574,
                            atol=0.08)

    def test_no_step_after_adaptation_gives_nan_rate(self):
        sampler = MALA(num_steps=3, step_size=0.1, num_adaptation_steps=5)
        result = sampler.run(_gaussian_energy, np.zeros((4, 2), "float32"), seed=_seed(0))
        self.assertTrue(np.all(np.isnan(testing.to_numpy(result.acceptance_rate))))

    def test_sampler_interface(self):
        centers = np.array([[-0.5], [0.5]], "float32").reshape(2, 1, 1, 1)
        target = QuadraticTarget(centers)
        labels = tf.constant([0, 1, 1, 0])
        sampler = MALA(num_steps=400, step_size=0.01)
        x = np.zeros((4, 2, 2, 1), "float32")
        samples = sampler(target, x, y=labels, seed=_seed(0), training=True)
        self.assertEqual(samples.shape, x.shape)
        # Chains of N(centers[y], I) after 400 steps of 0.01: means move toward their centre.
        means = testing.to_numpy(tf.reduce_mean(samples, axis=(1, 2, 3)))
        self.assertAllLess(means * np.array([-1, 1, 1, -1]), 2.0)
        self.assertTrue(all(call["training"] is True for call in target.calls))
        self.assertTrue(all(call["y"] is labels for call in target.calls))
        again = sampler(target, x, y=labels, seed=_seed(0), training=True)
        self.assertAllEqual(samples, again)
        other = sampler(target, x, y=labels, seed=_seed(1), training=True)
        self.assertNotAllClose(samples, other)

    def test_samples_carry_no_gradient(self):
        start = tf.Variable(np.zeros((3, 2), "float32"))
        with tf.GradientTape() as tape:
            samples = MALA(num_steps=2, step_size=0.1).run(_gaussian_energy, start * 1.0,
                                                           seed=_seed(0)).samples
            total = tf.reduce_sum(samples)
        self.assertIsNone(tape.gradient(total, start))

    @testing.parameterized.named_parameters(
        ("negative_steps", {"num_steps": -1}),
        ("zero_step_size", {"step_size": 0.0}),
        ("fractional_adaptation", {"num_adaptation_steps": 2.5}),
        ("rate_above_one", {"target_acceptance_rate": 1.2}),
        ("zero_adaptation_rate", {"adaptation_rate": 0.0}),
    )
    def test_invalid_arguments(self, kwargs):
        with self.assertRaisesRegex(ValueError, "Received"):
            MALA(**kwargs)

    def test_config_round_trip(self):
        sampler = MALA(num_steps=30, step_size=2e-4, num_adaptation_steps=10,
                       target_acceptance_rate=0.6, adaptation_rate=0.02)
        config = sampler.get_config()
        restored = sampling.deserialize(json.loads(json.dumps(sampling.serialize(sampler))))
        self.assertIsInstance(restored, MALA)
        self.assertEqual(restored.get_config(), config)
        self.assertEqual(config["step_size"], 2e-4)

    def test_tensorflow_probability_leaves_keras_3_in_place(self):
        # tensorflow-probability needs tf-keras installed; `keras` and `tf.keras` stay Keras 3.
        code = ("import tensorflow_probability, tensorflow as tf, keras; "
                "print(keras.__version__, tf.keras.Model is keras.Model)")
        output = testing.run_in_subprocess(code).strip().splitlines()[-1]
        self.assertTrue(output.startswith("3.") and output.endswith("True"), output)
