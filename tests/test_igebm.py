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


def perturbed(model, seed):
    """`model` with N(0, 0.1) added to its backbone's weights, so that the label matters (a
    fresh conditional block ignores it)."""
    rng = np.random.default_rng(seed)
    for weight in model.backbone.trainable_weights:
        weight.assign(weight + rng.normal(0, 0.1, weight.shape))
    return model


def spectral_convs(layer):
    found = [layer] if isinstance(layer, SpectralConv2D) else []
    for sub in layer._flatten_layers(include_self=False, recursive=True):
        if isinstance(sub, SpectralConv2D):
            found.append(sub)
    return found


class EnergyTest(testing.TestCase):
    def test_conditional_logits_are_minus_class_energies(self):
        model = perturbed(make_igebm(backbone="sn"), seed=0)
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
            IGEBM(SNResNet(filters=8, num_classes=10), buffer_size=25, class_blocks=True,
                  buffer_type="persistent")
        # The class-agnostic buffer (the default) takes any size.
        self.assertEqual(IGEBM(SNResNet(filters=8, num_classes=10), buffer_size=25).buffer.size,
                         25)
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

    def test_default_sampler_is_the_papers_rescaled_to_minus_one_one(self):
        model = IGEBM(SNResNet(filters=8))
        self.assertIsInstance(model.sampler, sampling.SGLD)
        self.assertEqual(model.sampler.get_config(), {
            "num_steps": 60, "step_size": 40.0, "noise_scale": 0.01, "gradient_clip": 0.005,
            "clip_range": [-1.0, 1.0], "noise_first": True,
        })
        self.assertEqual(model.buffer.reinit_probability, 0.05)

    def test_one_step_on_minus_one_one_is_twice_the_official_step_on_zero_one(self):
        # The official step on [0, 1] (train.py): p += N(0, 0.005); p -= 10 * clip(grad_p E,
        # +-0.01) with the gradient at the noisy p; p = clip(p, 0, 1). Written in numpy for
        # E(p) = sum(a * p + c * p^2 / 2), whose gradient a + c * p depends on where the noise
        # puts p (so the order of noise and gradient matters); |a| up to 0.03 puts some pixels
        # beyond the clip and some within.
        c = 0.02

        def official_step(p, noise, a, noise_first=True):
            if noise_first:
                p = p + noise
            p = p - 10.0 * np.clip(a + c * p, -0.01, 0.01)
            if not noise_first:
                p = p + noise
            return np.clip(p, 0.0, 1.0)

        rng = np.random.default_rng(0)
        shape = (8, 16, 16, 3)
        a = rng.uniform(-0.03, 0.03, shape[1:]).astype(np.float32)
        p0 = rng.uniform(0.0, 1.0, shape).astype(np.float32)
        p0[:, 0] = 0.0  # on the box's edges: the clip to the data range is exercised too
        p0[:, 1] = 1.0
        sampler = IGEBM(SNResNet(filters=8)).sampler
        seed = tf.constant([5, 6], tf.int64)
        # Same energy on u = 2p - 1.
        energy = lambda u: tf.reduce_sum(a * (u + 1.0) / 2.0 + c * tf.square((u + 1.0) / 2.0)
                                         / 2.0, axis=[1, 2, 3])
        flat = lambda u: tf.reduce_sum(0.0 * u, axis=[1, 2, 3])
        # The sampler's own noise for this seed: one step on a flat energy from 0.
        noise_u = testing.to_numpy(sampler.run(flat, np.zeros(shape, np.float32), seed, 1))
        noise_p = noise_u / 2.0
        self.assertAllClose(noise_p.std(), 0.005, rtol=0.03)  # the official noise on [0, 1]
        u1 = testing.to_numpy(sampler.run(energy, 2.0 * p0 - 1.0, seed, 1))
        expected = 2.0 * official_step(p0, noise_p, a) - 1.0
        self.assertAllClose(u1, expected, atol=2e-6, rtol=0)
        self.assertTrue(np.any(u1 == -1.0) and np.any(u1 == 1.0))
        # JEM's order (noise after the step) is a different chain here.
        noise_last = 2.0 * official_step(p0, noise_p, a, noise_first=False) - 1.0
        self.assertGreater(np.abs(noise_last - expected).max(), 1e-4)


