"""IGEBM: energies and logits, the loss, spectral norm, and the generation tasks."""

import json
import os

import keras
import numpy as np
import tensorflow as tf

from keras_jem import generation
from keras_jem import sampling
from keras_jem.backbones import SNResNet
from keras_jem.backbones.layers import SpectralConv2D
from keras_jem.models.igebm import IGEBM
from keras_jem.optimizers import SAM
from tests import testing


@keras.saving.register_keras_serializable(package="keras_jem_tests")
class LinearEnergyBackbone(keras.layers.Layer):
    """`tanh(flatten(x) @ kernel + table[y])`: a cheap (conditional) stand-in for SNResNet."""

    def __init__(self, feature_dim=4, num_classes=None, **kwargs):
        super().__init__(**kwargs)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(int(np.prod(input_shape[1:])),
                                                            self.feature_dim))
        self.table = self.add_weight(name="table", shape=(self.num_classes or 1, self.feature_dim),
                                     initializer="random_normal")

    def call(self, x, labels=None, training=None):
        h = keras.ops.matmul(keras.ops.reshape(x, (keras.ops.shape(x)[0], -1)), self.kernel)
        if self.num_classes is not None:
            h = h + keras.ops.take(self.table, labels, axis=0)
        return keras.ops.tanh(h)

    def get_config(self):
        return {**super().get_config(), "feature_dim": self.feature_dim,
                "num_classes": self.num_classes}


def make_igebm(conditional=True, num_steps=3, buffer_size=20, backbone=None, **kwargs):
    """A tiny IGEBM: `backbone="sn"` for a small SNResNet, default the linear stand-in."""
    num_classes = 10 if conditional else None
    if backbone == "sn":
        backbone = SNResNet(filters=8, num_blocks=1, num_classes=num_classes)
    elif backbone is None:
        backbone = LinearEnergyBackbone(num_classes=num_classes)
    kwargs.setdefault("sampler", sampling.SGLD(num_steps, 10.0, 0.005, 0.01, (-1.0, 1.0)))
    model = IGEBM(backbone, buffer_size=buffer_size, seed=3, **kwargs)
    model(np.zeros((1, 8, 8, 1), "float32"))
    return model


def spectral_convs(layer):
    found = [layer] if isinstance(layer, SpectralConv2D) else []
    for sub in layer._flatten_layers(include_self=False, recursive=True):
        if isinstance(sub, SpectralConv2D):
            found.append(sub)
    return found


