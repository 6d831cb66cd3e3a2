"""Tests of the samplers: keras_jem.sampling.SGLD and ProximalSGLD."""

import itertools
import json

import keras
import numpy as np
import tensorflow as tf

from keras_jem import sampling
from keras_jem.sampling import SGLD
from keras_jem.sampling import ProximalSGLD
from tests import testing


def _seed(a, b=0):
    return tf.constant([a, b], tf.int64)


def _uniform(shape, low=-1.0, high=1.0, seed=0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype("float32")


def _per_example_sum(values):
    return tf.reduce_sum(tf.reshape(values, (tf.shape(values)[0], -1)), axis=-1)


class QuadraticTarget:
    """`E(x) = 1/2 ||x - center||^2` per example; `E(x, y)` uses `centers[y]`."""

    def __init__(self, center, centers=None):
        self.center = tf.constant(center, tf.float32)
        self.centers = None if centers is None else tf.constant(centers, tf.float32)
        self.calls = []

    def energy(self, x, y=None, training=False):
        self.calls.append({"y": y, "training": training})
        center = self.center if y is None else tf.gather(self.centers, y)
        return 0.5 * _per_example_sum(tf.square(x - center))


class SquareStemTarget:
    """A target with a non-linear stem, `stem(x) = x**2`, and `E = sum(a * stem(x))`.

    Its plain `energy` must not be used by the proximal sampler: it raises.
    """

    def __init__(self, weights):
        self.weights = tf.constant(weights, tf.float32)

    def stem(self, x):
        return tf.square(x)

    def energy_from_stem(self, h, y=None, training=False):
        return _per_example_sum(self.weights * h)

    def energy(self, x, y=None, training=False):
        raise AssertionError("ProximalSGLD used `energy` although the target has a stem.")


class SquareTarget:
    """The same energy as `SquareStemTarget`, without a stem (the fallback path)."""

    def __init__(self, weights):
        self.weights = tf.constant(weights, tf.float32)

    def energy(self, x, y=None, training=False):
        return _per_example_sum(self.weights * tf.square(x))


class SGLDTest(testing.TestCase):
    def test_recovers_gaussian_mean_and_covariance(self):
        mean = np.array([1.0, -0.5])
        covariance = np.array([[1.0, 0.6], [0.6, 0.8]])
        precision = np.linalg.inv(covariance)
        step_size = 0.02
        sampler = SGLD(num_steps=500, step_size=step_size, noise_scale=np.sqrt(2 * step_size))
        mean_t = tf.constant(mean, tf.float32)
        precision_t = tf.constant(precision, tf.float32)

        def energy(x):
            centered = x - mean_t
            return 0.5 * tf.reduce_sum(tf.matmul(centered, precision_t) * centered, axis=-1)

        start = _uniform((4000, 2), -3.0, 3.0)
        run = tf.function(lambda x: sampler.run(energy, x, seed=_seed(3, 4)))
        samples = testing.to_numpy(run(start)).astype("float64")

        # The Euler-Maruyama chain's stationary law is N(mean, (I - eps/2 P)^-1 Sigma): an
        # O(eps) bias we account for exactly, and which is small anyway.
        discrete_covariance = np.linalg.inv(np.eye(2) - step_size / 2 * precision) @ covariance
        self.assertAllClose(samples.mean(0), mean, atol=0.07)
        self.assertAllClose(np.cov(samples.T), discrete_covariance, atol=0.08)
        self.assertAllClose(np.cov(samples.T), covariance, atol=0.1)

    def test_gradient_clip(self):
        weights = np.array([5.0, -5.0, 0.1, -0.2], "float32").reshape(1, 2, 2, 1)
        sampler = SGLD(num_steps=4, step_size=0.5, noise_scale=0.0, gradient_clip=0.3)
        start = _uniform((3, 2, 2, 1), -0.2, 0.2)
        samples = sampler.run(lambda x: _per_example_sum(weights * x), start, seed=_seed(0))
        expected = start - 4 * 0.5 * np.clip(weights, -0.3, 0.3)
        self.assertAllClose(samples, np.broadcast_to(expected, start.shape), atol=1e-6)

    def test_clip_range_is_applied_after_every_step(self):
        # Without the box the chain would go to +-2 and come back; with it the second step
        # starts from the clamped point.
        weights = np.array([-1.0, 1.0], "float32").reshape(1, 1, 2, 1)
        sampler = SGLD(num_steps=3, step_size=1.5, noise_scale=0.0, clip_range=(-1.0, 1.0))
        start = np.zeros((1, 1, 2, 1), "float32")
        samples = sampler.run(lambda x: _per_example_sum(weights * x), start, seed=_seed(0))
        self.assertAllClose(samples, np.array([1.0, -1.0]).reshape(1, 1, 2, 1))

        expected = start.astype("float64")
        quadratic = SGLD(num_steps=5, step_size=0.7, noise_scale=0.0, clip_range=(-0.5, 0.8))
        center = np.array([3.0, -3.0]).reshape(1, 1, 2, 1)
        samples = quadratic.run(
            lambda x: 0.5 * _per_example_sum(tf.square(x - center.astype("float32"))), start,
            seed=_seed(0),
        )
        for _ in range(5):
            expected = np.clip(expected - 0.7 * (expected - center), -0.5, 0.8)
        self.assertAllClose(samples, expected, atol=1e-6)

    def test_clip_range_bounds_noisy_chains(self):
        sampler = SGLD(num_steps=5, step_size=0.1, noise_scale=1.0, clip_range=(-1.0, 1.0))
        samples = testing.to_numpy(
            sampler.run(lambda x: _per_example_sum(0.0 * x), _uniform((50, 4, 4, 1)),
                        seed=_seed(1))
        )
        self.assertAllInRange(samples, -1.0, 1.0)
        # Clamped, not rescaled: many values sit exactly on the bounds.
        self.assertGreater(np.mean(np.abs(samples) == 1.0), 0.2)

    def test_noise_depends_on_seed_and_is_reproducible(self):
        sampler = SGLD(num_steps=25, step_size=0.1, noise_scale=0.1)
        start = np.zeros((200, 3, 3, 1), "float32")

        def flat(x):
            return _per_example_sum(0.0 * x)

        first = testing.to_numpy(sampler.run(flat, start, seed=_seed(1, 2)))
        again = testing.to_numpy(sampler.run(flat, start, seed=_seed(1, 2)))
        other = testing.to_numpy(sampler.run(flat, start, seed=_seed(1, 3)))
        self.assertAllEqual(first, again)
        self.assertGreater(np.abs(first - other).min(), 0.0)
        # Independent noise per step, pixel and example: after 25 steps the displacement has
        # standard deviation noise_scale * sqrt(25) = 0.5 (it would be 2.5 with the same
        # noise reused at every step) and neighbouring chains are uncorrelated.
        self.assertAllClose(first.std(), 0.5, rtol=0.05)
        correlation = np.corrcoef(first[:100].ravel(), first[100:].ravel())[0, 1]
        self.assertLess(abs(correlation), 0.1)

    def test_noise_scale(self):
        sampler = SGLD(num_steps=1, step_size=0.0, noise_scale=0.3)
        samples = sampler.run(lambda x: _per_example_sum(0.0 * x), np.zeros((4000, 2), "float32"),
                              seed=_seed(5))
        self.assertAllClose(testing.to_numpy(samples).std(0), [0.3, 0.3], rtol=0.05)

    def test_noise_first_takes_the_gradient_at_the_noisy_point(self):
        # E(x) = 0.5 * sum(x^2): grad = x. One step, clipped gradient and box, both orders,
        # against numpy. The noise n is the sampler's own draw for this seed (one step on a flat
        # energy from 0, the same draw in both orders).
        step, noise_scale, clip, box = 0.6, 0.3, 0.4, (-1.0, 1.0)
        x0 = _uniform((64, 3, 3, 1), seed=1)
        seed = _seed(4, 2)
        flat = lambda x: _per_example_sum(0.0 * x)
        quadratic = lambda x: 0.5 * _per_example_sum(tf.square(x))
        results = {}
        for noise_first in (True, False):
            sampler = SGLD(num_steps=1, step_size=step, noise_scale=noise_scale,
                           gradient_clip=clip, clip_range=box, noise_first=noise_first)
            n = testing.to_numpy(SGLD(1, step, noise_scale, noise_first=noise_first).run(
                flat, np.zeros_like(x0), seed=seed))
            results[noise_first] = (testing.to_numpy(sampler.run(quadratic, x0, seed=seed)), n)
        n = results[True][1]
        self.assertAllEqual(n, results[False][1])
        self.assertAllClose(n.std(), noise_scale, rtol=0.1)
        noisy = x0 + n
        first = np.clip(noisy - step * np.clip(noisy, -clip, clip), *box)
        last = np.clip(x0 - step * np.clip(x0, -clip, clip) + n, *box)
        self.assertAllClose(results[True][0], first, atol=1e-6, rtol=0)
        self.assertAllClose(results[False][0], last, atol=1e-6, rtol=0)
        # The two orders differ where the noise moves x across the gradient clip.
        self.assertGreater(np.abs(first - last).max(), 0.05)
        self.assertFalse(SGLD().noise_first)
        with self.assertRaisesRegex(ValueError, "noise_first.*Received: noise_first='yes'"):
            SGLD(noise_first="yes")

    def test_per_example_step_is_independent_of_batch_size(self):
        # The gradient of the *sum* of energies: each example moves by step_size * dE_i/dx_i,
        # whatever the batch size (a mean would shrink the step by 1/batch_size).
        center = 0.5
        sampler = SGLD(num_steps=4, step_size=0.25, noise_scale=0.0)

        def energy(x):
            return 0.5 * _per_example_sum(tf.square(x - center))

        batch = _uniform((64, 2, 2, 1))
        alone = sampler.run(energy, batch[:1], seed=_seed(0))
        together = sampler.run(energy, batch, seed=_seed(0))
        self.assertAllClose(alone, together[:1], atol=1e-7)
        expected = center + (1 - 0.25) ** 4 * (batch - center)
        self.assertAllClose(together, expected, atol=1e-6)

    def test_call_uses_target_energy_with_labels_and_mode(self):
        centers = np.array([[-0.5], [0.5]], "float32").reshape(2, 1, 1, 1)
        target = QuadraticTarget(0.0, centers=centers)
        sampler = SGLD(num_steps=30, step_size=0.5, noise_scale=0.0)
        labels = tf.constant([0, 1, 1, 0])
        samples = testing.to_numpy(
            sampler(target, np.zeros((4, 2, 2, 1), "float32"), y=labels, seed=_seed(0),
                    training=True)
        )
        self.assertAllClose(samples[:, 0, 0, 0], [-0.5, 0.5, 0.5, -0.5], atol=1e-5)
        self.assertTrue(all(call["training"] is True for call in target.calls))
        self.assertTrue(all(call["y"] is labels for call in target.calls))

    def test_num_steps(self):
        target = QuadraticTarget(1.0)
        sampler = SGLD(num_steps=3, step_size=0.5, noise_scale=0.0)
        start = np.zeros((2, 1, 1, 1), "float32")
        self.assertAllClose(sampler(target, start, seed=_seed(0)), np.full_like(start, 0.875))
        self.assertAllClose(sampler(target, start, seed=_seed(0), num_steps=1),
                            np.full_like(start, 0.5))
        self.assertAllEqual(sampler(target, start, seed=_seed(0), num_steps=0), start)

    def test_samples_carry_no_gradient(self):
        target = QuadraticTarget(1.0)
        start = tf.Variable(np.zeros((2, 2, 2, 1), "float32"))
        with tf.GradientTape() as tape:
            samples = SGLD(num_steps=2, step_size=0.5)(target, start * 1.0, seed=_seed(0))
            total = tf.reduce_sum(samples)
        self.assertIsNone(tape.gradient(total, start))

    @testing.parameterized.named_parameters(
        ("negative_steps", {"num_steps": -1}),
        ("fractional_steps", {"num_steps": 1.5}),
        ("negative_step_size", {"step_size": -1.0}),
        ("negative_noise", {"noise_scale": -0.1}),
        ("zero_clip", {"gradient_clip": 0.0}),
        ("empty_range", {"clip_range": (1.0, -1.0)}),
        ("bad_range", {"clip_range": "wide"}),
    )
    def test_invalid_arguments(self, kwargs):
        with self.assertRaisesRegex(ValueError, "Received"):
            SGLD(**kwargs)

    def test_config_round_trip(self):
        sampler = SGLD(num_steps=7, step_size=0.3, noise_scale=0.02, gradient_clip=1.0,
                       clip_range=(-1, 1), noise_first=True)
        config = sampler.get_config()
        self.assertTrue(config["noise_first"])
        json.dumps(config)
        self.assertEqual(SGLD.from_config(config).get_config(), config)
        restored = sampling.deserialize(json.loads(json.dumps(sampling.serialize(sampler))))
        self.assertIsInstance(restored, SGLD)
        self.assertEqual(restored.get_config(), config)


class ProximalSGLDTest(testing.TestCase):
    def _run(self, target_class):
        """Two outer and three inner steps on `target_class(weights)` from uniform starts.

        Returns:
            `(weights, start, samples)`.
        """
        weights = np.array([1.0, 2.0, -1.0, 0.5], "float32").reshape(1, 2, 2, 1)
        start = _uniform((5, 2, 2, 1), -0.9, 0.9)
        sampler = ProximalSGLD(num_steps=2, inner_steps=3, step_size=0.2, gradient_clip=0.5)
        return weights, start, sampler(target_class(weights), start, seed=_seed(0))

    def test_stem_path_matches_recurrence(self):
        weights, start, samples = self._run(SquareStemTarget)
        # p = dE/dh = weights; the inner gradient d<stem(x), p>/dx = 2 * weights * x is
        # recomputed at every inner step (the stem is re-differentiated).
        expected = start.astype("float64")
        for _ in range(2 * 3):
            expected = np.clip(expected - 0.2 * np.clip(2 * weights * expected, -0.5, 0.5), -1, 1)
        self.assertAllClose(samples, expected, atol=1e-6)

    def test_fallback_path_matches_recurrence(self):
        weights, start, samples = self._run(SquareTarget)
        # Without a stem: one energy gradient per outer step, reused for the inner steps.
        expected = start.astype("float64")
        for _ in range(2):
            direction = np.clip(2 * weights * expected, -0.5, 0.5)
            for _ in range(3):
                expected = np.clip(expected - 0.2 * direction, -1, 1)
        self.assertAllClose(samples, expected, atol=1e-6)
        _, _, stem_samples = self._run(SquareStemTarget)  # the same starts and seed
        self.assertGreater(float(np.abs(samples - stem_samples).max()), 0.05)

    def test_model_target(self):
        model = testing.make_model(buffer_size=20)
        start = _uniform((4, 8, 8, 1), seed=3)
        # An untrained network has input gradients ~1e-5: a large step and a small clip make
        # both the clipped and the unclipped pixels move visibly.
        sampler = ProximalSGLD(num_steps=2, inner_steps=3, step_size=50.0, gradient_clip=2e-5)
        samples = sampler(model, start, seed=_seed(0))
        # The stem is a convolution, linear in x: grad_x <stem(x), dE/dh> = dE/dx, the gradient
        # of the whole network at the start of each outer step.
        expected = tf.constant(start)
        for _ in range(2):
            with tf.GradientTape() as tape:
                tape.watch(expected)
                total = tf.reduce_sum(model.energy(expected))
            direction = tf.clip_by_value(tape.gradient(total, expected), -2e-5, 2e-5)
            for _ in range(3):
                expected = tf.clip_by_value(expected - 50.0 * direction, -1.0, 1.0)
        self.assertAllClose(samples, expected, atol=1e-5)
        self.assertLess(float(tf.reduce_mean(model.energy(samples))),
                        float(tf.reduce_mean(model.energy(start))))

    def test_affine_stem_shortcut_gives_the_same_samples(self):
        """With an affine stem the inner direction is computed once per outer step; it must
        give the samples of re-differentiating the stem at every inner step."""
        from keras_jem.backbones import WideResNet

        model = testing.make_model(
            image_shape=(8, 8, 3),
            backbone=WideResNet(depth=10, width=1, norm="batch"), buffer_size=20,
        )
        self.assertTrue(model.stem_is_affine)

        class EveryInnerStep:
            """The same network, its stem treated as non-affine (the JEM++ code's way)."""

            stem_is_affine = False
            stem = staticmethod(model.stem)
            energy_from_stem = staticmethod(model.energy_from_stem)

            def energy(self, x, y=None, training=False):
                raise AssertionError("the stem path must not call energy")

        start = _uniform((4, 8, 8, 3), seed=6)
        sampler = ProximalSGLD(num_steps=3, inner_steps=4, step_size=50.0, gradient_clip=2e-5)
        for training in (False, True):
            fast = sampler(model, start, seed=_seed(0), training=training)
            slow = sampler(EveryInnerStep(), start, seed=_seed(0), training=training)
            self.assertGreater(float(np.abs(testing.to_numpy(fast) - start).max()), 1e-4)
            self.assertAllClose(fast, slow, atol=1e-5)

    def test_each_inner_step_is_clipped(self):
        model = testing.make_model(buffer_size=20)
        start = _uniform((4, 8, 8, 1), -0.5, 0.5, seed=4)
        step_size, clip = 100.0, 5e-6  # input gradients of the untrained network are ~1e-5
        one = ProximalSGLD(num_steps=1, inner_steps=1, step_size=step_size, gradient_clip=clip)
        moved = np.abs(testing.to_numpy(one(model, start, seed=_seed(0))) - start)
        self.assertLessEqual(moved.max(), step_size * clip + 1e-6)
        # The clip is active: the largest gradients move pixels by exactly step_size * clip.
        self.assertAllClose(moved.max(), step_size * clip, rtol=1e-3)
        many = ProximalSGLD(num_steps=2, inner_steps=3, step_size=step_size, gradient_clip=clip)
        moved = np.abs(testing.to_numpy(many(model, start, seed=_seed(0))) - start)
        self.assertLessEqual(moved.max(), 6 * step_size * clip + 1e-6)

    def test_stays_in_box(self):
        model = testing.make_model(buffer_size=20)
        start = _uniform((6, 8, 8, 1), -1.5, 1.5, seed=5)
        for noise_scale in (0.0, 0.5):
            sampler = ProximalSGLD(num_steps=2, inner_steps=2, step_size=1.0,
                                   noise_scale=noise_scale)
            self.assertAllInRange(sampler(model, start, seed=_seed(0)), -1.0, 1.0)
        boxed = ProximalSGLD(num_steps=1, inner_steps=1, step_size=0.1, clip_range=(0.0, 0.5))
        self.assertAllInRange(boxed(model, start, seed=_seed(0)), 0.0, 0.5)

    def test_decreases_energy_on_quadratic(self):
        center = np.array([0.3, -0.2, 0.6, 0.0], "float32").reshape(1, 2, 2, 1)
        target = QuadraticTarget(center)
        start = _uniform((8, 2, 2, 1), seed=6)
        sampler = ProximalSGLD(num_steps=1, inner_steps=2, step_size=0.1)
        energies = [float(tf.reduce_sum(target.energy(start)))]
        for num_steps in (1, 2, 4, 8, 60):
            samples = sampler(target, start, seed=_seed(0), num_steps=num_steps)
            energies.append(float(tf.reduce_sum(target.energy(samples))))
        self.assertTrue(all(a > b for a, b in itertools.pairwise(energies)), energies)
        self.assertAllClose(samples, np.broadcast_to(center, start.shape), atol=1e-3)

    def test_noise_seeds(self):
        target = QuadraticTarget(0.0)
        sampler = ProximalSGLD(num_steps=3, inner_steps=1, step_size=0.1, noise_scale=0.1)
        start = np.zeros((16, 2, 2, 1), "float32")
        first = sampler(target, start, seed=_seed(1))
        self.assertAllEqual(first, sampler(target, start, seed=_seed(1)))
        self.assertGreater(float(tf.reduce_min(tf.abs(first - sampler(target, start,
                                                                         seed=_seed(2))))), 0)

    def test_invalid_arguments_and_config(self):
        for kwargs in ({"inner_steps": 0}, {"step_size": -0.1}, {"gradient_clip": 0.0},
                       {"noise_scale": -1.0}, {"clip_range": (1, 1)}):
            with self.assertRaisesRegex(ValueError, "Received"):
                ProximalSGLD(**kwargs)
        sampler = ProximalSGLD(num_steps=4, inner_steps=2, step_size=0.1, noise_scale=0.01)
        config = json.loads(json.dumps(sampler.get_config()))
        self.assertEqual(ProximalSGLD.from_config(config).get_config(), sampler.get_config())
        restored = keras.saving.deserialize_keras_object(sampling.serialize(sampler))
        self.assertIsInstance(restored, ProximalSGLD)
        self.assertEqual(restored.get_config(), sampler.get_config())
