"""Tests of keras_jem.sampling.ReplayBuffer."""

import json

import keras
import numpy as np
import tensorflow as tf

from keras_jem.sampling import ReplayBuffer
from tests import testing

_seed = testing.stateless_seed


def _buffer(image_shape=(2, 2, 1), **kwargs):
    return testing.built_buffer(ReplayBuffer, image_shape, **kwargs)


def _class_gaussians(num_classes=3, per_class=3000, seed=0):
    """Images (2x2x1) from known correlated class Gaussians well inside [-1, 1]."""
    rng = np.random.default_rng(seed)
    means = np.array([[-0.5, -0.3, 0.0, 0.2], [0.4, 0.1, -0.4, 0.0], [0.0, 0.5, 0.3, -0.5]])
    images, labels, covariances = [], [], []
    for c in range(num_classes):
        factor = 0.08 * (np.eye(4) + 0.5 * rng.normal(size=(4, 4)))
        covariances.append(factor @ factor.T)
        images.append(means[c] + rng.normal(size=(per_class, 4)) @ factor.T)
        labels.append(np.full(per_class, c))
    images = np.concatenate(images).reshape(-1, 2, 2, 1).astype("float32")
    return images, np.concatenate(labels), means[:num_classes], np.array(covariances)


def _statistics(flat):
    return flat.mean(0), np.cov(flat.T)


