"""Generation with known answers: denoise, inpaint and compose on explicit quadratic energies.

With `E(x) = 1/2 ||x - c||^2 / s^2` one SGLD step without noise is `x - c <- (1 - a / s^2)
(x - c)`, so every result is known: denoising contracts the error to the clean images by
`(1 - a / s^2)^(rounds * steps)`, inpainting pulls the masked pixels to `c` and must not touch
the others, and a sum of such energies has its minimum at the precision-weighted mean of the
centres.
"""

import keras
import numpy as np
import tensorflow as tf

import keras_jem
from keras_jem import generation
from keras_jem import sampling
from tests import testing

SHAPE = (6, 6, 1)


class GaussianEnergy:
    """`E(x) = weight/2 * ||x - center||^2 / scale^2` per example (center: one image or a batch);
    with `centers` per class, `E(x, y) = 1/2 ||x - centers[y]||^2 / scale^2`."""

    def __init__(self, center=None, scale=1.0, centers=None):
        self.center = None if center is None else tf.constant(center, tf.float32)
        self.centers = None if centers is None else tf.constant(centers, tf.float32)
        self.num_classes = None if centers is None else len(centers)
        self.scale = float(scale)
        self.image_shape = SHAPE

    def energy(self, x, y=None, training=False):
        if y is None:
            center = self.center
        else:
            center = tf.gather(self.centers, tf.cast(tf.reshape(y, (-1,)), tf.int32))
        return 0.5 * tf.reduce_sum(tf.square(x - center), axis=[1, 2, 3]) / self.scale ** 2


class QuadraticBackbone(keras.layers.Layer):
    """One feature: `||x - clean||^2` (clean: a fixed batch), so an IGEBM with head weight
    `1 / (2 s^2)` has the energy `1/2 ||x - clean||^2 / s^2`."""

    feature_dim = 1

    def __init__(self, clean, **kwargs):
        super().__init__(**kwargs)
        self.clean = tf.constant(clean, tf.float32)

    def call(self, x, training=None):
        return tf.reduce_sum(tf.square(x - self.clean), axis=[1, 2, 3])[:, None]


def _clean_images(n=6, seed=0):
    return np.random.default_rng(seed).uniform(-0.7, 0.7, (n,) + SHAPE).astype(np.float32)


def _error(x, clean):
    return float(np.linalg.norm(testing.to_numpy(x) - clean))


class DenoiseTest(testing.TestCase):
    SCALE, STEP, ROUNDS, STEPS = 0.5, 0.05, 5, 4  # contraction 1 - 0.05 / 0.25 = 0.8 per step
    FACTOR = 0.8 ** (ROUNDS * STEPS)  # 0.0115

    def _noisy(self, clean):
        noisy = generation.salt_and_pepper(clean, fraction=0.3, seed=1)
        self.assertGreater(_error(noisy, clean), 1.0)
        return noisy

    def test_denoise_contracts_error_by_the_known_factor(self):
        clean = _clean_images()
        noisy = self._noisy(clean)
        sampler = sampling.SGLD(self.STEPS, step_size=self.STEP, noise_scale=0.0,
                                clip_range=(-1.0, 1.0))
        restored = generation.denoise(GaussianEnergy(clean, self.SCALE), noisy,
                                      num_rounds=self.ROUNDS, num_steps=self.STEPS,
                                      sampler=sampler, seed=0)
        ratio = _error(restored, clean) / _error(noisy, clean)
        self.assertAllClose(ratio, self.FACTOR, rtol=1e-3)
        # Per pixel: the corruption shrank by exactly that factor.
        self.assertAllClose(testing.to_numpy(restored) - clean, self.FACTOR * (noisy - clean),
                            atol=1e-5)

    def test_igebm_denoise(self):
        clean = _clean_images()
        noisy = self._noisy(clean)
        model = keras_jem.IGEBM(
            QuadraticBackbone(clean),
            sampler=sampling.SGLD(self.STEPS, step_size=self.STEP, noise_scale=0.0,
                                  clip_range=(-1.0, 1.0)),
            buffer_size=10, seed=0)
        model.build((None,) + SHAPE)
        testing.assign_by_shape(model.trainable_variables, {
            (1, 1): [[0.5 / self.SCALE ** 2]], (1,): [0.0]})
        self.assertAllClose(testing.to_numpy(model.energy(noisy)),
                            0.5 * np.sum((noisy - clean) ** 2, axis=(1, 2, 3)) / 0.25,
                            rtol=1e-5)
        restored = model.denoise(noisy, num_rounds=self.ROUNDS, seed=0)
        ratio = _error(restored, clean) / _error(noisy, clean)
        self.assertLess(ratio, 0.02)  # the stated factor: 0.8^20 = 0.0115
        self.assertAllClose(ratio, self.FACTOR, rtol=1e-3)


