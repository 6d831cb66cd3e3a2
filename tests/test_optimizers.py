"""Tests of keras_jem.optimizers: SAM/ASAM, SharpnessAwareModel, the JEM SAM step, schedules."""

import json

import keras
import numpy as np
import tensorflow as tf

import keras_jem
from keras_jem.optimizers import SAM
from keras_jem.optimizers import SharpnessAwareModel
from keras_jem.optimizers import WarmupPiecewiseConstant
from keras_jem.optimizers import sam as sam_lib
from tests import testing

LEARNING_RATE = 0.1


def _perturbation(weights, gradients, rho, adaptive):
    """e(w) of SAM (rho g / ||g||) or ASAM (rho w^2 g / || |w| g ||), norms over all weights."""
    weights = [np.asarray(w, np.float64) for w in weights]
    gradients = [np.asarray(g, np.float64) for g in gradients]
    if adaptive:
        norm = np.sqrt(sum(np.sum((np.abs(w) * g) ** 2) for w, g in zip(weights, gradients)))
        return [rho * w**2 * g / (norm + 1e-12) for w, g in zip(weights, gradients)]
    norm = np.sqrt(sum(np.sum(g**2) for g in gradients))
    return [rho * g / (norm + 1e-12) for g in gradients]


def _gradients(loss_fn, weights):
    """Value and gradients of `loss_fn(list of tensors)` at `weights` (numpy arrays)."""
    tensors = [tf.constant(w, tf.float64) for w in weights]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        loss = loss_fn(tensors)
    return float(loss), [g.numpy() for g in tape.gradient(loss, tensors)]


def _sam_update(loss_fn, weights, rho, adaptive, learning_rate=LEARNING_RATE):
    """The two-pass SAM step with plain SGD, by hand; also returns the plain SGD step."""
    _, gradients = _gradients(loss_fn, weights)
    perturbed = [w + e for w, e in zip(weights, _perturbation(weights, gradients, rho, adaptive))]
    _, sharp_gradients = _gradients(loss_fn, perturbed)
    sam_step = [w - learning_rate * g for w, g in zip(weights, sharp_gradients)]
    sgd_step = [w - learning_rate * g for w, g in zip(weights, gradients)]
    return sam_step, sgd_step


def _cross_entropy(logits, labels):
    log_probabilities = tf.nn.log_softmax(logits)
    return -tf.reduce_mean(tf.gather(log_probabilities, labels, axis=1, batch_dims=1))


def _jem_logits(weights, x):
    kernel, bias, head_kernel, head_bias = weights
    features = tf.tanh(tf.reshape(x, (x.shape[0], -1)) @ kernel + bias)
    return features @ head_kernel + head_bias


def _energy(logits):
    return -tf.reduce_logsumexp(logits, axis=-1)


def _max_difference(first, second):
    return max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(first, second))


class SAMTest(testing.TestCase):
    def _variables(self):
        rng = np.random.default_rng(0)
        return [tf.Variable(rng.normal(size=(3, 2)).astype("float32")),
                tf.Variable(rng.normal(size=(2,)).astype("float32")),
                tf.Variable(rng.normal(size=(4,)).astype("float32"))]

    @testing.parameterized.named_parameters(("sam", False, 0.05), ("asam", True, 2.0))
    def test_perturbations_match_formula(self, adaptive, rho):
        variables = self._variables()
        rng = np.random.default_rng(1)
        gradients = [rng.normal(size=v.shape).astype("float32") for v in variables]
        sam = SAM(rho=rho, adaptive=adaptive)
        perturbations = sam.perturbations(variables, gradients)
        expected = _perturbation([v.numpy() for v in variables], gradients, rho, adaptive)
        for actual, wanted in zip(perturbations, expected):
            self.assertAllClose(actual, wanted, rtol=1e-5, atol=1e-7)
        if not adaptive:
            self.assertAllClose(tf.linalg.global_norm(perturbations), rho, rtol=1e-5)

    def test_missing_gradients_do_not_move_their_variable(self):
        variables = self._variables()
        rng = np.random.default_rng(1)
        gradients = [rng.normal(size=(3, 2)).astype("float32"), None,
                     rng.normal(size=(4,)).astype("float32")]
        perturbations = SAM(rho=0.5).perturbations(variables, gradients)
        self.assertAllEqual(perturbations[1], np.zeros(2))
        expected = _perturbation([v.numpy() for v in variables],
                                 [gradients[0], np.zeros(2), gradients[2]], 0.5, False)
        self.assertAllClose(perturbations[0], expected[0], rtol=1e-5)

    def test_perturb_and_restore_exactly(self):
        variables = self._variables()
        before = [v.numpy().copy() for v in variables]
        gradients = [np.ones(v.shape, "float32") for v in variables]
        sam = SAM(rho=0.7, adaptive=True)
        backup = sam.perturb(variables, gradients)
        expected = _perturbation(before, gradients, 0.7, True)
        for variable, value, delta in zip(variables, before, expected):
            self.assertAllClose(variable, value + delta, rtol=1e-6)
            self.assertNotAllClose(variable, value)
        sam.restore(variables, backup)
        for variable, value in zip(variables, before):
            self.assertAllEqual(variable, value)

    def test_arguments_and_config(self):
        for kwargs in ({"rho": 0.0}, {"rho": -1.0}, {"epsilon": 0.0}):
            with self.assertRaisesRegex(ValueError, "Received"):
                SAM(**kwargs)
        sam = SAM(rho=2.0, adaptive=True, epsilon=1e-10)
        config = json.loads(json.dumps(sam.get_config()))
        self.assertEqual(SAM.from_config(config).get_config(), sam.get_config())
        serialized = json.loads(json.dumps(keras.saving.serialize_keras_object(sam)))
        self.assertEqual(sam_lib.deserialize(serialized).get_config(), sam.get_config())
        self.assertEqual(sam_lib.deserialize(config).get_config(), sam.get_config())
        self.assertIsNone(sam_lib.deserialize(None))


