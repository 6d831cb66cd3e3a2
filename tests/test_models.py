"""Tests of the JEM-family models (JEM, JEMPP, SADAJEM) and the divergence callbacks."""

import json
import os

import keras
import numpy as np
import tensorflow as tf

import keras_jem
from keras_jem import callbacks as jem_callbacks
from keras_jem import sampling
from keras_jem.models.energy_model import Batch
from keras_jem.optimizers import SAM
from tests import testing
from tools import bench

MODEL_CLASSES = {"jem": keras_jem.JEM, "jempp": keras_jem.JEMPP, "sadajem": keras_jem.SADAJEM}


def _cross_entropy(model, images, labels):
    logits = model(images, training=False)
    return float(keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True)))


def _rows(images):
    return {row.tobytes() for row in np.asarray(images, np.float32)}


def _random_images(n, seed=0, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, (n, 8, 8, 1)).astype("float32")


class ValidationTest(testing.TestCase):
    def test_num_classes(self):
        for cls in MODEL_CLASSES.values():
            for num_classes in (1, 0, 2.5):
                with self.assertRaisesRegex(ValueError, "num_classes"):
                    cls(backbone=testing.small_cnn(), num_classes=num_classes)

    def test_negative_weights(self):
        for name in ("px_weight", "pyx_weight", "pxy_weight", "energy_l2_weight",
                     "weight_decay"):
            with self.assertRaisesRegex(ValueError, f"`{name}` must be non-negative"):
                keras_jem.JEM(backbone=testing.small_cnn(), num_classes=10, **{name: -0.1})
        with self.assertRaisesRegex(ValueError, "At least one"):
            keras_jem.JEM(backbone=testing.small_cnn(), num_classes=10, px_weight=0,
                          pyx_weight=0)
        with self.assertRaisesRegex(ValueError, "divergence_threshold"):
            keras_jem.JEM(backbone=testing.small_cnn(), num_classes=10, divergence_threshold=0)

    def test_conditional_sampling_needs_divisible_buffer(self):
        for kwargs in ({"conditional_sampling": True}, {"pxy_weight": 1.0}):
            for cls in MODEL_CLASSES.values():
                with self.assertRaisesRegex(ValueError, "buffer_size=105 is not divisible.*110"):
                    cls(backbone=testing.small_cnn(), num_classes=10, buffer_size=105, **kwargs)
        # Divisible is fine, and unconditional sampling does not care.
        keras_jem.JEM(backbone=testing.small_cnn(), num_classes=10, buffer_size=110,
                      conditional_sampling=True)
        keras_jem.JEM(backbone=testing.small_cnn(), num_classes=10, buffer_size=105)

    def test_invalid_sampler_and_inputs(self):
        with self.assertRaisesRegex(ValueError, "Sampler"):
            keras_jem.JEM(backbone=testing.small_cnn(), num_classes=10, sampler="sgld")
        model = keras_jem.JEM(backbone=testing.small_cnn(), num_classes=10, buffer_size=10)
        with self.assertRaisesRegex(ValueError, "height, width, channels"):
            model.build((None, 8, 8))
        with self.assertRaisesRegex(ValueError, "not built"):
            model.sample(num_samples=2)

    def test_gaussian_mixture_needs_adapt_buffer(self):
        images, labels = testing.load_digits(num_examples=64)
        for cls, kwargs in ((keras_jem.JEMPP, {}), (keras_jem.SADAJEM, {}),
                            (keras_jem.JEM, {"buffer_init": "gaussian_mixture"})):
            model = testing.make_model(cls, buffer_size=20, **kwargs)
            model.compile(optimizer="adam")
            weights = [w.copy() for w in model.get_weights()]
            with self.assertRaisesRegex(ValueError, r"adapt_buffer\(images, labels\)"):
                model.fit(images, labels, epochs=1, verbose=0)
            # Nothing ran.
            self.assertEqual(int(model.optimizer.iterations), 0)
            for after, before in zip(model.get_weights(), weights):
                self.assertAllEqual(after, before)

    def test_paper_defaults(self):
        # The papers' settings (ALGORITHMS.md sections 1-4), written out by hand; IGEBM's are
        # in test_igebm.
        expected = {
            keras_jem.JEM: (sampling.SGLD, {"num_steps": 20, "step_size": 1.0,
                                            "noise_scale": 0.01}, "uniform", False, None),
            keras_jem.JEMPP: (sampling.ProximalSGLD, {"num_steps": 10, "inner_steps": 5,
                                                      "step_size": 0.2, "gradient_clip": 1.0},
                              "gaussian_mixture", True, None),
            keras_jem.SADAJEM: (sampling.SGLD, {"num_steps": 5, "step_size": 1.0,
                                                "noise_scale": 0.0, "gradient_clip": 1.0},
                                "gaussian_mixture", True, (2.0, True)),
        }
        for cls, (sampler_class, sampler_settings, buffer_init, training_mode, sam) in (
                expected.items()):
            model = cls(backbone=testing.small_cnn(), num_classes=10)
            self.assertIs(type(model.sampler), sampler_class, cls.__name__)
            config = model.sampler.get_config()
            for key, value in sampler_settings.items():
                self.assertEqual(config[key], value, f"{cls.__name__} sampler {key}")
            if cls is not keras_jem.JEM:
                self.assertEqual(tuple(config["clip_range"]), (-1.0, 1.0), cls.__name__)
            self.assertEqual(model.buffer_init, buffer_init, cls.__name__)
            self.assertEqual(model.sample_in_training_mode, training_mode, cls.__name__)
            if sam is None:
                self.assertIsNone(model.sam, cls.__name__)
            else:
                self.assertEqual((model.sam.rho, model.sam.adaptive), sam)
        self.assertEqual(keras_jem.SADAJEM(testing.small_cnn(), 10).divergence_threshold, 1e5)
        # GMMC (ALGORITHMS.md 4): 20 latent-target steps of size 1, latent noise 0.001.
        gmmc = keras_jem.GMMC(testing.small_cnn(feature_dim=9), 10).sampler.get_config()
        self.assertEqual((gmmc["num_steps"], gmmc["step_size"], gmmc["latent_noise"]),
                         (20, 1.0, 0.001))

    def test_default_sampler_config_lists_only_differences(self):
        # A method states only where its sampler differs from the sampler class's defaults,
        # so that each default lives in one place.
        import inspect

        for cls in (keras_jem.JEM, keras_jem.JEMPP, keras_jem.SADAJEM, keras_jem.GMMC,
                    keras_jem.IGEBM):
            parameters = inspect.signature(cls.default_sampler_class).parameters
            for key, value in cls.default_sampler_config.items():
                self.assertIn(key, parameters, cls.__name__)
                self.assertNotEqual(value, parameters[key].default, f"{cls.__name__} {key}")

    def test_labels_required(self):
        model = testing.make_model(buffer_size=20)
        model.compile(optimizer="adam")
        with self.assertRaisesRegex(ValueError, "needs labels"):
            model.fit(_random_images(8), epochs=1, verbose=0)

    def test_sample_argument_errors(self):
        model = testing.make_model(buffer_size=20)
        with self.assertRaisesRegex(ValueError, r"\[0, 10\)"):
            model.sample(y=[0, 10])
        with self.assertRaisesRegex(ValueError, r"x_init.*\(n, 8, 8, 1\)"):
            model.sample(x_init=np.zeros((2, 4, 4, 1)))
        with self.assertRaisesRegex(ValueError, "not both"):
            model.sample(x_init=np.zeros((2, 8, 8, 1)), from_buffer=True)
        with self.assertRaisesRegex(ValueError, "num_samples"):
            model.sample()
        with self.assertRaisesRegex(ValueError, "holds 2 entries but num_samples=3"):
            model.sample(num_samples=3, y=[1, 2])