class EnergyTest(testing.TestCase):
    def test_conditional_logits_are_minus_class_energies(self):
        model = make_igebm(backbone="sn")
        # Random weights, so that the label matters (a fresh conditional block ignores it).
        rng = np.random.default_rng(0)
        for weight in model.backbone.trainable_weights:
            weight.assign(weight + rng.normal(0, 0.1, weight.shape))
        images, _ = testing.load_digits("test", 6)
        logits = testing.to_numpy(model(images))
        self.assertEqual(logits.shape, (6, 10))
        for label in (0, 4, 9):
            energy = testing.to_numpy(model.energy(images, np.full(6, label)))
            self.assertAllClose(logits[:, label], -energy, rtol=1e-5, atol=1e-5)
        self.assertGreater(np.std(logits, axis=1).max(), 1e-4)
        self.assertAllClose(testing.to_numpy(model.energy(images)),
                            -tf.reduce_logsumexp(logits, axis=1), rtol=1e-5)
        self.assertEqual(model.num_classes, 10)
        self.assertTrue(model.conditional)

    def test_unconditional_is_a_one_class_model(self):
        model = make_igebm(conditional=False)
        images, _ = testing.load_digits("test", 5)
        logits = testing.to_numpy(model(images))
        self.assertEqual(logits.shape, (5, 1))
        self.assertAllClose(logits[:, 0], -testing.to_numpy(model.energy(images)))
        self.assertEqual(model.num_classes, 1)
        self.assertEqual(model.sample(y=[0, 0], num_steps=1).shape, (2, 8, 8, 1))
        with self.assertRaisesRegex(ValueError, "unconditional"):
            model.sample(y=[3], num_steps=1)
        with self.assertRaisesRegex(ValueError, "conditional IGEBM"):
            model.compose([3, 8], num_samples=2)

    def test_spectral_norm_of_every_conv_after_power_iterations(self):
        model = make_igebm(backbone="sn")
        images, labels = testing.load_digits("test", 4)
        power_iteration = tf.function(lambda: model.energy(images, labels, training=True))
        for _ in range(30):  # one power iteration per training-mode call
            power_iteration()
        convs = spectral_convs(model.backbone)
        # The stem, 2 per block, and a bypass where the width changes (8 -> 16 -> 32).
        self.assertEqual(len(convs), 1 + 2 * 3 + 2)
        for conv in convs:
            kernel = testing.to_numpy(conv.normalized_kernel())
            sigma = np.linalg.svd(kernel.reshape(-1, conv.filters), compute_uv=False)[0]
            if conv.clip_only:
                self.assertLessEqual(sigma, 1.0 + 1e-4)
            else:
                self.assertAllClose(sigma, 1.0, atol=0.02)
        # The energy head is not normalised.
        self.assertNotIsInstance(model.energy_head, SpectralConv2D)
        # The power-iteration state is saved with the model.
        path = os.path.join(self.get_temp_dir(), "sn_igebm.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        for a, b in zip(convs, spectral_convs(loaded.backbone)):
            np.testing.assert_array_equal(testing.to_numpy(a.singular_vector),
                                          testing.to_numpy(b.singular_vector))
        np.testing.assert_array_equal(testing.to_numpy(loaded(images)),
                                      testing.to_numpy(model(images)))

    def test_bad_configuration(self):
        with self.assertRaisesRegex(ValueError, "not a multiple of 10"):
            IGEBM(SNResNet(filters=8, num_classes=10), buffer_size=25)
        with self.assertRaisesRegex(ValueError, "energy_l2_weight"):
            IGEBM(SNResNet(filters=8), energy_l2_weight=-1.0)

    def test_shared_training_options_round_trip(self):
        # IGEBM takes the EnergyModel options every method shares (coupled weight decay, SAM).
        model = IGEBM(SNResNet(filters=8), weight_decay=1e-3, sam=SAM(rho=0.1), seed=4)
        config = model.get_config()
        self.assertEqual((config["weight_decay"], config["seed"]), (1e-3, 4))
        self.assertNotIn("num_classes", config)  # read from the backbone
        loaded = IGEBM.from_config(config)
        self.assertEqual((loaded.weight_decay, loaded.sam.rho), (1e-3, 0.1))

    def test_default_sampler_is_the_papers(self):
        model = IGEBM(SNResNet(filters=8))
        self.assertIsInstance(model.sampler, sampling.SGLD)
        self.assertEqual(model.sampler.get_config(), {
            "num_steps": 60, "step_size": 10.0, "noise_scale": 0.005, "gradient_clip": 0.01,
            "clip_range": [-1.0, 1.0],
        })
        self.assertEqual(model.buffer.reinit_probability, 0.05)


class LossTest(testing.TestCase):
    def test_loss_by_hand(self):
        # No sampler steps, no restarts: the negatives are exactly the buffer's chains.
        model = make_igebm(conditional=False, num_steps=0, buffer_size=4,
                           backbone=testing.DenseBackbone(feature_dim=3),
                           reinit_probability=0.0, energy_l2_weight=0.5)
        model.compile(optimizer=keras.optimizers.SGD(0.0))
        images, _ = testing.load_digits("train", 4)
        chains = np.random.default_rng(1).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
        model.buffer.images.assign(chains)
        positive = testing.to_numpy(model.energy(images))
        negative = testing.to_numpy(model.energy(chains))  # all 4 chains are drawn
        logs = model.train_on_batch({"images": chains, "px_images": images},
                                    return_dict=True)
        ml = positive.mean() - negative.mean()
        l2 = np.mean(positive**2) + np.mean(negative**2)
        self.assertAllClose(logs["loss_ml"], ml, rtol=1e-5, atol=1e-6)
        self.assertAllClose(logs["loss_l2"], l2, rtol=1e-5)
        self.assertAllClose(logs["loss"], ml + 0.5 * l2, rtol=1e-5, atol=1e-6)
        self.assertEqual(float(logs["diverged"]), 0.0)

    def test_conditional_negatives_come_from_the_label_block(self):
        model = make_igebm(num_steps=0, buffer_size=10, reinit_probability=0.0)
        model.compile(optimizer=keras.optimizers.SGD(0.0))
        images, _ = testing.load_digits("train", 3)
        # One chain per class; chain k is a constant image of value k/10 - 0.5.
        chains = np.broadcast_to(
            (np.arange(10, dtype=np.float32) / 10 - 0.5)[:, None, None, None], (10, 8, 8, 1))
        model.buffer.images.assign(chains)
        labels = np.array([7, 2, 2])
        expected = np.mean(testing.to_numpy(model.energy(chains[labels], labels)))
        logs = model.train_on_batch(images, labels, return_dict=True)
        self.assertAllClose(logs["energy_samples"], expected, rtol=1e-5, atol=1e-6)


class GenerationTest(testing.TestCase):
    def test_inpainting_keeps_unmasked_pixels_bit_identical(self):
        model = make_igebm()
        images, labels = testing.load_digits("test", 6)
        mask = np.zeros((8, 8), bool)
        mask[4:] = True
        completed = testing.to_numpy(model.inpaint(images, mask, num_steps=5, y=labels, seed=0))
        np.testing.assert_array_equal(completed[:, :4], images[:, :4])
        self.assertFalse(np.array_equal(completed[:, 4:], images[:, 4:]))
        self.assertAllInRange(completed, -1.0, 1.0)
        # Other accepted mask shapes; the generic function works on any energy model.
        per_image = np.zeros((6, 8, 8, 1), bool)
        per_image[:, :, :3] = True
        completed = testing.to_numpy(generation.inpaint(model, images, per_image, num_steps=2))
        np.testing.assert_array_equal(completed[:, :, 3:], images[:, :, 3:])
        self.assertEqual(generation.inpaint(model, images, mask[:, :, None], 1).shape,
                         images.shape)

    def test_bad_masks(self):
        model = make_igebm()
        images, _ = testing.load_digits("test", 2)
        for bad in (np.zeros((8, 7), bool), np.zeros((4, 4)), np.zeros((3, 8, 8, 1)),
                    np.zeros((8, 8, 3)), np.zeros((8,))):
            with self.assertRaisesRegex(ValueError, "mask"):
                model.inpaint(images, bad, num_steps=1)
        with self.assertRaisesRegex(ValueError, "images"):
            model.inpaint(images[:, :4], np.zeros((8, 8)), num_steps=1)

    def test_salt_and_pepper_and_denoise(self):
        images, _ = testing.load_digits("test", 50)
        noisy = generation.salt_and_pepper(images, fraction=0.2, seed=0)
        changed = np.any(noisy != images, axis=-1)
        self.assertAllClose(np.mean(noisy == -0.8) + np.mean(noisy == 0.8), 0.2, atol=0.03)
        self.assertLess(changed.mean(), 0.21)
        np.testing.assert_array_equal(generation.salt_and_pepper(images, 0.2, seed=0), noisy)
        model = make_igebm()
        restored = testing.to_numpy(model.denoise(noisy[:4], num_rounds=2, num_steps=2, seed=0))
        self.assertEqual(restored.shape, (4, 8, 8, 1))
        self.assertAllInRange(restored, -1.0, 1.0)
        with self.assertRaisesRegex(ValueError, "fraction"):
            generation.salt_and_pepper(images, 1.5)

    def test_composition_lowers_the_summed_energy(self):
        model = make_igebm(num_steps=20)
        other = make_igebm(conditional=False)
        x0 = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
        target = generation.EnergySum([(model, 3), (model, 8)])
        samples = model.compose([3, 8], x_init=x0, seed=0)
        before = testing.to_numpy(target.energy(x0))
        after = testing.to_numpy(target.energy(samples))
        self.assertLess(after.mean(), before.mean())
        self.assertGreater(np.mean(after < before), 0.5)
        self.assertAllInRange(samples, -1.0, 1.0)
        # Two models, weights: the energies add up.
        mixed = generation.EnergySum([(model, 3, 2.0), other])
        self.assertAllClose(
            testing.to_numpy(mixed.energy(x0)),
            2 * testing.to_numpy(model.energy(x0, np.full(8, 3)))
            + testing.to_numpy(other.energy(x0)), rtol=1e-5)
        with self.assertRaisesRegex(ValueError, "not a class"):
            model.compose([3, 12], num_samples=2)
        with self.assertRaisesRegex(ValueError, "composition term"):
            generation.EnergySum([("not a model", 3)])

    def test_class_conditional_samples(self):
        model = make_igebm()
        samples = model.sample(y=[1, 2, 3], num_steps=2, seed=0)
        self.assertEqual(samples.shape, (3, 8, 8, 1))
        np.testing.assert_array_equal(testing.to_numpy(samples),
                                      testing.to_numpy(model.sample(y=[1, 2, 3], num_steps=2,
                                                                    seed=0)))
        self.assertEqual(model.sample(num_samples=4, from_buffer=True, num_steps=1).shape,
                         (4, 8, 8, 1))
        with self.assertRaisesRegex(ValueError, r"\[0, 10\)"):
            model.sample(y=[10])


class TrainingTest(testing.TestCase):
    def test_fit_evaluate_save_and_load(self):
        # The linear stand-in backbone keeps tracing cheap; SNResNet is trained and reloaded
        # end to end in test_sample_cli.
        model = make_igebm(num_steps=2, energy_l2_weight=0.5, reinit_probability=0.1)
        with self.assertRaisesRegex(ValueError, "labels"):
            model.compile(optimizer="adam")
            model.train_on_batch(np.zeros((2, 8, 8, 1), "float32"))
        model.compile(optimizer=keras.optimizers.Adam(3e-4, beta_1=0.0))
        images, labels = testing.load_digits("train", 32)
        buffer_before = testing.to_numpy(model.buffer.images)
        history = model.fit({"images": images, "px_images": images[::-1]}, labels,
                            batch_size=16, epochs=1, steps_per_epoch=2, verbose=0).history
        self.assertEqual(sorted(history), ["diverged", "energy_data", "energy_samples", "loss",
                                           "loss_l2", "loss_ml"])
        self.assertEqual(history["diverged"], [0.0])
        self.assertFalse(np.array_equal(buffer_before, testing.to_numpy(model.buffer.images)))
        evaluation = model.evaluate(images[:16], labels[:16], verbose=0, return_dict=True)
        self.assertEqual(sorted(evaluation), ["accuracy", "energy_data", "loss_ce"])

        path = os.path.join(self.get_temp_dir(), "igebm.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        self.assertIsInstance(loaded, IGEBM)
        self.assertEqual(json.dumps(loaded.get_config(), sort_keys=True),
                         json.dumps(model.get_config(), sort_keys=True))
        np.testing.assert_array_equal(testing.to_numpy(loaded(images[:4])),
                                      testing.to_numpy(model(images[:4])))
        np.testing.assert_array_equal(testing.to_numpy(loaded.buffer.images),
                                      testing.to_numpy(model.buffer.images))
        self.assertEqual(loaded.energy_l2_weight, 0.5)
        self.assertEqual(loaded.buffer.reinit_probability, 0.1)