class LossTest(testing.TestCase):
    def test_loss_by_hand(self):
        # No sampler steps, no restarts: the negatives are exactly the buffer's chains.
        model = make_igebm(conditional=False, num_steps=0, buffer_size=4,
                           backbone=testing.DenseBackbone(feature_dim=3),
                           reinit_probability=0.0, energy_l2_weight=0.5, dequantization=0.0,
                           buffer_type="persistent")
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

    def test_positives_are_dequantized_in_training_only(self):
        # A linear energy with positive weights: E(x) = w . x, so E(x+) lies between the
        # energies of the dequantisation bin's bounds.
        model = IGEBM(keras.Sequential([keras.layers.Flatten()]), buffer_size=4, seed=2,
                      sampler=sampling.SGLD(0, 1.0, 0.0), reinit_probability=0.0)
        model.build((None, 8, 8, 1))
        weights = np.random.default_rng(0).uniform(1.0, 2.0, (64, 1)).astype(np.float32)
        model.energy_head.set_weights([weights, np.zeros(1, np.float32)])
        model.compile(optimizer=keras.optimizers.SGD(0.0))
        # Half blank (-1: the bottom of its bin), half digits.
        images, _ = testing.load_digits("train", 4)
        images[:2] = -1.0
        flat = images.reshape(4, -1)
        width = 2.0 / 256.0
        self.assertEqual(model.dequantization, width)
        low = (flat + 1.0) * (1.0 - width / 2.0) - 1.0
        bounds = [np.mean(v @ weights) for v in (low, low + width)]
        bin_energy = bounds[1] - bounds[0]
        logs = model.train_on_batch(images, return_dict=True)
        self.assertBetween(float(logs["energy_data"]), *bounds)
        # About the middle of the bin (64 * 4 uniform draws), away from the raw images.
        middle = np.mean((low + width / 2) @ weights)
        self.assertAllClose(logs["energy_data"], middle, atol=0.1 * bin_energy)
        clean = np.mean(flat @ weights)
        self.assertGreater(abs(float(logs["energy_data"]) - clean), 0.3 * bin_energy)
        evaluation = model.evaluate(images, verbose=0, return_dict=True)
        self.assertAllClose(evaluation["energy_data"], clean, rtol=1e-6)

    def test_dequantization_fills_each_8_bit_level_bin_on_zero_one(self):
        model = make_igebm(conditional=False)
        levels = np.arange(256, dtype=np.float32).reshape(1, 16, 16, 1)
        images = np.tile(2.0 * levels / 255.0 - 1.0, (64, 1, 1, 1))
        out = testing.to_numpy(model.dequantize(images, tf.constant([1, 2], tf.int64)))
        p = (out + 1.0) / 2.0  # back on [0, 1]: p = k/256 + U(0, 1/256) for level k
        offset = 256.0 * p - levels
        self.assertTrue(np.all(offset >= -1e-4) and np.all(offset <= 1 + 1e-4))
        self.assertAllClose(offset.mean(), 0.5, atol=0.01)
        self.assertAllClose(offset.std(), np.sqrt(1 / 12), atol=0.01)
        self.assertTrue(np.all(out >= -1.0) and np.all(out <= 1.0))
        off = make_igebm(conditional=False, dequantization=0.0)
        np.testing.assert_array_equal(
            testing.to_numpy(off.dequantize(images, tf.constant([1, 2], tf.int64))), images)
        with self.assertRaisesRegex(ValueError, "dequantization"):
            make_igebm(dequantization=-0.1)

    def test_conditional_buffer_is_class_agnostic_by_default(self):
        # Official train.py: chains are drawn from the whole buffer and continue under the
        # batch's labels. One-chain class blocks would touch only chain 0 for labels [0] * 5.
        # (Persistent chains, to see which are continued; the FIFO is class-agnostic too.)
        model = make_igebm(num_steps=1, buffer_size=10, reinit_probability=0.0,
                           buffer_type="persistent")
        self.assertFalse(model.class_blocks)
        model.compile(optimizer=keras.optimizers.SGD(0.0))
        chains = np.zeros((10, 8, 8, 1), np.float32)
        model.buffer.images.assign(chains)
        images, _ = testing.load_digits("train", 5)
        labels = np.zeros(5, np.int32)
        model.train_on_batch(images, labels)
        changed = np.flatnonzero(np.abs(testing.to_numpy(model.buffer.images) - chains).reshape(
            10, -1).max(axis=1) > 0)
        self.assertLen(changed, 5)
        blocked = make_igebm(num_steps=1, buffer_size=10, reinit_probability=0.0,
                             class_blocks=True, buffer_type="persistent")
        blocked.compile(optimizer=keras.optimizers.SGD(0.0))
        blocked.buffer.images.assign(chains)
        blocked.train_on_batch(images, labels)
        changed = np.flatnonzero(np.abs(testing.to_numpy(blocked.buffer.images) - chains)
                                 .reshape(10, -1).max(axis=1) > 0)
        self.assertEqual(changed.tolist(), [0])
        # `sample(from_buffer=True)` draws the same way.
        model.buffer.images.assign(chains)
        model.sample(y=[3] * 4, from_buffer=True, num_steps=1, seed=1)
        changed = np.abs(testing.to_numpy(model.buffer.images) - chains).reshape(10, -1)
        self.assertEqual(int((changed.max(axis=1) > 0).sum()), 4)
        self.assertEqual(model.get_config()["class_blocks"], False)
        self.assertTrue(IGEBM.from_config(blocked.get_config()).class_blocks)

    def test_class_agnostic_negatives_use_the_batch_labels(self):
        # Every chain the same image z: the negatives' energy is E(z, y) at the batch's labels.
        model = make_igebm(num_steps=0, buffer_size=10, reinit_probability=0.0,
                           buffer_type="persistent")
        model.compile(optimizer=keras.optimizers.SGD(0.0))
        z = np.full((10, 8, 8, 1), 0.3, np.float32)
        model.buffer.images.assign(z)
        images, _ = testing.load_digits("train", 3)
        labels = np.array([7, 2, 2])
        expected = np.mean(testing.to_numpy(model.energy(z[:3], labels)))
        logs = model.train_on_batch(images, labels, return_dict=True)
        self.assertAllClose(logs["energy_samples"], expected, rtol=1e-5, atol=1e-6)
        self.assertNotAllClose(expected, np.mean(testing.to_numpy(model.energy(z[:3], [0] * 3))))

    def test_conditional_negatives_come_from_the_label_block(self):
        model = make_igebm(num_steps=0, buffer_size=10, reinit_probability=0.0,
                           class_blocks=True, buffer_type="persistent")
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