class SharpnessAwareModelTest(testing.TestCase):
    def _model(self, sam, learning_rate=LEARNING_RATE):
        inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
        model = SharpnessAwareModel(inner, sam=sam)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        rng = np.random.default_rng(2)
        x = rng.normal(size=(8, 3)).astype("float32")
        y = rng.integers(0, 4, 8)
        return model, inner, x, y

    @testing.parameterized.named_parameters(("sam", False, 0.3), ("asam", True, 1.5))
    def test_one_step_matches_two_pass_formula(self, adaptive, rho):
        model, inner, x, y = self._model(SAM(rho=rho, adaptive=adaptive))
        weights = [w.copy() for w in inner.get_weights()]

        def loss_fn(tensors):
            kernel, bias = tensors
            return _cross_entropy(tf.constant(x, tf.float64) @ kernel + bias, y)

        expected, sgd_step = _sam_update(loss_fn, weights, rho, adaptive)
        model.train_on_batch(x, y)
        for actual, wanted in zip(inner.get_weights(), expected):
            self.assertAllClose(actual, wanted, rtol=1e-5, atol=1e-6)
        # The test can tell SAM from SGD.
        self.assertGreater(_max_difference(expected, sgd_step), 1e-3)

    def test_weights_restored_exactly_before_update(self):
        model, inner, x, y = self._model(SAM(rho=1.0, adaptive=True), learning_rate=0.0)
        weights = [w.copy() for w in inner.get_weights()]
        model.train_on_batch(x, y)
        for actual, wanted in zip(inner.get_weights(), weights):
            self.assertAllEqual(actual, wanted)

    def test_batchnorm_statistics_only_from_first_pass(self):
        def build(sam):
            keras.utils.set_random_seed(0)
            inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5),
                                      keras.layers.BatchNormalization(momentum=0.5),
                                      keras.layers.Dense(4)])
            model = (SharpnessAwareModel(inner, sam=sam) if sam else
                     keras.Sequential([inner]))
            model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            return model, inner

        rng = np.random.default_rng(3)
        x = rng.normal(size=(16, 3)).astype("float32")
        y = rng.integers(0, 4, 16)
        sharp, sharp_inner = build(SAM(rho=1.0))
        plain, plain_inner = build(None)
        plain_inner.set_weights(sharp_inner.get_weights())
        before = sharp_inner.layers[1].moving_mean.numpy().copy()
        sharp.train_on_batch(x, y)
        plain.train_on_batch(x, y)
        bn_sharp, bn_plain = sharp_inner.layers[1], plain_inner.layers[1]
        self.assertNotAllClose(bn_sharp.moving_mean, before)
        self.assertAllClose(bn_sharp.moving_mean, bn_plain.moving_mean, rtol=1e-6, atol=1e-7)
        self.assertAllClose(bn_sharp.moving_variance, bn_plain.moving_variance, rtol=1e-6,
                            atol=1e-7)
        self.assertNotAllClose(sharp_inner.layers[0].kernel, plain_inner.layers[0].kernel)

    def test_fit_and_config(self):
        model, _, x, y = self._model(SAM(rho=0.05))
        history = model.fit(x, y, epochs=3, batch_size=4, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"]).all())
        config = json.loads(json.dumps(model.get_config()))
        restored = SharpnessAwareModel.from_config(config)
        self.assertEqual(restored.sam.get_config(), model.sam.get_config())
        self.assertEqual(json.loads(json.dumps(restored.get_config())), config)


class JEMSharpnessAwareStepTest(testing.TestCase):
    """One `JEM(sam=...)` step equals the two-pass formula on a hand-differentiable model."""

    def _model(self, sam, buffer_size, **kwargs):
        keras.utils.set_random_seed(5)
        model = keras_jem.JEM(
            backbone=testing.DenseBackbone(feature_dim=4), num_classes=3, sam=sam,
            buffer_size=buffer_size, seed=3, **kwargs,
        )
        model(np.zeros((1, 2, 2, 1), "float32"))
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE))
        variables = [model.backbone.kernel, model.backbone.bias, model.head.kernel,
                     model.head.bias]
        self.assertEqual({id(v) for v in variables},
                         {id(v) for v in model.trainable_variables})
        return model, variables

    def _data(self):
        rng = np.random.default_rng(4)
        return rng.uniform(-1, 1, (6, 2, 2, 1)).astype("float32"), rng.integers(0, 3, 6)

    @testing.parameterized.named_parameters(("sam", False, 0.3), ("asam", True, 1.0))
    def test_cross_entropy_only(self, adaptive, rho):
        model, variables = self._model(SAM(rho=rho, adaptive=adaptive), buffer_size=6,
                                       px_weight=0.0)
        x, y = self._data()
        weights = [v.numpy().copy() for v in variables]

        def loss_fn(tensors):
            return _cross_entropy(_jem_logits(tensors, tf.constant(x, tf.float64)), y)

        expected, sgd_step = _sam_update(loss_fn, weights, rho, adaptive)
        logs = model.train_on_batch(x, y, return_dict=True)
        for variable, wanted in zip(variables, expected):
            self.assertAllClose(variable, wanted, rtol=1e-5, atol=1e-6)
        self.assertGreater(_max_difference(expected, sgd_step), 1e-3)
        self.assertAllClose(logs["loss_ce"], loss_fn([tf.constant(w, tf.float64)
                                                      for w in weights]), rtol=1e-5)

    @testing.parameterized.named_parameters(("sam", False, 0.3), ("asam", True, 1.0))
    def test_with_likelihood_term(self, adaptive, rho):
        # buffer_size == batch size: every chain is drawn, so after the step the buffer holds
        # exactly the (seeded, noisy) samples both passes used.
        model, variables = self._model(
            SAM(rho=rho, adaptive=adaptive), buffer_size=6, px_weight=1.0, energy_l2_weight=0.1,
            sampler=keras_jem.sampling.SGLD(num_steps=3, step_size=1.0, noise_scale=0.05),
        )
        x, y = self._data()
        weights = [v.numpy().copy() for v in variables]
        buffer_before = model.buffer.images.numpy().copy()
        model.train_on_batch(x, y)
        samples = model.buffer.images.numpy()
        self.assertGreater(np.abs(samples - buffer_before).max(), 1e-3)

        def loss_fn(tensors):
            logits = _jem_logits(tensors, tf.constant(x, tf.float64))
            energy_data = _energy(logits)
            energy_samples = _energy(_jem_logits(tensors, tf.constant(samples, tf.float64)))
            return (_cross_entropy(logits, y)
                    + tf.reduce_mean(energy_data) - tf.reduce_mean(energy_samples)
                    + 0.1 * (tf.reduce_mean(energy_data**2) + tf.reduce_mean(energy_samples**2)))

        expected, sgd_step = _sam_update(loss_fn, weights, rho, adaptive)
        for variable, wanted in zip(variables, expected):
            self.assertAllClose(variable, wanted, rtol=1e-5, atol=1e-6)
        self.assertGreater(_max_difference(expected, sgd_step), 1e-3)

    def test_weights_restored_exactly_before_update(self):
        model, variables = self._model(SAM(rho=2.0, adaptive=True), buffer_size=6,
                                       sampler=testing.tiny_sgld())
        model.optimizer.learning_rate.assign(0.0)
        weights = [v.numpy().copy() for v in variables]
        model.train_on_batch(*self._data())
        for variable, wanted in zip(variables, weights):
            self.assertAllEqual(variable, wanted)

    def test_coupled_weight_decay(self):
        model, variables = self._model(None, buffer_size=6, px_weight=0.0, weight_decay=0.01)
        x, y = self._data()
        weights = [v.numpy().copy() for v in variables]
        _, gradients = _gradients(
            lambda t: _cross_entropy(_jem_logits(t, tf.constant(x, tf.float64)), y), weights)
        model.train_on_batch(x, y)
        for variable, w, g in zip(variables, weights, gradients):
            self.assertAllClose(variable, w - LEARNING_RATE * (g + 0.01 * w), rtol=1e-5,
                                atol=1e-6)