class ReplayBufferTest(testing.TestCase):
    def test_uniform_initialisation(self):
        buffer = _buffer(image_shape=(4, 4, 1), size=2000, seed=3)
        images = testing.to_numpy(buffer.images)
        self.assertEqual(images.shape, (2000, 4, 4, 1))
        self.assertAllInRange(images, -1.0, 1.0)
        self.assertAllClose(images.mean(), 0.0, atol=0.02)
        self.assertAllClose(images.var(), 1.0 / 3.0, atol=0.01)  # U(-1, 1)
        self.assertLess(images.min(), -0.99)
        self.assertGreater(images.max(), 0.99)
        self.assertFalse(buffer.images.trainable)
        self.assertEqual(buffer.trainable_weights, [])

        shifted = _buffer(image_shape=(4, 4, 1), size=500, value_range=(0.0, 0.5))
        self.assertAllInRange(shifted.images, 0.0, 0.5)
        self.assertAllInRange(shifted.fresh_samples(300, seed=_seed(1)), 0.0, 0.5)

    def test_unconditional_draw_is_without_replacement(self):
        buffer = _buffer(size=50, reinit_probability=0.0)
        contents = testing.to_numpy(buffer.images)
        for seed in range(5):
            indices, images, reinitialized = buffer.draw(40, seed=_seed(seed))
            indices = testing.to_numpy(indices)
            self.assertEqual(len(set(indices.tolist())), 40)
            self.assertAllInRange(indices, 0, 49)
            self.assertAllEqual(images, contents[indices])
            self.assertFalse(testing.to_numpy(reinitialized).any())
        # The whole buffer: a permutation.
        indices, _, _ = buffer.draw(50, seed=_seed(9))
        self.assertAllEqual(np.sort(testing.to_numpy(indices)), np.arange(50))
        # Different seeds pick different chains, the same seed the same ones.
        first = testing.to_numpy(buffer.draw(10, seed=_seed(1))[0])
        self.assertAllEqual(first, buffer.draw(10, seed=_seed(1))[0])
        self.assertNotAllEqual(first, buffer.draw(10, seed=_seed(2))[0])

    def test_reinit_fraction_and_fresh_chains(self):
        probability = 0.25
        buffer = _buffer(size=1000, reinit_probability=probability)
        buffer.images.assign(np.full((1000, 2, 2, 1), 0.5, "float32"))
        masks, fresh_values = [], []
        for seed in range(40):
            _, images, reinitialized = buffer.draw(250, seed=_seed(seed, 1))
            images, reinitialized = testing.to_numpy(images), testing.to_numpy(reinitialized)
            masks.append(reinitialized)
            # Kept chains are the buffer contents; restarted ones are fresh uniform noise.
            self.assertAllEqual(images[~reinitialized], np.full_like(images[~reinitialized], 0.5))
            self.assertTrue((images[reinitialized] != 0.5).all())
            fresh_values.append(images[reinitialized].ravel())
        fraction = np.concatenate(masks).mean()
        # 10000 Bernoulli(0.25) draws: standard error 0.0043.
        self.assertAllClose(fraction, probability, atol=0.02)
        self.assertNotAllEqual(masks[0], masks[1])
        fresh_values = np.concatenate(fresh_values)
        self.assertAllInRange(fresh_values, -1.0, 1.0)
        self.assertAllClose(fresh_values.mean(), 0.0, atol=0.03)
        self.assertAllClose(fresh_values.var(), 1.0 / 3.0, atol=0.02)

    def test_reinit_probability_extremes(self):
        buffer = _buffer(size=100, reinit_probability=1.0)
        buffer.images.assign(np.full((100, 2, 2, 1), 5.0, "float32"))
        _, images, reinitialized = buffer.draw(100, seed=_seed(0))
        self.assertTrue(testing.to_numpy(reinitialized).all())
        self.assertAllInRange(images, -1.0, 1.0)

    def test_write_back(self):
        buffer = _buffer(size=30, seed=2)
        before = testing.to_numpy(buffer.images).copy()
        indices, _, _ = buffer.draw(8, seed=_seed(4))
        samples = np.random.default_rng(0).uniform(-1, 1, (8, 2, 2, 1)).astype("float32")
        buffer.write(indices, samples)
        after = testing.to_numpy(buffer.images)
        expected = before.copy()
        expected[testing.to_numpy(indices)] = samples
        self.assertAllEqual(after, expected)
        untouched = np.setdiff1d(np.arange(30), testing.to_numpy(indices))
        self.assertAllEqual(after[untouched], before[untouched])

    def test_write_back_in_a_tf_function(self):
        buffer = _buffer(size=20, seed=2)
        before = testing.to_numpy(buffer.images).copy()

        @tf.function
        def step(seed):
            indices, images, _ = buffer.draw(5, seed=seed)
            buffer.write(indices, images + 1.0)
            return indices

        indices = testing.to_numpy(step(_seed(7)))
        after = testing.to_numpy(buffer.images)
        self.assertAllClose(after[indices], before[indices] + 1.0)
        mask = np.ones(20, bool)
        mask[indices] = False
        self.assertAllEqual(after[mask], before[mask])

    def test_class_conditional_blocks(self):
        buffer = _buffer(size=40, num_classes=4, reinit_probability=0.0)
        contents = testing.to_numpy(buffer.images)
        offsets = set()
        for seed in range(20):
            labels = np.random.default_rng(seed).integers(0, 4, 32)
            indices, images, _ = buffer.draw(32, labels=tf.constant(labels), seed=_seed(seed))
            indices = testing.to_numpy(indices)
            self.assertTrue((indices >= labels * 10).all(), (indices, labels))
            self.assertTrue((indices < (labels + 1) * 10).all(), (indices, labels))
            self.assertAllEqual(images, contents[indices])
            offsets.update((indices - labels * 10).tolist())
        # Every chain of a block can be drawn.
        self.assertEqual(offsets, set(range(10)))

    def test_draw_errors(self):
        buffer = _buffer(size=10, num_classes=3)
        with self.assertRaisesRegex(ValueError, "10 chains.*11"):
            buffer.draw(11, seed=_seed(0))
        with self.assertRaisesRegex(ValueError, "not divisible.*num_classes=3"):
            buffer.draw(4, labels=tf.constant([0, 1, 2, 0]), seed=_seed(0))
        unlabelled = _buffer(size=10)
        with self.assertRaisesRegex(ValueError, "num_classes"):
            unlabelled.draw(2, labels=tf.constant([0, 1]), seed=_seed(0))

    def test_invalid_arguments(self):
        for kwargs in ({"size": 0}, {"size": 2.5}, {"initialization": "normal"},
                       {"reinit_probability": 1.5}, {"num_classes": 0},
                       {"initialization": "gaussian_mixture"}, {"covariance": "spherical"},
                       {"value_range": (1.0, -1.0)}):
            with self.assertRaisesRegex(ValueError, "Received|needs"):
                ReplayBuffer(**kwargs)
        with self.assertRaisesRegex(ValueError, "height, width, channels"):
            ReplayBuffer(size=4).build((8, 8))

    def test_gaussian_mixture_adapt(self):
        images, labels, _, _ = _class_gaussians()
        buffer = ReplayBuffer(size=6000, initialization="gaussian_mixture", num_classes=3)
        buffer.build((2, 2, 1))
        self.assertFalse(buffer.is_adapted)
        means, scales = buffer.adapt(images, labels, seed=0)
        self.assertTrue(buffer.is_adapted)
        refilled = testing.to_numpy(buffer.images).reshape(3, 2000, 4)
        flat = images.reshape(-1, 4).astype("float64")
        for c in range(3):
            data_mean, data_cov = _statistics(flat[labels == c])
            self.assertAllClose(means[c], data_mean, atol=1e-6)
            self.assertAllClose(scales[c] @ scales[c].T, data_cov + 1e-4 * np.eye(4), atol=1e-6)
            # Block c of the refilled buffer holds samples of class c's Gaussian.
            block_mean, block_cov = _statistics(refilled[c].astype("float64"))
            self.assertAllClose(block_mean, data_mean, atol=0.015)
            self.assertAllClose(block_cov, data_cov, atol=0.004)
            # Different from the other classes' statistics.
            other = flat[labels == (c + 1) % 3].mean(0)
            self.assertGreater(np.abs(block_mean - other).max(), 0.3)

    def test_gaussian_mixture_refill_at_cifar_size(self):
        # 32x32x3 images: one (3072, 3072) factor per class. Gathering one factor per chain, as
        # the first implementation did, asked for 1000 * 3072^2 floats (75 GB) here.
        rng = np.random.default_rng(0)
        labels = np.arange(200) % 2
        images = np.clip(rng.normal(0.4 * (2 * labels - 1)[:, None, None, None], 0.3,
                                    (200, 32, 32, 3)), -1, 1).astype("float32")
        buffer = ReplayBuffer(size=1000, initialization="gaussian_mixture", num_classes=2)
        means, _ = buffer.adapt(images, labels, seed=0)
        refilled = testing.to_numpy(buffer.images).reshape(2, 500, -1)
        for c in range(2):
            self.assertAllClose(refilled[c].mean(0).mean(), means[c].mean(), atol=0.01)
        self.assertLess(refilled[0].mean(), -0.3)
        self.assertGreater(refilled[1].mean(), 0.3)

    def test_gaussian_mixture_diagonal(self):
        images, labels, _, _ = _class_gaussians()
        buffer = ReplayBuffer(size=6000, initialization="gaussian_mixture", num_classes=3,
                              covariance="diagonal")
        buffer.adapt(images, labels, seed=1)  # builds the buffer from the images' shape
        refilled = testing.to_numpy(buffer.images).reshape(3, 2000, 4).astype("float64")
        flat = images.reshape(-1, 4).astype("float64")
        for c in range(3):
            data_mean, data_cov = _statistics(flat[labels == c])
            block_mean, block_cov = _statistics(refilled[c])
            self.assertAllClose(block_mean, data_mean, atol=0.015)
            self.assertAllClose(np.diag(block_cov), np.diag(data_cov), atol=0.004)
            self.assertAllClose(block_cov - np.diag(np.diag(block_cov)), np.zeros((4, 4)),
                                atol=0.004)

    def test_fresh_samples_from_mixture(self):
        images, labels, _, _ = _class_gaussians()
        buffer = ReplayBuffer(size=3000, initialization="gaussian_mixture", num_classes=3)
        buffer.adapt(images, labels)
        flat = images.reshape(-1, 4).astype("float64")
        requested = np.repeat(np.arange(3), 2000)
        fresh = testing.to_numpy(
            buffer.fresh_samples(6000, labels=tf.constant(requested), seed=_seed(3))
        ).reshape(3, 2000, 4).astype("float64")
        for c in range(3):
            data_mean, data_cov = _statistics(flat[labels == c])
            block_mean, block_cov = _statistics(fresh[c])
            self.assertAllClose(block_mean, data_mean, atol=0.015)
            self.assertAllClose(block_cov, data_cov, atol=0.004)
        # Without labels: a mixture of the three classes.
        mixture = testing.to_numpy(buffer.fresh_samples(6000, seed=_seed(4))).reshape(-1, 4)
        self.assertAllClose(mixture.mean(0), flat.mean(0), atol=0.03)
        # Class-conditional draws restart chains from their own class.
        buffer.reinit_probability = 1.0
        _, restarted, _ = buffer.draw(3000, labels=tf.constant(np.repeat([2], 3000)),
                                      seed=_seed(5))
        self.assertAllClose(testing.to_numpy(restarted).reshape(-1, 4).mean(0),
                            flat[labels == 2].mean(0), atol=0.015)

    def test_uniform_fraction_of_mixture_restarts(self):
        # Class images constant at 0.9 (tiny covariance): a mixture draw is ~0.9 everywhere, a
        # uniform one spreads over [-1, 1]; the share of spread rows is the uniform fraction.
        images = np.full((300, 4, 4, 1), 0.9, "float32") + np.random.default_rng(0).normal(
            0, 1e-3, (300, 4, 4, 1)).astype("float32")
        labels = np.repeat(np.arange(3), 100)
        for fraction in (0.0, 0.3, 1.0):
            buffer = ReplayBuffer(size=300, initialization="gaussian_mixture", num_classes=3,
                                  uniform_fraction=fraction)
            buffer.adapt(images, labels)
            fresh = testing.to_numpy(buffer.fresh_samples(4000, seed=_seed(6))).reshape(4000, -1)
            spread = fresh.std(axis=1) > 0.2
            # Binomial(4000, f): standard deviation below 0.008, so 0.03 is about 4 of them.
            self.assertAllClose(spread.mean(), fraction, atol=0.03)
            self.assertAllClose(fresh[~spread], np.full_like(fresh[~spread], 0.9), atol=0.05)
            self.assertBetween(fresh[spread].min(initial=-1.0), -1.0, -0.8 if fraction else -1.0)
        self.assertEqual(ReplayBuffer.from_config(buffer.get_config()).uniform_fraction, 1.0)
        with self.assertRaisesRegex(ValueError, r"uniform_fraction.*\[0, 1\].*1.5"):
            ReplayBuffer(uniform_fraction=1.5)
        # The models hand it to their buffer and save it.
        import keras_jem

        model = testing.make_model(keras_jem.JEMPP, buffer_uniform_fraction=0.25, build=False)
        self.assertEqual(model.buffer.uniform_fraction, 0.25)
        self.assertEqual(model.get_config()["buffer_uniform_fraction"], 0.25)

    def test_partial_restarts_from_the_full_covariance_mixture(self):
        """Only the restarted chains are drawn from the class Gaussians (full covariance);
        the others keep their buffer contents."""
        images, labels, _, _ = _class_gaussians()
        buffer = ReplayBuffer(size=3000, initialization="gaussian_mixture", num_classes=3,
                              reinit_probability=0.3)
        buffer.adapt(images, labels)
        buffer.images.assign(np.full((3000, 2, 2, 1), 5.0, "float32"))
        flat = images.reshape(-1, 4).astype("float64")
        restarted = []
        for seed in range(4):
            _, drawn, mask = buffer.draw(1500, labels=tf.constant(np.repeat([1], 1500)),
                                         seed=_seed(seed, 2))
            drawn, mask = testing.to_numpy(drawn).reshape(-1, 4), testing.to_numpy(mask)
            self.assertAllEqual(drawn[~mask], np.full_like(drawn[~mask], 5.0))
            self.assertAllInRange(drawn[mask], -1.0, 1.0)
            restarted.append(drawn[mask])
        restarted = np.concatenate(restarted)
        self.assertAllClose(len(restarted) / 6000, 0.3, atol=0.03)
        data_mean, data_cov = _statistics(flat[labels == 1])
        mean, cov = _statistics(restarted.astype("float64"))
        self.assertAllClose(mean, data_mean, atol=0.02)
        self.assertAllClose(cov, data_cov, atol=0.006)

    def test_fresh_samples_are_clipped_to_range(self):
        rng = np.random.default_rng(0)
        images = np.clip(rng.normal(0.8, 0.5, (400, 2, 2, 1)), -1, 1).astype("float32")
        buffer = ReplayBuffer(size=400, initialization="gaussian_mixture", num_classes=2)
        buffer.adapt(images, np.arange(400) % 2)
        self.assertAllInRange(buffer.images, -1.0, 1.0)
        self.assertAllInRange(buffer.fresh_samples(500, seed=_seed(0)), -1.0, 1.0)

    def test_adapt_errors_and_rare_classes(self):
        buffer = ReplayBuffer(size=30, initialization="gaussian_mixture", num_classes=3)
        buffer.build((2, 2, 1))
        images, labels, _, _ = _class_gaussians(per_class=50)
        with self.assertRaisesRegex(ValueError, "Received"):
            buffer.adapt(images.reshape(-1, 4, 1, 1), labels)
        with self.assertRaisesRegex(ValueError, "Received"):
            buffer.adapt(images, labels[:-1])
        # A class with fewer than 2 examples falls back to the pooled covariance (and, with no
        # example at all, the pooled mean).
        keep = np.concatenate([np.arange(100), [100]])  # class 2: one example
        means, scales = buffer.adapt(images[keep], labels[keep])
        flat = images[keep].reshape(-1, 4).astype("float64")
        self.assertAllClose(means[2], flat[-1], atol=1e-6)
        self.assertAllClose(scales[2] @ scales[2].T, np.cov(flat.T) + 1e-4 * np.eye(4),
                            atol=1e-6)
        means, _ = buffer.adapt(images[:100], labels[:100])  # class 2: none
        self.assertAllClose(means[2], images[:100].reshape(-1, 4).mean(0), atol=1e-6)
        self.assertTrue(np.isfinite(buffer.images.numpy()).all())

    def test_reset(self):
        images, labels, _, _ = _class_gaussians()
        buffer = ReplayBuffer(size=3000, initialization="gaussian_mixture", num_classes=3)
        buffer.adapt(images, labels)
        buffer.images.assign(np.zeros((3000, 2, 2, 1), "float32"))
        buffer.reset(seed=1)
        refilled = testing.to_numpy(buffer.images).reshape(3, 1000, 4)
        flat = images.reshape(-1, 4)
        for c in range(3):
            self.assertAllClose(refilled[c].mean(0), flat[labels == c].mean(0), atol=0.02)

        uniform = _buffer(size=2500)
        uniform.images.assign(np.zeros((2500, 2, 2, 1), "float32"))
        uniform.reset(seed=1)
        values = testing.to_numpy(uniform.images)
        self.assertAllInRange(values, -1.0, 1.0)
        self.assertAllClose(values.var(), 1.0 / 3.0, atol=0.02)
        self.assertTrue((values != 0).all())

    def test_config_round_trip(self):
        buffer = ReplayBuffer(size=60, initialization="gaussian_mixture", reinit_probability=0.1,
                              num_classes=6, value_range=(0.0, 1.0), covariance="diagonal",
                              jitter=1e-3, seed=4, name="chains")
        config = json.loads(json.dumps(buffer.get_config()))
        restored = ReplayBuffer.from_config(config)
        self.assertEqual(restored.get_config(), buffer.get_config())
        for name in ("size", "initialization", "reinit_probability", "num_classes",
                     "value_range", "covariance", "jitter", "seed", "name"):
            self.assertEqual(getattr(restored, name), getattr(buffer, name), name)
        serialized = keras.saving.serialize_keras_object(buffer)
        self.assertIsInstance(keras.saving.deserialize_keras_object(serialized), ReplayBuffer)

    def test_variables_are_saved_with_weights(self):
        buffer = _buffer(size=10, seed=1)
        other = _buffer(size=10, seed=2)
        other.set_weights(buffer.get_weights())
        self.assertAllEqual(other.images, buffer.images)
        self.assertEqual([v.name for v in buffer.weights], ["images"])