class OfficialCodeTest(testing.TestCase):
    """Details of the official code (openai/ebm_code_release) the presets and scores follow."""

    def test_ood_score_is_minus_min_class_energy(self):
        from trainers.evaluation import ood

        model = perturbed(make_igebm(backbone="sn"), seed=1)
        images, _ = testing.load_digits("test", 6)
        energies = np.stack([testing.to_numpy(model.energy(images, np.full(6, y)))
                             for y in range(10)], axis=1)
        expected = -energies.min(axis=1)
        self.assertAllClose(testing.to_numpy(model.ood_score(images)), expected, rtol=1e-5,
                            atol=1e-6)
        # -min_y E differs from -E(x) = logsumexp_y(-E): the evaluation uses the official one.
        self.assertNotAllClose(expected, -testing.to_numpy(model.energy(images)))
        score = ood.score_function(model, "energy")(model, images, batch_size=4)
        self.assertAllClose(score, expected, rtol=1e-5, atol=1e-6)
        # An unconditional IGEBM keeps the registered `energy` score, -E(x).
        plain = make_igebm(conditional=False)
        score = ood.score_function(plain, "energy")(plain, images, batch_size=4)
        self.assertAllClose(score, -testing.to_numpy(plain.energy(images)), rtol=1e-5)
        self.assertAllClose(testing.to_numpy(plain.ood_score(images)), score, rtol=1e-5)

    def test_dropout_stays_on_in_langevin_steps_when_configured(self):
        # The official ResNet32Large builds its dropout with training=True for every forward
        # pass of training, Langevin steps included.
        seen = []

        def spy(model):
            energy = model.energy

            def recorded(x, y=None, training=False):
                seen.append(training)
                return energy(x, y, training=training)

            model.energy = recorded
            return model

        images, labels = testing.load_digits("train", 4)
        large = IGEBM(SNResNet(filters=4, num_classes=10, dropout_rate=0.5), buffer_size=8,
                      sampler=sampling.SGLD(1, 40.0, 0.01, 0.005, (-1.0, 1.0)))
        self.assertTrue(large.sample_in_training_mode)
        self.assertTrue(large.get_config()["sample_in_training_mode"])
        spy(large).compile(optimizer=keras.optimizers.SGD(0.0))
        # Built first, as trainers/fit.py does: the step is then traced once, not twice.
        large.build((None, 8, 8, 1))
        large.optimizer.build(large.trainable_variables)
        large.train_on_batch(images, labels)
        self.assertTrue(seen and all(seen))  # sampler and loss: dropout on
        seen.clear()
        large.sample(y=[1, 2], num_steps=1)
        self.assertTrue(seen and all(seen))
        # Without dropout the sampler runs in inference mode; an explicit choice wins.
        self.assertFalse(IGEBM(SNResNet(filters=4)).sample_in_training_mode)
        self.assertFalse(IGEBM(SNResNet(filters=4, dropout_rate=0.5),
                               sample_in_training_mode=False).sample_in_training_mode)
        seen.clear()
        small = spy(IGEBM(SNResNet(filters=4, num_classes=10), buffer_size=8,
                          sampler=sampling.SGLD(1, 40.0, 0.01, 0.005, (-1.0, 1.0))))
        small.build((None, 8, 8, 1))
        small.sample(y=[1, 2], num_steps=1)
        self.assertTrue(seen and not any(seen))

    def test_presets_use_the_official_optimizer_sampler_and_length(self):
        from keras_jem.optimizers import ClippedAdam
        from trainers import factory
        from trainers import presets

        for dataset in ("digits", "cifar10"):
            config = presets.resolve("igebm", dataset)
            sampler = factory.build_sampler(config)
            self.assertEqual(
                (sampler.step_size, sampler.noise_scale, sampler.gradient_clip,
                 sampler.clip_range, sampler.noise_first),
                (40.0, 0.01, 0.005, (-1.0, 1.0), True))
            optimizer = factory.build_optimizer(config, steps_per_epoch=10)
            self.assertIsInstance(optimizer, ClippedAdam)
            self.assertEqual((optimizer.beta_1, optimizer.beta_2, optimizer.clip_std,
                              optimizer.clip_offset, optimizer.epsilon),
                             (0.0, 0.999, 3.0, 0.1, 1e-8))
            model = factory.build_model(config, num_classes=10)
            self.assertFalse(model.class_blocks)
            self.assertEqual(model.dequantization, 2.0 / 256.0)
        self.assertEqual(presets.resolve("igebm", "cifar10")["epochs"], 190)
        self.assertEqual(factory.build_sampler(presets.resolve("igebm", "cifar10")).num_steps,
                         60)
        # The large model's dropout is on in sampling through the preset's `None`.
        config = presets.resolve("igebm", "cifar10", {"conditional": False, "sn_filters": "8",
                                                      "dropout_rate": 0.5})
        self.assertTrue(factory.build_model(config, num_classes=10).sample_in_training_mode)
        # Other models keep Keras' Adam; a wrong name is a clear error.
        jem = factory.build_optimizer(presets.resolve("jem", "digits"), steps_per_epoch=10)
        self.assertNotIsInstance(jem, ClippedAdam)
        with self.assertRaisesRegex(ValueError, "clipped_adam"):
            factory.build_optimizer(presets.resolve("jem", "digits", {"optimizer": "adamw"}), 10)

    def test_print_config(self):
        # `trainers.fit.main` in this process (a `python -m trainers.fit` subprocess spent ~10 s
        # importing TensorFlow to print a dict); the shell's exit codes are checked in
        # tests/test_fit_cli.py.
        import contextlib
        import io

        from trainers import fit

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = fit.main(["--model", "igebm", "--dataset", "cifar10", "--print_config"])
        self.assertEqual(code, 0)
        out = out.getvalue()
        config = json.loads(out[out.index("{"):])
        self.assertEqual(
            {k: config[k] for k in ("optimizer", "step_size", "sampler_noise", "gradient_clip",
                                    "num_steps", "epochs", "learning_rate", "beta_1")},
            {"optimizer": "clipped_adam", "step_size": 40.0, "sampler_noise": 0.01,
             "gradient_clip": 0.005, "num_steps": 60, "epochs": 190, "learning_rate": 3e-4,
             "beta_1": 0.0})