class SADAJEMBatchNormTest(testing.TestCase):
    def test_second_pass_leaves_batchnorm_statistics_untouched(self):
        images, labels = testing.load_digits(num_examples=200)
        x, y = images[:32], labels[:32]

        def build(sam, run_eagerly):
            model = testing.make_model(
                keras_jem.SADAJEM, backbone=testing.small_cnn(norm="batch"), buffer_size=50,
                sam=sam, adapt=(images, labels), seed=7,
            )
            model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), run_eagerly=run_eagerly)
            return model

        def moving_statistics(model):
            return {v.path.split("/", 2)[2]: v for v in model.backbone.non_trainable_variables
                    if "moving" in v.path}

        # The ASAM step runs compiled (the real path); the reference step without SAM runs
        # eagerly (cheaper to trace, same arithmetic).
        sharp = build(SAM(rho=2.0, adaptive=True), run_eagerly=False)
        plain = build(None, run_eagerly=True)
        plain.set_weights(sharp.get_weights())
        moments, plain_moments = moving_statistics(sharp), moving_statistics(plain)
        self.assertLen(moments, 2 * 5)  # 5 BatchNorm layers in a 2-stage SmallCNN
        self.assertEqual(sorted(moments), sorted(plain_moments))
        before = {name: v.numpy().copy() for name, v in moments.items()}
        sharp.train_on_batch(x, y)
        plain.train_on_batch(x, y)
        # The sampler (BatchNorm in training mode) and the first pass update the statistics
        # identically in both models; ASAM's second pass must add nothing (with momentum 0.1,
        # a second update would nearly replace them).
        for name, variable in moments.items():
            self.assertNotAllClose(variable, before[name])
            self.assertAllClose(variable, plain_moments[name], rtol=1e-5, atol=1e-6, msg=name)
        # Same samples in both models; different weight updates (SAM did take effect).
        self.assertAllClose(sharp.buffer.images, plain.buffer.images, atol=1e-6)
        self.assertNotAllClose(sharp.head.kernel, plain.head.kernel)