class TrainingTest(testing.TestCase):
    """A few `fit` steps of each model on digits (trained once for the whole class)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        cls.images, cls.labels = testing.load_digits(num_examples=256)
        cls.models, cls.histories, cls.ce_before, cls.buffers_before = {}, {}, {}, {}
        cls.traces = {}
        for name, model_cls in MODEL_CLASSES.items():
            adapt = None if model_cls is keras_jem.JEM else (cls.images, cls.labels)
            model = testing.make_model(model_cls, backbone=testing.small_cnn(norm="batch"),
                                       buffer_size=200, adapt=adapt, seed=3)
            model.compile(optimizer=keras.optimizers.Adam(1e-2))
            # Python calls of train_step happen only while tracing.
            counts = {"train_step": 0}
            bench._count_calls(model, "train_step", counts, "train_step")
            cls.ce_before[name] = _cross_entropy(model, cls.images, cls.labels)
            cls.buffers_before[name] = model.buffer.images.numpy().copy()
            # Python calls of the backbone while fit traces train_step: one per network pass.
            counts["backbone"] = 0
            bench._count_calls(model.backbone, "call_from_stem", counts, "backbone")
            cls.histories[name] = model.fit(cls.images, cls.labels, batch_size=64, epochs=4,
                                            verbose=0).history
            cls.models[name] = model
            # A copy: the wrappers stay, and the other tests' eager calls would count too.
            cls.traces[name] = dict(counts)

    @testing.parameterized.named_parameters(*[(name, name) for name in MODEL_CLASSES])
    def test_fit_decreases_cross_entropy(self, name):
        model, history = self.models[name], self.histories[name]
        ce_after = _cross_entropy(model, self.images, self.labels)
        self.assertLess(ce_after, self.ce_before[name] - 0.2, history)
        self.assertLess(history["loss_ce"][-1], history["loss_ce"][0])
        for key in ("loss", "loss_ce", "loss_px", "energy_data", "energy_samples", "accuracy"):
            self.assertIn(key, history)
            self.assertTrue(np.isfinite(history[key]).all(), (key, history[key]))
        self.assertEqual(history["diverged"], [0.0] * 4)
        self.assertEqual(int(model.optimizer.iterations), 16)

    @testing.parameterized.named_parameters(*[(name, name) for name in MODEL_CLASSES])
    def test_train_step_traced_once(self, name):
        # 16 steps over 4 epochs: one trace, no retracing (a retrace per step would cost
        # seconds each on a real backbone).
        self.assertEqual(self.traces[name]["train_step"], 1)
        # The traced step runs the backbone once per pass, with the sampler's steps inside one
        # tf.while_loop body: data and samples, plus the sampler's body (3); SADA-JEM's SAM
        # repeats the two loss passes at the perturbed weights (5). An unrolled sampler loop
        # would add one call per step.
        self.assertEqual(self.traces[name]["backbone"], {"jem": 3, "jempp": 3, "sadajem": 5}[name])

    @testing.parameterized.named_parameters(*[(name, name) for name in MODEL_CLASSES])
    def test_buffer_written_during_training(self, name):
        before = self.buffers_before[name]
        after = self.models[name].buffer.images.numpy()
        changed = np.abs(after - before).reshape(len(before), -1).max(-1) > 0
        # 16 steps x 64 draws from 200 chains: nearly every chain was continued.
        self.assertGreater(changed.mean(), 0.9)
        self.assertTrue(np.isfinite(after).all())
        if name != "jem":  # JEM++ and SADA-JEM clamp chains to the data range
            self.assertAllInRange(after, -1.0, 1.0)

    @testing.parameterized.named_parameters(*[(name, name) for name in MODEL_CLASSES])
    def test_energy(self, name):
        model = self.models[name]
        x, y = self.images[:9], self.labels[:9]
        logits = testing.to_numpy(model(x, training=False)).astype("float64")
        top = logits.max(-1)
        logsumexp = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
        self.assertAllClose(model.energy(x), -logsumexp, rtol=1e-5, atol=1e-5)
        self.assertAllClose(model.energy(x, y), -logits[np.arange(9), y], rtol=1e-6, atol=1e-6)

    def test_sample_shapes_and_ranges(self):
        for name, model in self.models.items():
            samples = testing.to_numpy(model.sample(num_samples=5, num_steps=2, seed=1))
            self.assertEqual(samples.shape, (5, 8, 8, 1))
            self.assertEqual(samples.dtype, np.float32)
            self.assertTrue(np.isfinite(samples).all())
            if name != "jem":
                self.assertAllInRange(samples, -1.0, 1.0)
        labelled = self.models["jempp"].sample(y=[0, 1, 2], num_steps=1, seed=1)
        self.assertEqual(tuple(labelled.shape), (3, 8, 8, 1))
        self.assertAllInRange(labelled, -1.0, 1.0)

    def test_sample_reproducible_with_seed(self):
        model = self.models["jem"]
        first = model.sample(num_samples=4, num_steps=2, seed=5)
        self.assertAllEqual(first, model.sample(num_samples=4, num_steps=2, seed=5))
        self.assertNotAllClose(first, model.sample(num_samples=4, num_steps=2, seed=6))

    def test_sample_from_x_init_and_labels_follows_the_sampler(self):
        model = self.models["jem"]
        start = _random_images(4, seed=2)
        labels = np.array([3, 1, 4, 1])
        seed = sampling.noise.fold_in(tf.constant([11, 17], tf.int64), 3)
        samples = model.sample(x_init=start, num_steps=3, seed=11)
        expected = model.sampler.run(lambda v: model.energy(v, training=False), start,
                                     seed=seed, num_steps=3)
        self.assertAllClose(samples, expected, atol=1e-5)
        conditional = model.sample(x_init=start, y=labels, num_steps=3, seed=11)
        expected = model.sampler.run(lambda v: model.energy(v, labels, training=False), start,
                                     seed=seed, num_steps=3)
        self.assertAllClose(conditional, expected, atol=1e-5)
        self.assertNotAllClose(conditional, samples)

    def test_sample_from_buffer_writes_back(self):
        model = self.models["jem"]
        before = model.buffer.images.numpy().copy()
        samples = testing.to_numpy(model.sample(num_samples=6, num_steps=2, from_buffer=True,
                                                seed=7))
        after = model.buffer.images.numpy()
        changed = np.flatnonzero(np.abs(after - before).reshape(200, -1).max(-1) > 0)
        self.assertLen(changed, 6)
        self.assertEqual(_rows(after[changed]), _rows(samples))
        # The chains were continued from the buffer, not from fresh noise: each sample is close
        # to the buffer entry it replaced (2 steps of size 1 with small input gradients). Fresh
        # U(-1, 1) noise would differ from it by 2/3 per pixel on average; measured 0.06 (a
        # bound on the largest pixel change, 0.5, failed at 0.58 when this test ran alone).
        self.assertLess(np.abs(after[changed] - before[changed]).mean(), 0.2)

    def test_class_conditional_sample_from_buffer(self):
        model = self.models["sadajem"]  # buffer of 200 chains: blocks of 20 per class
        before = model.buffer.images.numpy().copy()
        samples = testing.to_numpy(model.sample(y=[7, 7, 2], num_steps=1, from_buffer=True,
                                                seed=3))
        after = model.buffer.images.numpy()
        changed = np.flatnonzero(np.abs(after - before).reshape(200, -1).max(-1) > 0)
        self.assertTrue(all(140 <= i < 160 or 40 <= i < 60 for i in changed), changed)
        self.assertTrue(_rows(samples) <= _rows(after))

    def test_config_round_trip(self):
        for name, model in self.models.items():
            config = json.loads(json.dumps(model.get_config()))
            restored = model.__class__.from_config(config)
            self.assertEqual(json.loads(json.dumps(restored.get_config())), config)
            self.assertIsInstance(restored, model.__class__)
            self.assertEqual(restored.sampler.get_config(), model.sampler.get_config())
            self.assertEqual(type(restored.sampler), type(model.sampler))
            for attribute in ("num_classes", "buffer_size", "buffer_init", "px_weight",
                              "sample_in_training_mode", "divergence_threshold"):
                self.assertEqual(getattr(restored, attribute), getattr(model, attribute))
            if name == "sadajem":
                self.assertEqual(restored.sam.get_config(), model.sam.get_config())
            restored(self.images[:1])
            restored.set_weights(model.get_weights())
            self.assertAllClose(restored(self.images[:4]), model(self.images[:4]), atol=1e-6)

    def test_non_default_config_round_trip(self):
        model = keras_jem.JEM(
            backbone=testing.small_cnn(), num_classes=4, buffer_size=40,
            sampler=sampling.SGLD(num_steps=2, step_size=0.5, clip_range=(-1, 1)),
            reinit_probability=0.1, conditional_sampling=True, px_weight=0.5, pyx_weight=2.0,
            pxy_weight=0.3, energy_l2_weight=0.1, sample_in_training_mode=True,
            divergence_threshold=1e4, sam=SAM(rho=0.1), buffer_covariance="diagonal",
            weight_decay=1e-4, seed=9,
        )
        config = json.loads(json.dumps(model.get_config()))
        restored = keras_jem.JEM.from_config(config)
        self.assertEqual(json.loads(json.dumps(restored.get_config())), config)
        self.assertEqual(restored.sam.rho, 0.1)
        self.assertIsNone(keras_jem.SADAJEM.from_config(
            keras_jem.SADAJEM(backbone=testing.small_cnn(), num_classes=3, sam=None).get_config()
        ).sam)

    def test_save_and_load_in_fresh_process(self):
        directory = self.get_temp_dir()
        x = _random_images(6, seed=9)
        np.save(os.path.join(directory, "x.npy"), x)
        for name, model in self.models.items():
            model.save(os.path.join(directory, f"{name}.keras"))
        code = f"""
            import json, os
            import numpy as np
            import keras
            import keras_jem
            directory = {directory!r}
            x = np.load(os.path.join(directory, "x.npy"))
            info = {{}}
            for name in {sorted(self.models)!r}:
                model = keras.saving.load_model(os.path.join(directory, name + ".keras"))
                arrays = {{
                    "logits": model(x, training=False),
                    "energy": model.energy(x),
                    "class_energy": model.energy(x, np.arange(6) % 10),
                    "buffer": model.buffer.images.numpy(),
                }}
                if name != "jem":
                    arrays["class_means"] = model.buffer.class_means.numpy()
                    arrays["class_scales"] = model.buffer.class_scales.numpy()
                if name == "jempp":
                    arrays["samples"] = model.sample(num_samples=3, num_steps=1, seed=0)
                for key, value in arrays.items():
                    np.save(os.path.join(directory, name + "_" + key + ".npy"),
                            keras.ops.convert_to_numpy(value))
                info[name] = {{"class": type(model).__name__,
                              "sampler": type(model.sampler).__name__,
                              "adapted": model.buffer.is_adapted}}
            print(json.dumps(info))
        """
        info = json.loads(testing.run_in_subprocess(code).strip().splitlines()[-1])
        for name, model in self.models.items():
            self.assertEqual(info[name]["class"], type(model).__name__)
            self.assertEqual(info[name]["sampler"], type(model.sampler).__name__)
            self.assertTrue(info[name]["adapted"])

            def loaded(key, name=name):
                return np.load(os.path.join(directory, f"{name}_{key}.npy"))

            self.assertAllEqual(loaded("logits"), testing.to_numpy(model(x, training=False)))
            self.assertAllEqual(loaded("energy"), testing.to_numpy(model.energy(x)))
            self.assertAllEqual(loaded("class_energy"),
                                testing.to_numpy(model.energy(x, np.arange(6) % 10)))
            self.assertAllEqual(loaded("buffer"), model.buffer.images.numpy())
            if name != "jem":
                self.assertAllEqual(loaded("class_means"), model.buffer.class_means.numpy())
                self.assertAllEqual(loaded("class_scales"), model.buffer.class_scales.numpy())
        samples = np.load(os.path.join(directory, "jempp_samples.npy"))
        self.assertEqual(samples.shape, (3, 8, 8, 1))
        self.assertAllInRange(samples, -1.0, 1.0)


class SequentialPassesTest(testing.TestCase):
    """Per-pass back-propagation gives the one-tape gradient and loss terms."""

    @testing.parameterized.named_parameters(
        ("two_streams", False, {"energy_l2_weight": 0.1}),
        ("one_stream", True, {"energy_l2_weight": 0.1}),
        ("joint_term", False, {"pxy_weight": 0.5, "conditional_sampling": True}),
    )
    def test_same_gradient_as_one_tape(self, same_stream, kwargs):
        images, labels = testing.load_digits(num_examples=32)
        model = testing.make_model(buffer_size=100, seed=0, **kwargs)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        x_ce = tf.constant(images[:16])
        x_px = x_ce if same_stream else tf.constant(images[16:])
        y = tf.constant(labels[:16])
        samples = {"px": tf.constant(_random_images(16, seed=1))}
        if kwargs.get("pxy_weight"):
            samples["pxy"] = tf.constant(_random_images(16, seed=2))
        variables = model.trainable_variables
        results = {}
        for sequential in (True, False):
            model.sequential_passes = sequential
            results[sequential] = model.compute_gradients(
                Batch(x_ce, x_px, y, None), samples, variables)
        (g_seq, t_seq, l_seq), (g_one, t_one, l_one) = results[True], results[False]
        self.assertEqual(sorted(t_seq), sorted(t_one))
        for key in t_one:
            self.assertAllClose(t_seq[key], t_one[key], rtol=1e-5, atol=1e-6, msg=key)
        self.assertAllClose(l_seq, l_one)
        self.assertEqual(len(g_seq), len(g_one))
        for a, b in zip(g_seq, g_one):
            self.assertAllClose(a, b, rtol=1e-4, atol=1e-6)
        self.assertGreater(max(float(tf.reduce_max(tf.abs(g))) for g in g_one), 0.0)

    def test_config_round_trip(self):
        model = testing.make_model(sequential_passes=False)
        self.assertFalse(keras_jem.JEM.from_config(model.get_config()).sequential_passes)


class DivergenceTest(testing.TestCase):
    def test_tiny_threshold_reports_divergence_and_guard_stops_fit(self):
        images, labels = testing.load_digits(num_examples=128)
        model = testing.make_model(buffer_size=64, divergence_threshold=1e-3)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        guard = jem_callbacks.DivergenceGuard()
        history = model.fit(images, labels, batch_size=32, epochs=3, callbacks=[guard],
                            verbose=0).history
        self.assertTrue(guard.diverged)
        epoch, batch, logs = guard.diverged_at
        self.assertEqual((epoch, batch), (0, 0))
        self.assertEqual(logs["diverged"], 1.0)
        self.assertEqual(int(model.optimizer.iterations), 1)
        self.assertLen(history["loss"], 1)