class InpaintTest(testing.TestCase):
    def test_fills_the_mask_toward_the_minimum_and_keeps_the_rest(self):
        clean = _clean_images()
        # The known part of the images is NOT the energy's minimum: it must stay as given.
        images = clean + np.random.default_rng(2).normal(0, 0.1, clean.shape).astype(
            np.float32)
        mask = np.zeros(SHAPE[:2], bool)
        mask[3:, 1:5] = True
        steps, step, scale = 30, 0.05, 0.5  # contraction 0.8 per step: 0.8^30 = 1.2e-3
        sampler = sampling.SGLD(1, step_size=step, noise_scale=0.0, clip_range=(-1.0, 1.0))
        filled = testing.to_numpy(generation.inpaint(
            GaussianEnergy(clean, scale), images, mask, num_steps=steps, sampler=sampler,
            seed=3))
        full = np.broadcast_to(mask[None, :, :, None], images.shape)
        self.assertTrue(np.array_equal(filled[~full], images[~full]),
                        "pixels outside the mask changed")
        # Masked pixels start anywhere in [-1, 1] (|start - clean| <= 1.7) and contract.
        self.assertLess(float(np.abs(filled[full] - clean[full]).max()), 1.7 * 0.8 ** steps
                        + 1e-5)
        # ... toward the minimum, not toward the given pixels there.
        self.assertGreater(float(np.abs(images[full] - clean[full]).max()), 0.1)


class ComposeTest(testing.TestCase):
    def test_two_models_land_at_the_minimum_of_the_weighted_sum(self):
        rng = np.random.default_rng(4)
        a = rng.uniform(-0.8, 0.8, SHAPE).astype(np.float32)
        b = rng.uniform(-0.8, 0.8, SHAPE).astype(np.float32)
        s1, s2, w2 = 0.5, 1.0, 3.0
        precision = 1 / s1 ** 2 + w2 / s2 ** 2  # 7: the Hessian of the sum
        minimum = (a / s1 ** 2 + w2 * b / s2 ** 2) / precision
        sampler = sampling.SGLD(40, step_size=0.25 / precision, noise_scale=0.0)
        x_init = rng.uniform(-1, 1, (5,) + SHAPE).astype(np.float32)
        samples = testing.to_numpy(generation.compose(
            [GaussianEnergy(a, s1), (GaussianEnergy(b, s2), None, w2)], x_init=x_init,
            sampler=sampler, seed=0))
        # 0.75^40 = 1e-5 of the initial distance (< 2) is left.
        self.assertAllClose(samples, np.broadcast_to(minimum, samples.shape), atol=1e-4)
        # Far from either energy's own minimum, and from the unweighted sum's.
        for other in (a, b, (a / s1 ** 2 + b / s2 ** 2) / (1 / s1 ** 2 + 1 / s2 ** 2)):
            self.assertGreater(float(np.abs(minimum - other).max()), 0.05)

    def test_two_labels_of_one_conditional_model(self):
        rng = np.random.default_rng(5)
        centers = rng.uniform(-0.8, 0.8, (3,) + SHAPE).astype(np.float32)
        model = GaussianEnergy(centers=centers, scale=1.0)
        sampler = sampling.SGLD(30, step_size=0.25, noise_scale=0.0)  # 0.5^30 contraction
        samples = testing.to_numpy(generation.compose(
            [(model, 0), (model, 2)], x_init=rng.uniform(-1, 1, (4,) + SHAPE).astype(
                np.float32), sampler=sampler, seed=0))
        self.assertAllClose(samples, np.broadcast_to((centers[0] + centers[2]) / 2,
                                                     samples.shape), atol=1e-5)
