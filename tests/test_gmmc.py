"""GMMC: Max-Mahalanobis centres, nearest-centre predictions, the three losses, the sampler."""

import os

import keras
import numpy as np
import tensorflow as tf

from keras_jem.models.gmmc import GMMC
from keras_jem.models.gmmc import max_mahalanobis_centers
from keras_jem.sampling.latent_target import LatentTargetSampler
from tests import testing


@keras.saving.register_keras_serializable(package="keras_jem_tests")
class FlattenBackbone(keras.layers.Layer):
    """`features = flatten(x) @ kernel`, kernel the identity at init: features are the pixels."""

    def __init__(self, feature_dim=2, **kwargs):
        super().__init__(**kwargs)
        self.feature_dim = feature_dim

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(int(np.prod(input_shape[1:])), self.feature_dim),
            initializer="identity",
        )

    def stem(self, x):
        return keras.ops.reshape(x, (keras.ops.shape(x)[0], -1))

    def call_from_stem(self, h, training=False):
        return keras.ops.matmul(h, self.kernel)

    def call(self, x, training=None):
        return self.call_from_stem(self.stem(x))

    def get_config(self):
        return {**super().get_config(), "feature_dim": self.feature_dim}


def linear_gmmc(mode, num_classes=3, image_shape=(1, 1, 2), **kwargs):
    """A GMMC whose features are its pixels: centres and energies are checkable by hand."""
    kwargs.setdefault("sampler", LatentTargetSampler(num_steps=0))
    kwargs.setdefault("buffer_size", num_classes)
    kwargs.setdefault("reinit_probability", 0.0)
    model = GMMC(FlattenBackbone(int(np.prod(image_shape))), num_classes, mode=mode,
                 center_scale=1.0, seed=0, **kwargs)
    model(np.zeros((1,) + image_shape, "float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    return model


def half_energy(features, center):
    return 0.5 * float(np.sum((np.asarray(features) - np.asarray(center)) ** 2))


class CentersTest(testing.TestCase):
    def test_simplex_inner_products_and_norms(self):
        for num_classes, feature_dim, scale in ((2, 1, 1.0), (3, 2, 10.0), (10, 9, 10.0),
                                                (10, 128, 10.0), (100, 640, 3.0)):
            centers = max_mahalanobis_centers(num_classes, feature_dim, scale).astype(np.float64)
            self.assertEqual(centers.shape, (num_classes, feature_dim))
            gram = centers @ centers.T
            expected = np.full_like(gram, -scale**2 / (num_classes - 1))
            np.fill_diagonal(expected, scale**2)
            self.assertAllClose(gram, expected, atol=1e-4 * scale**2)
            self.assertAllClose(np.linalg.norm(centers, axis=1), np.full(num_classes, scale),
                                rtol=1e-6)
            # A regular simplex is centred at the origin.
            self.assertAllClose(centers.sum(0), np.zeros(feature_dim), atol=1e-4 * scale)

    def test_bad_constants_fail_before_any_work(self):
        backbone = testing.small_cnn(feature_dim=8)
        with self.assertRaisesRegex(ValueError, "center_scale"):
            GMMC(backbone, 10, center_scale=0.0)
        with self.assertRaisesRegex(ValueError, "center_scale"):
            GMMC(backbone, 10, center_scale=-1.0)
        with self.assertRaisesRegex(ValueError, "span 9 dimensions.*feature dimension is 8"):
            GMMC(backbone, 10)
        with self.assertRaisesRegex(ValueError, "Unknown GMMC `mode` 'gen'"):
            GMMC(testing.small_cnn(), 10, mode="gen")
        with self.assertRaisesRegex(ValueError, "not divisible"):
            GMMC(testing.small_cnn(), 10, mode="generative", buffer_size=105)
        with self.assertRaisesRegex(ValueError, "px_weight"):
            GMMC(testing.small_cnn(), 10, px_weight=1.0)

    def test_head_is_fixed(self):
        model = testing.make_model(GMMC, backbone=testing.small_cnn(), buffer_size=100,
                                   sampler=LatentTargetSampler(num_steps=2))
        self.assertEqual(model.head.trainable_weights, [])
        self.assertNotIn(id(model.centers), [id(v) for v in model.trainable_weights])
        centers = testing.to_numpy(model.centers)
        self.assertAllClose(centers, max_mahalanobis_centers(10, 32, 10.0))


class PredictionTest(testing.TestCase):
    def test_predictions_are_nearest_centres(self):
        model = testing.make_model(GMMC, backbone=testing.small_cnn(), buffer_size=100,
                                   sampler=LatentTargetSampler(num_steps=2))
        images, _ = testing.load_digits("test", 64)
        features = testing.to_numpy(model.features(images)).astype(np.float64)
        centers = testing.to_numpy(model.centers).astype(np.float64)
        distances = ((features[:, None, :] - centers[None]) ** 2).sum(-1)
        logits = testing.to_numpy(model(images))
        self.assertAllClose(logits, -0.5 * distances, rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(logits.argmax(1), distances.argmin(1))
        # E(x, y) = 1/2 ||phi - mu_y||^2 and E(x) = -logsumexp(logits).
        labels = np.arange(64) % 10
        self.assertAllClose(testing.to_numpy(model.energy(images, labels)),
                            0.5 * distances[np.arange(64), labels], rtol=1e-4, atol=1e-3)
        self.assertAllClose(testing.to_numpy(model.energy(images)),
                            -tf.reduce_logsumexp(logits, axis=1), rtol=1e-5)


class LossTest(testing.TestCase):
    x = np.array([[[[0.5, 0.0]]], [[[0.0, 0.25]]]], np.float32)
    y = np.array([0, 2])

    def centers(self):
        return max_mahalanobis_centers(3, 2, 1.0)

    def test_discriminative_loss_by_hand(self):
        model = linear_gmmc("discriminative")
        logs = model.train_on_batch(self.x, self.y, return_dict=True)
        centers = self.centers()
        expected = np.mean([half_energy(self.x[i].ravel(), centers[self.y[i]]) for i in range(2)])
        # mu_0 = (1, 0): 1/2 * 0.25; mu_2 = (-1/2, -sqrt(3)/2).
        self.assertAllClose(logs["loss_mmc"], expected, rtol=1e-5)
        self.assertAllClose(logs["loss"], expected, rtol=1e-5)
        self.assertNotIn("energy_samples", logs)

    def _set_buffer(self, model):
        # One chain per class block: chain k is the sample for label k (no reinit, no steps).
        chains = np.array([[[[0.2, 0.2]]], [[[-0.3, 0.1]]], [[[0.0, -0.9]]]], np.float32)
        model.buffer.images.assign(chains)
        return chains

    def test_generative_loss_by_hand(self):
        model = linear_gmmc("generative", beta=0.5)
        chains = self._set_buffer(model)
        logs = model.train_on_batch(self.x, self.y, return_dict=True)
        centers = self.centers()
        data = np.mean([half_energy(self.x[i].ravel(), centers[self.y[i]]) for i in range(2)])
        samples = np.mean([half_energy(chains[k].ravel(), centers[k]) for k in self.y])
        self.assertAllClose(logs["energy_samples"], samples, rtol=1e-5)
        self.assertAllClose(logs["loss"], data - 0.5 * samples, rtol=1e-5)

    def test_joint_switches_at_start_generative(self):
        model = linear_gmmc("joint", start_generative=2)
        chains = self._set_buffer(model)
        centers = self.centers()
        data = np.mean([half_energy(self.x[i].ravel(), centers[self.y[i]]) for i in range(2)])
        samples = np.mean([half_energy(chains[k].ravel(), centers[k]) for k in self.y])
        model.epochs_trained.assign(1)
        logs = model.train_on_batch(self.x, self.y, return_dict=True)
        self.assertAllClose(logs["loss"], data, rtol=1e-5)
        self.assertEqual(float(logs["generative"]), 0.0)
        model.epochs_trained.assign(2)
        logs = model.train_on_batch(self.x, self.y, return_dict=True)
        self.assertAllClose(logs["loss"], data - 0.5 * samples, rtol=1e-5)
        self.assertEqual(float(logs["generative"]), 1.0)

    def test_gradient_of_discriminative_loss(self):
        # d/dW mean_i 1/2 ||W^T x_i - mu_yi||^2 = mean_i x_i (W^T x_i - mu_yi)^T.
        model = linear_gmmc("discriminative")
        model.compile(optimizer=keras.optimizers.SGD(1.0))
        centers = self.centers()
        flat = self.x.reshape(2, 2)
        expected_grad = np.mean(
            [np.outer(flat[i], flat[i] - centers[self.y[i]]) for i in range(2)], axis=0)
        model.train_on_batch(self.x, self.y)
        self.assertAllClose(testing.to_numpy(model.backbone.kernel), np.eye(2) - expected_grad,
                            rtol=1e-5, atol=1e-6)


class SamplerTest(testing.TestCase):
    def test_descent_toward_the_centre_in_closed_form(self):
        # Identity features, no latent noise, mean reduction over B=2 chains:
        # x_k = z + (1 - alpha / B)^k (x_0 - z).
        model = linear_gmmc("discriminative")
        sampler = LatentTargetSampler(num_steps=3, step_size=0.5, latent_noise=0.0,
                                      clip_range=None)
        x0 = np.array([[[[0.3, -0.2]]], [[[0.9, 0.9]]]], np.float32)
        labels = np.array([1, 2])
        out = testing.to_numpy(sampler(model, x0, y=labels, seed=tf.constant([0, 1], tf.int64)))
        centers = self.centers = max_mahalanobis_centers(3, 2, 1.0)
        expected = centers[labels] + 0.75**3 * (x0.reshape(2, 2) - centers[labels])
        self.assertAllClose(out.reshape(2, 2), expected, rtol=1e-5)

    def test_clip_inject_and_sum_reduction(self):
        model = linear_gmmc("discriminative")
        x0 = np.array([[[[0.3, -0.2]]], [[[0.9, 0.9]]]], np.float32)
        seed = tf.constant([0, 1], tf.int64)
        clipped = LatentTargetSampler(num_steps=50, step_size=1.0, latent_noise=0.5,
                                      clip_range=(-0.5, 0.5), reduction="sum")
        out = testing.to_numpy(clipped(model, x0, y=[0, 1], seed=seed))
        self.assertAllInRange(out, -0.5, 0.5)
        injected = LatentTargetSampler(num_steps=4, latent_noise=0.1, inject=True)
        a = testing.to_numpy(injected(model, x0, y=[0, 1], seed=seed))
        b = testing.to_numpy(injected(model, x0, y=[0, 1], seed=seed))
        np.testing.assert_array_equal(a, b)  # same seed, same chains
        with self.assertRaisesRegex(ValueError, "features"):
            LatentTargetSampler()(testing.make_model(), x0.reshape(2, 1, 1, 2)[:, :, :, :1])
        with self.assertRaisesRegex(ValueError, "reduction"):
            LatentTargetSampler(reduction="max")

    def test_samples_reach_their_class(self):
        model = testing.make_model(GMMC, backbone=testing.small_cnn(), buffer_size=100,
                                   sampler=LatentTargetSampler(num_steps=2))
        labels = np.repeat(np.arange(10), 2)
        x0 = np.random.default_rng(0).uniform(-1, 1, (20, 8, 8, 1)).astype(np.float32)
        before = testing.to_numpy(model.energy(x0, labels))
        samples = model.sample(y=labels, x_init=x0, num_steps=30, seed=0)
        after = testing.to_numpy(model.energy(samples, labels))
        self.assertAllInRange(samples, -1.0, 1.0)
        self.assertLess(after.mean(), before.mean())


class TrainingTest(testing.TestCase):
    def test_fit_joint_save_load_resume(self):
        images, labels = testing.load_digits("train", 64)
        model = testing.make_model(
            GMMC, backbone=testing.small_cnn(), buffer_size=100, mode="joint",
            start_generative=1, center_scale=5.0, beta=0.25,
            sampler=LatentTargetSampler(num_steps=2, inject=True),
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        inputs = {"images": images, "px_images": images[::-1]}
        history = model.fit(inputs, labels, batch_size=32, epochs=2, steps_per_epoch=1,
                            verbose=0).history
        self.assertEqual(int(testing.to_numpy(model.epochs_trained)), 2)
        self.assertEqual(history["diverged"], [0.0, 0.0])
        self.assertTrue(np.all(np.isfinite(history["loss"])))
        self.assertEqual(history["generative"], [0.0, 1.0])
        self.assertEqual(history["energy_samples"][0], 0.0)
        self.assertGreater(history["energy_samples"][1], 0.0)
        # A second fit continues the count; initial_epoch never lowers it.
        model.fit(inputs, labels, batch_size=32, epochs=4, initial_epoch=3, steps_per_epoch=1,
                  verbose=0)
        self.assertEqual(int(testing.to_numpy(model.epochs_trained)), 4)
        evaluation = model.evaluate(images, labels, verbose=0, return_dict=True)
        self.assertEqual(sorted(evaluation), ["accuracy", "loss_ce", "loss_mmc"])

        path = os.path.join(self.get_temp_dir(), "gmmc.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        self.assertIsInstance(loaded, GMMC)
        np.testing.assert_array_equal(testing.to_numpy(loaded(images[:8])),
                                      testing.to_numpy(model(images[:8])))
        np.testing.assert_array_equal(testing.to_numpy(loaded.buffer.images),
                                      testing.to_numpy(model.buffer.images))
        # The epoch count, hence the generative phase, survives loading.
        self.assertEqual(int(testing.to_numpy(loaded.epochs_trained)), 4)
        self.assertTrue(bool(testing.to_numpy(loaded.generative_phase())))
        self.assertEqual((loaded.mode, loaded.center_scale, loaded.beta), ("joint", 5.0, 0.25))
        self.assertTrue(loaded.sampler.inject)

    def test_generative_needs_labels(self):
        model = testing.make_model(GMMC, backbone=testing.small_cnn(), buffer_size=100,
                                   sampler=LatentTargetSampler(num_steps=1))
        model.compile(optimizer="adam")
        images, _ = testing.load_digits("train", 32)
        with self.assertRaisesRegex(ValueError, "needs labels"):
            model.fit(images, batch_size=16, epochs=1, steps_per_epoch=1, verbose=0)


class SerializationTest(testing.TestCase):
    def test_config_round_trip(self):
        model = GMMC(testing.small_cnn(), 10, mode="joint", start_generative=3, beta=0.25,
                     center_scale=5.0, buffer_size=100,
                     sampler=LatentTargetSampler(num_steps=2, inject=True))
        config = model.get_config()
        for key in ("px_weight", "pyx_weight", "pxy_weight", "conditional_sampling"):
            self.assertNotIn(key, config)
        clone = GMMC.from_config(config)
        self.assertEqual(clone.get_config(), config)
        self.assertEqual(clone.sampler.get_config(), model.sampler.get_config())

    def test_keras_round_trip_in_fresh_process(self):
        model = testing.make_model(GMMC, backbone=FlattenBackbone(64), buffer_size=20,
                                   mode="generative", sampler=LatentTargetSampler(num_steps=1))
        model.epochs_trained.assign(7)
        model.buffer.images.assign(np.random.default_rng(0).uniform(-1, 1, (20, 8, 8, 1)))
        images, _ = testing.load_digits("test", 8)
        path = os.path.join(self.get_temp_dir(), "gmmc.keras")
        model.save(path)
        np.save(path + ".x.npy", images)
        np.save(path + ".logits.npy", testing.to_numpy(model(images)))
        np.save(path + ".buffer.npy", testing.to_numpy(model.buffer.images))
        output = testing.run_in_subprocess(f"""
            import numpy as np, keras
            import keras_jem
            import tests.test_gmmc  # registers the test backbone
            from keras_jem.models.gmmc import GMMC
            path = {path!r}
            model = keras.saving.load_model(path)
            assert isinstance(model, GMMC), type(model)
            np.testing.assert_array_equal(np.asarray(model(np.load(path + ".x.npy"))),
                                          np.load(path + ".logits.npy"))
            np.testing.assert_array_equal(np.asarray(model.buffer.images),
                                          np.load(path + ".buffer.npy"))
            assert int(np.asarray(model.epochs_trained)) == 7
            print("OK")
        """)
        self.assertIn("OK", output)