class WarmupPiecewiseConstantTest(testing.TestCase):
    def test_values(self):
        schedule = WarmupPiecewiseConstant(0.1, warmup_steps=10, boundaries=[20, 30], factor=0.2)
        expected = {0: 0.01, 4: 0.05, 8: 0.09, 9: 0.1, 15: 0.1, 19: 0.1, 20: 0.02, 29: 0.02,
                    30: 0.004, 10_000: 0.004}
        for step, value in expected.items():
            self.assertAllClose(schedule(step), value, rtol=1e-6, msg=f"step {step}")

    def test_no_warmup_and_boundary_inside_warmup(self):
        constant = WarmupPiecewiseConstant(0.5)
        self.assertAllClose(constant(0), 0.5)
        self.assertAllClose(constant(10**6), 0.5)
        overlapping = WarmupPiecewiseConstant(1.0, warmup_steps=100, boundaries=[50], factor=0.1)
        self.assertAllClose(overlapping(49), 0.5)
        self.assertAllClose(overlapping(50), 0.1 * 51 / 100)
        self.assertAllClose(overlapping(200), 0.1)

    def test_with_optimizer_and_config(self):
        schedule = WarmupPiecewiseConstant(0.1, warmup_steps=4, boundaries=[6], factor=0.5)
        optimizer = keras.optimizers.SGD(schedule)
        variable = keras.Variable(np.zeros(1, "float32"))
        rates = []
        for _ in range(8):
            rates.append(float(optimizer.learning_rate))
            optimizer.apply([tf.ones(1)], [variable])
        self.assertAllClose(rates, [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.05, 0.05])
        self.assertAllClose(variable, [-sum(rates)], rtol=1e-6)
        config = json.loads(json.dumps(keras.saving.serialize_keras_object(schedule)))
        restored = keras.saving.deserialize_keras_object(config)
        self.assertIsInstance(restored, WarmupPiecewiseConstant)
        self.assertEqual(restored.get_config(), schedule.get_config())

    def test_invalid_arguments(self):
        for kwargs in ({"learning_rate": 0.0}, {"learning_rate": 0.1, "warmup_steps": -1},
                       {"learning_rate": 0.1, "boundaries": [5, 2]}):
            with self.assertRaisesRegex(ValueError, "Received"):
                WarmupPiecewiseConstant(**kwargs)
