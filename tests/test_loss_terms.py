"""Every training loss against a formula written out in the test, term by term.

Each test builds a model on `testing.LinearBackbone` (logits, features and energies linear in x,
so every sampler step is known in closed form), sets the weights and the replay buffer by hand,
trains ONE step with plain SGD through the public API (`train_on_batch` / `fit`) and checks:

- the samples: the recorded starts come from the hand-set buffer (from the right class block),
  and the sampler's output equals the step computed here in numpy;
- the logged loss terms equal the formula evaluated on those hand-computed samples;
- the weight change equals `-learning_rate * gradient`, the gradient taken with a plain
  `tf.GradientTape` over the explicit formula (SAM: both passes written out).

The inputs make the bugs that matter visible: each test also evaluates the formula with one bug
planted (a term's sign flipped, a weight dropped, the likelihood stream swapped with the
cross-entropy stream...) and asserts that this moves the expected update by more than 100x the
tolerance, so such a bug in the model cannot pass.
"""

import keras
import numpy as np
import tensorflow as tf

import keras_jem
from keras_jem import sampling
from keras_jem.optimizers import SAM
from tests import testing

SHAPE = (2, 2, 1)
DIM = 4
FEATURES = 3
LEARNING_RATE = 0.5
TOLERANCE = 2e-5


def _images(rng, n, low=-0.9, high=0.9):
    return rng.uniform(low, high, (n,) + SHAPE).astype(np.float32)


def _flat(x):
    return tf.reshape(tf.constant(x, tf.float32), (len(x), DIM))


def _compile(model):
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), run_eagerly=True)
    return model


def _prepare(model, weights, buffer):
    """Sets the model's weights (a dict by shape) and replay buffer, and compiles it (SGD)."""
    testing.assign_by_shape(model.trainable_variables, weights)
    testing.set_buffer_images(model, buffer)
    return _compile(model)


def _train_once(model, x_ce, x_px, y=None, sample_weight=None):
    """One `train_on_batch` on the two streams; returns its logs and the sampler's one call."""
    logs = model.train_on_batch({"images": x_ce, "px_images": x_px}, y,
                                sample_weight=sample_weight, return_dict=True)
    (call,) = model.sampler.calls
    return logs, call


def _gradient(formula, weights):
    """Values and gradients of `formula(weights) -> (loss, terms)` at `weights` (a dict)."""
    variables = {k: tf.Variable(v, dtype=tf.float32) for k, v in weights.items()}
    with tf.GradientTape() as tape:
        loss, terms = formula(variables)
    keys = list(variables)
    grads = tape.gradient(loss, [variables[k] for k in keys])
    grads = {k: np.zeros_like(weights[k]) if g is None else tf.convert_to_tensor(g).numpy()
             for k, g in zip(keys, grads)}
    return float(loss), {k: float(v) for k, v in terms.items()}, grads


def _update(gradients, weights, weight_decay=0.0):
    return {k: -LEARNING_RATE * (gradients[k] + weight_decay * weights[k]) for k in gradients}


def _formula_update(formula, weights):
    """The plain SGD update of the gradient of `formula` at `weights` (for planted bugs)."""
    return _update(_gradient(formula, weights)[2], weights)


def _max_difference(a, b):
    return max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a)


class KnownAnswerCase(testing.TestCase):
    def assertUpdate(self, model, before, expected_update):
        after = testing.values_by_shape(model.trainable_variables)
        actual = {k: after[k] - before[k] for k in before}
        self.assertEqual(set(actual), set(expected_update))
        for key, value in actual.items():
            self.assertAllClose(value, expected_update[key], atol=TOLERANCE, rtol=0,
                                msg=f"weight update of the variable of shape {key}")

    def assertStep(self, model, logs, formula, weights):
        """The step logged `formula`'s terms and moved the weights by its SGD update.

        Returns:
            The expected update (the weights were `weights` before the step).
        """
        _, terms, grads = _gradient(formula, weights)
        self.assertLogs(logs, terms)
        expected = _update(grads, weights)
        self.assertUpdate(model, {k: np.float32(v) for k, v in weights.items()}, expected)
        return expected

    def assertSensitive(self, expected_update, buggy_updates):
        """Each planted bug moves the expected update by far more than the tolerance."""
        for name, update in buggy_updates.items():
            self.assertGreater(_max_difference(expected_update, update), 100 * TOLERANCE, name)

    def assertLogs(self, logs, expected):
        for name, value in expected.items():
            self.assertAllClose(float(logs[name]), value, atol=TOLERANCE, rtol=1e-5, msg=name)


# === JEM family: logits = (x K + c) W + b ===


def _jem_weights(rng, num_classes):
    return {
        (DIM, FEATURES): rng.normal(0, 0.8, (DIM, FEATURES)),
        (FEATURES,): rng.normal(0, 0.3, (FEATURES,)),
        (FEATURES, num_classes): rng.normal(0, 0.8, (FEATURES, num_classes)),
        (num_classes,): rng.normal(0, 0.3, (num_classes,)),
    }


def _jem_logits(w, x, num_classes):
    return (_flat(x) @ w[(DIM, FEATURES)] + w[(FEATURES,)]) @ w[(FEATURES, num_classes)] + w[
        (num_classes,)]


def _np_logits(w, x, num_classes):
    x = np.asarray(x, np.float64).reshape(len(x), DIM)
    return (x @ w[(DIM, FEATURES)] + w[(FEATURES,)]) @ w[(FEATURES, num_classes)] + w[
        (num_classes,)]


def _np_softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_energy_gradient(w, x, num_classes, y=None):
    """d E / dx per example: E(x) = -logsumexp f(x), E(x, y) = -f(x)[y]; f = x KW + const."""
    kw = w[(DIM, FEATURES)] @ w[(FEATURES, num_classes)]  # (DIM, C)
    if y is None:
        weights = _np_softmax(_np_logits(w, x, num_classes))
    else:
        weights = np.eye(num_classes)[np.asarray(y)]
    return -(weights @ kw.T).reshape(np.shape(x))


def _jem_formula(x_ce, x_px, y, samples, samples_y, px_weight, pyx_weight, pxy_weight,
                 l2=0.0, sample_weight=None, num_classes=2, pxy_sign=1.0,
                 px_samples_weight=None):
    """The JEM loss written out; `pxy_sign` / `px_samples_weight` plant bugs."""
    px_samples_weight = px_weight if px_samples_weight is None else px_samples_weight

    def energy(w, x):
        return -tf.reduce_logsumexp(_jem_logits(w, x, num_classes), axis=-1)

    def formula(w):
        logits = _jem_logits(w, x_ce, num_classes)
        log_probs = tf.nn.log_softmax(logits)
        ce = -tf.gather(log_probs, y, axis=1, batch_dims=1)
        if sample_weight is not None:
            ce = ce * sample_weight
        loss_ce = tf.reduce_mean(ce)
        e_data, e_samples = energy(w, x_px), energy(w, samples)
        terms = {"loss_ce": loss_ce,
                 "loss_px": tf.reduce_mean(e_data) - tf.reduce_mean(e_samples),
                 "energy_data": tf.reduce_mean(e_data),
                 "energy_samples": tf.reduce_mean(e_samples)}
        loss = pyx_weight * loss_ce
        loss += px_weight * tf.reduce_mean(e_data) - px_samples_weight * tf.reduce_mean(e_samples)
        loss += l2 * (tf.reduce_mean(e_data ** 2) + tf.reduce_mean(e_samples ** 2))
        if pxy_weight:
            e_joint = -tf.gather(logits, y, axis=1, batch_dims=1)
            e_joint_samples = -tf.gather(_jem_logits(w, samples_y, num_classes), y, axis=1,
                                         batch_dims=1)
            terms["loss_pxy"] = tf.reduce_mean(e_joint) - tf.reduce_mean(e_joint_samples)
            loss += pxy_sign * pxy_weight * terms["loss_pxy"]
            loss += l2 * (tf.reduce_mean(e_joint ** 2) + tf.reduce_mean(e_joint_samples ** 2))
        terms["loss"] = loss
        return loss, terms

    return formula


def _jem_model(cls, num_classes, sampler, buffer_size, **kwargs):
    kwargs.setdefault("buffer_init", "uniform")
    model = cls(backbone=testing.LinearBackbone(FEATURES), num_classes=num_classes,
                sampler=testing.RecordingSampler(sampler), buffer_size=buffer_size,
                reinit_probability=0.0, seed=3, **kwargs)
    model.build((None,) + SHAPE)
    return model


def _block_images(rng, buffer_size):
    """Distinct buffer rows: row i is recognisable (its images differ from all others)."""
    return _images(rng, buffer_size)


def _rows_of(images):
    return [row.tobytes() for row in np.asarray(images, np.float32)]


class JEMLossTest(KnownAnswerCase):
    NUM_CLASSES = 2
    STEP = 0.4  # SGLD step size (one step, no noise)

    def _setup(self, **kwargs):
        rng = np.random.default_rng(11)
        buffer_size = 8
        model = _jem_model(keras_jem.JEM, self.NUM_CLASSES,
                           sampling.SGLD(num_steps=1, step_size=self.STEP, noise_scale=0.0),
                           buffer_size, **kwargs)
        weights = _jem_weights(rng, self.NUM_CLASSES)
        buffer = _block_images(rng, buffer_size)
        return _prepare(model, weights, buffer), weights, buffer, rng

    def _sgld(self, weights, start, y=None):
        return start - self.STEP * _np_energy_gradient(weights, start, self.NUM_CLASSES, y)

    def _check_calls_come_from_buffer(self, calls, buffer, blocks=False):
        # A later call may continue a chain that an earlier call of the same step wrote back.
        rows = {row: index for index, row in enumerate(_rows_of(buffer))}
        for call in calls:
            for i, row in enumerate(_rows_of(call["start"])):
                self.assertIn(row, rows, "a chain did not start from the replay buffer")
                if blocks and call["y"] is not None:
                    block = len(buffer) // self.NUM_CLASSES
                    self.assertEqual(rows[row] // block, int(call["y"][i]),
                                     "a class-conditional chain left its class block")
            for row, start in zip(_rows_of(call["samples"]), _rows_of(call["start"])):
                rows[row] = rows[start]
            # The sampler did move the chains (else the samples term would be trivial).
            self.assertGreater(float(np.abs(call["samples"] - call["start"]).max()), 0.05)

    def test_two_streams_three_weighted_terms_and_sample_weight(self):
        px_weight, pyx_weight, pxy_weight = 0.3, 1.7, 2.0
        model, weights, buffer, rng = self._setup(
            px_weight=px_weight, pyx_weight=pyx_weight, pxy_weight=pxy_weight)
        x_ce, x_px = _images(rng, 4), _images(rng, 3) * 0.5 + 0.3
        y = np.array([0, 1, 1, 0])
        sample_weight = np.array([0.5, 2.0, 1.0, 0.25], np.float32)
        logs = model.train_on_batch({"images": x_ce, "px_images": x_px}, y,
                                    sample_weight=sample_weight, return_dict=True)

        calls = model.sampler.calls
        self.assertLen(calls, 2)
        px_call = next(c for c in calls if len(c["start"]) == len(x_px))
        pxy_call = next(c for c in calls if len(c["start"]) == len(y))
        self.assertIsNone(px_call["y"], "JEM's p(x) chains are unconditional by default")
        self.assertAllEqual(pxy_call["y"], y, "p(x, y) chains must use the batch's labels")
        self._check_calls_come_from_buffer(calls, buffer, blocks=True)
        samples = self._sgld(weights, px_call["start"])
        samples_y = self._sgld(weights, pxy_call["start"], y)
        self.assertAllClose(px_call["samples"], samples, atol=1e-5)
        self.assertAllClose(pxy_call["samples"], samples_y, atol=1e-5)

        def formula(**bug):
            return _jem_formula(x_ce, x_px, y, samples, samples_y, px_weight, pyx_weight,
                                pxy_weight, sample_weight=sample_weight, **bug)

        expected = self.assertStep(model, logs, formula(), weights)
        buggy = {
            "p(x, y) sign flipped": _formula_update(formula(pxy_sign=-1.0), weights),
            "px_weight ignored on samples": _formula_update(formula(px_samples_weight=1.0),
                                                            weights),
            "likelihood on the CE images": _formula_update(_jem_formula(
                x_ce, x_ce, y, samples, samples_y, px_weight, pyx_weight, pxy_weight,
                sample_weight=sample_weight), weights),
            "sample_weight ignored": _formula_update(_jem_formula(
                x_ce, x_px, y, samples, samples_y, px_weight, pyx_weight, pxy_weight), weights),
        }
        self.assertSensitive(expected, buggy)

    def test_one_stream_conditional_sampling_and_energy_l2(self):
        px_weight, pyx_weight, l2 = 0.3, 1.7, 0.1
        model, weights, buffer, rng = self._setup(
            px_weight=px_weight, pyx_weight=pyx_weight, energy_l2_weight=l2,
            conditional_sampling=True, sequential_passes=False)
        x = _images(rng, 4)
        y = np.array([1, 0, 1, 1])
        logs = model.train_on_batch(x, y, return_dict=True)

        (call,) = model.sampler.calls
        self.assertIsNotNone(call["y"], "conditional_sampling must draw labelled chains")
        self._check_calls_come_from_buffer([call], buffer, blocks=True)
        # The chains follow the class energy E(x, y) of their drawn labels.
        samples = self._sgld(weights, call["start"], call["y"])
        self.assertAllClose(call["samples"], samples, atol=1e-5)

        def formula(**bug):
            return _jem_formula(x, x, y, samples, None, px_weight, pyx_weight, 0.0, l2=l2,
                                **bug)

        expected = self.assertStep(model, logs, formula(), weights)
        unconditional = self._sgld(weights, call["start"])
        self.assertSensitive(expected, {
            "px_weight ignored on samples": _formula_update(formula(px_samples_weight=1.0),
                                                            weights),
            "energy_l2 dropped": _formula_update(_jem_formula(
                x, x, y, samples, None, px_weight, pyx_weight, 0.0), weights),
            "unconditional chains": _formula_update(_jem_formula(
                x, x, y, unconditional, None, px_weight, pyx_weight, 0.0, l2=l2), weights),
        })


class JEMPPLossTest(KnownAnswerCase):
    def test_proximal_samples_and_default_weights_with_weight_decay(self):
        num_classes, step, weight_decay = 2, 0.2, 0.05
        rng = np.random.default_rng(5)
        sampler = sampling.ProximalSGLD(num_steps=1, inner_steps=2, step_size=step,
                                        gradient_clip=1.0, clip_range=(-1.0, 1.0))
        model = _jem_model(keras_jem.JEMPP, num_classes, sampler, 8, weight_decay=weight_decay)
        weights = _jem_weights(rng, num_classes)
        weights[(DIM, FEATURES)] *= 2.0  # large input gradients: the clip at 1 is active
        buffer = _images(rng, 8, -0.95, 0.95)
        _prepare(model, weights, buffer)
        x_ce, x_px = _images(rng, 4), _images(rng, 4) * 0.5 - 0.3
        y = np.array([0, 1, 0, 1])
        logs, call = _train_once(model, x_ce, x_px, y)
        self.assertTrue(call["training"], "JEM++ samples with BatchNorm in training mode")
        start = call["start"]
        self.assertTrue(set(_rows_of(start)) <= set(_rows_of(buffer)))
        # One outer step: one full gradient, then two clipped inner steps along it.
        direction = np.clip(_np_energy_gradient(weights, start, num_classes), -1.0, 1.0)
        self.assertGreater(float(np.abs(_np_energy_gradient(weights, start, num_classes)).max()),
                           1.0)
        samples = np.clip(np.clip(start - step * direction, -1, 1) - step * direction, -1, 1)
        self.assertAllClose(call["samples"], samples, atol=1e-5)

        formula = _jem_formula(x_ce, x_px, y, samples, None, 1.0, 1.0, 0.0)
        _, terms, grads = _gradient(formula, weights)
        self.assertLogs(logs, terms)
        expected = _update(grads, weights, weight_decay)
        self.assertUpdate(model, {k: np.float32(v) for k, v in weights.items()}, expected)
        self.assertSensitive(expected, {
            "weight decay dropped": _update(grads, weights),
            "likelihood on the CE images": _update(_gradient(_jem_formula(
                x_ce, x_ce, y, samples, None, 1.0, 1.0, 0.0), weights)[2], weights,
                weight_decay),
        })


def _sam_update(formula, weights, rho, adaptive, weight_decay, epsilon=1e-12):
    """SAM / ASAM written out: gradient at w, perturb, gradient at w + e(w), decay at w."""
    _, terms, first = _gradient(formula, weights)
    keys = list(weights)
    if adaptive:
        scaled = [np.abs(weights[k]) * first[k] for k in keys]
    else:
        scaled = [first[k] for k in keys]
    norm = np.sqrt(sum(float(np.sum(np.square(s))) for s in scaled))
    scale = rho / (norm + epsilon)
    perturbed = {
        k: weights[k] + (np.square(weights[k]) * first[k] if adaptive else first[k]) * scale
        for k in keys
    }
    _, _, second = _gradient(formula, perturbed)
    return terms, _update(second, weights, weight_decay), first


class SADAJEMLossTest(KnownAnswerCase):
    def _run(self, sam, weight_decay):
        num_classes = 2
        rng = np.random.default_rng(7)
        sampler = sampling.SGLD(num_steps=1, step_size=1.0, noise_scale=0.0,
                                gradient_clip=1.0, clip_range=(-1.0, 1.0))
        model = _jem_model(keras_jem.SADAJEM, num_classes, sampler, 8, sam=sam,
                           weight_decay=weight_decay)
        weights = _jem_weights(rng, num_classes)
        weights[(DIM, FEATURES)] *= 2.0
        buffer = _images(rng, 8, -0.95, 0.95)
        _prepare(model, weights, buffer)
        # SADA-JEM's streams: augmented CE batch (4) and a smaller clean p(x) batch (3) that
        # sits elsewhere in input space.
        x_ce, x_px = _images(rng, 4), _images(rng, 3) * 0.3 + 0.6
        y = np.array([1, 1, 0, 0])
        # Both SAM passes reuse one set of samples: the sampler ran once, on the p(x) batch size.
        logs, call = _train_once(model, x_ce, x_px, y)
        self.assertLen(call["start"], len(x_px))
        self.assertTrue(set(_rows_of(call["start"])) <= set(_rows_of(buffer)))
        start = call["start"]
        gradient = _np_energy_gradient(weights, start, num_classes)
        self.assertGreater(float(np.abs(gradient).max()), 1.0)
        samples = np.clip(start - np.clip(gradient, -1.0, 1.0), -1.0, 1.0)
        self.assertAllClose(call["samples"], samples, atol=1e-5)

        def formula(x_px=x_px):
            return _jem_formula(x_ce, x_px, y, samples, None, 1.0, 1.0, 0.0)

        terms, expected, first = _sam_update(formula(), weights, sam.rho, sam.adaptive,
                                             weight_decay)
        self.assertLogs(logs, terms)  # the logged loss is the first pass's, at w
        self.assertUpdate(model, {k: np.float32(v) for k, v in weights.items()}, expected)
        self.assertSensitive(expected, {
            "one pass only (no SAM)": _update(first, weights, weight_decay),
            "likelihood on the CE images": _sam_update(
                formula(x_px=x_ce), weights, sam.rho, sam.adaptive, weight_decay)[1],
            "other SAM variant": _sam_update(
                formula(), weights, sam.rho, not sam.adaptive, weight_decay)[1],
        })
        if weight_decay:
            self.assertSensitive(expected, {"weight decay dropped": _sam_update(
                formula(), weights, sam.rho, sam.adaptive, 0.0)[1]})

    def test_asam_both_passes_clean_likelihood_stream_and_weight_decay(self):
        self._run(SAM(rho=2.0, adaptive=True), weight_decay=0.05)

    def test_plain_sam(self):
        self._run(SAM(rho=0.3, adaptive=False), weight_decay=0.0)


# === GMMC: features = x K + c, E(x, y) = 1/2 ||features - mu_y||^2 ===


class GMMCLossTest(KnownAnswerCase):
    NUM_CLASSES = 3
    STEP = 1.5
    BETA = 0.7
    L2 = 0.05

    def _setup(self, mode, **kwargs):
        rng = np.random.default_rng(13)
        sampler = sampling.LatentTargetSampler(num_steps=1, step_size=self.STEP,
                                               latent_noise=0.0, clip_range=(-1.0, 1.0))
        model = keras_jem.GMMC(
            testing.LinearBackbone(FEATURES), self.NUM_CLASSES, mode=mode, beta=self.BETA,
            sampler=testing.RecordingSampler(sampler), buffer_size=6, reinit_probability=0.0,
            energy_l2_weight=self.L2, seed=2, **kwargs)
        model.build((None,) + SHAPE)
        weights = {(DIM, FEATURES): rng.normal(0, 2.0, (DIM, FEATURES)),
                   (FEATURES,): rng.normal(0, 1.0, (FEATURES,))}
        testing.assign_by_shape(model.trainable_variables, weights)
        buffer = _images(rng, 6, -0.5, 0.5)
        testing.set_buffer_images(model, buffer)
        centers = testing.to_numpy(model.centers).astype(np.float64)
        # The fixed centres: norm 10, pairwise inner product -100 / (C - 1) (a simplex).
        gram = centers @ centers.T
        self.assertAllClose(np.diag(gram), [100.0] * self.NUM_CLASSES, atol=1e-3)
        self.assertAllClose(gram[0, 1], -100.0 / (self.NUM_CLASSES - 1), atol=1e-3)
        return _compile(model), weights, buffer, centers, rng

    def _features(self, w, x):
        return _flat(x) @ w[(DIM, FEATURES)] + w[(FEATURES,)]

    def _formula(self, x, y, centers, samples=None, sample_weight=None, beta=None, l2=None):
        beta = self.BETA if beta is None else beta
        l2 = self.L2 if l2 is None else l2
        mu = tf.constant(centers[y], tf.float32)

        def formula(w):
            e_data = 0.5 * tf.reduce_sum((self._features(w, x) - mu) ** 2, axis=-1)
            weighted = e_data if sample_weight is None else e_data * sample_weight
            loss = tf.reduce_mean(weighted)
            terms = {"loss_mmc": loss, "energy_data": tf.reduce_mean(e_data)}
            if samples is not None:
                e_samples = 0.5 * tf.reduce_sum((self._features(w, samples) - mu) ** 2, -1)
                loss = loss - beta * tf.reduce_mean(e_samples)
                loss += l2 * (tf.reduce_mean(e_data ** 2) + tf.reduce_mean(e_samples ** 2))
                terms["energy_samples"] = tf.reduce_mean(e_samples)
            terms["loss"] = loss
            return loss, terms

        return formula

    def _latent_step(self, weights, start, y, centers):
        """x - step * d/dx mean_i 1/2 ||x_i K + c - mu_y_i||^2, clipped to [-1, 1]."""
        flat = start.reshape(len(start), DIM).astype(np.float64)
        residual = flat @ weights[(DIM, FEATURES)] + weights[(FEATURES,)] - centers[y]
        gradient = residual @ weights[(DIM, FEATURES)].T / len(start)
        return np.clip(flat - self.STEP * gradient, -1, 1).reshape(start.shape)

    def _check_generative_step(self, model, weights, buffer, centers, x, y, logs,
                               sample_weight=None):
        (call,) = model.sampler.calls[-1:]
        self.assertAllEqual(call["y"], y, "GMMC samples class-conditionally with the labels")
        block = len(buffer) // self.NUM_CLASSES
        rows = _rows_of(buffer)
        for i, row in enumerate(_rows_of(call["start"])):
            self.assertEqual(rows.index(row) // block, y[i])
        samples = self._latent_step(weights, call["start"], y, centers)
        self.assertAllClose(call["samples"], samples, atol=1e-5)
        self.assertGreater(float(np.abs(samples - call["start"]).max()), 0.05)
        formula = self._formula(x, y, centers, samples, sample_weight)
        _, terms, grads = _gradient(formula, weights)
        self.assertLogs(logs, terms)
        expected = _update(grads, weights)
        self.assertSensitive(expected, {
            "beta dropped": _formula_update(self._formula(
                x, y, centers, samples, sample_weight, beta=1.0), weights),
            "samples' sign flipped": _formula_update(self._formula(
                x, y, centers, samples, sample_weight, beta=-self.BETA), weights),
            "energy_l2 dropped": _formula_update(self._formula(
                x, y, centers, samples, sample_weight, l2=0.0), weights),
            "discriminative loss": _formula_update(self._formula(
                x, y, centers, None, sample_weight), weights),
        })
        return expected

    def test_discriminative(self):
        model, weights, _, centers, rng = self._setup("discriminative")
        x, y = _images(rng, 4), np.array([0, 2, 1, 2])
        sample_weight = np.array([1.0, 0.5, 2.0, 0.1], np.float32)
        logs = model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)
        self.assertEmpty(model.sampler.calls)
        expected = self.assertStep(model, logs, self._formula(x, y, centers, None, sample_weight),
                                   weights)
        self.assertSensitive(expected, {
            "sample_weight ignored": _formula_update(self._formula(x, y, centers), weights)})

    def test_generative_with_sample_weight(self):
        model, weights, buffer, centers, rng = self._setup("generative")
        x, y = _images(rng, 4), np.array([2, 0, 1, 0])
        sample_weight = np.array([1.0, 0.5, 2.0, 0.1], np.float32)
        before = {k: np.float32(v) for k, v in weights.items()}
        # px_images is not GMMC's data stream: its data term needs the labels.
        other = _images(rng, 4) * 0.2 + 0.7
        logs = model.train_on_batch({"images": x, "px_images": other}, y,
                                    sample_weight=sample_weight, return_dict=True)
        expected = self._check_generative_step(model, weights, buffer, centers, x, y, logs,
                                               sample_weight)
        self.assertUpdate(model, before, expected)

    def test_joint_switches_at_start_generative(self):
        model, weights, buffer, centers, rng = self._setup("joint", start_generative=1)
        x, y = _images(rng, 4), np.array([1, 2, 0, 1])
        before = {k: np.float32(v) for k, v in weights.items()}
        history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        self.assertEqual(history.history["generative"], [0.0])
        self.assertEmpty(model.sampler.calls)
        _, _, grads = _gradient(self._formula(x, y, centers), weights)
        self.assertUpdate(model, before, _update(grads, weights))

        weights = testing.values_by_shape(model.trainable_variables)
        weights = {k: v.astype(np.float64) for k, v in weights.items()}
        before = testing.values_by_shape(model.trainable_variables)
        history = model.fit(x, y, batch_size=4, epochs=2, initial_epoch=1, shuffle=False,
                            verbose=0)
        self.assertEqual(history.history["generative"], [1.0])
        logs = {k: v[-1] for k, v in history.history.items()}
        expected = self._check_generative_step(model, weights, buffer, centers, x, y, logs)
        self.assertUpdate(model, before, expected)


# === IGEBM: E(x) = (x K + c) v + b ===


def _igebm_loss(e_pos, e_neg, l2, sign=1.0, sample_weight=None):
    """IGEBM's loss and logged terms from the energies of the positives and the samples
    (`sample_weight` weighs the positives' terms)."""
    weight = 1.0 if sample_weight is None else sample_weight
    loss_ml = sign * (tf.reduce_mean(weight * e_pos) - tf.reduce_mean(e_neg))
    loss_l2 = tf.reduce_mean(weight * e_pos ** 2) + tf.reduce_mean(e_neg ** 2)
    total = loss_ml + l2 * loss_l2
    return total, {"loss": total, "loss_ml": loss_ml, "loss_l2": loss_l2,
                   "energy_data": tf.reduce_mean(e_pos), "energy_samples": tf.reduce_mean(e_neg)}


class IGEBMLossTest(KnownAnswerCase):
    def test_clipped_langevin_negatives_likelihood_stream_and_l2(self):
        rng = np.random.default_rng(17)
        step, clip, l2 = 10.0, 0.01, 0.3
        sampler = sampling.SGLD(num_steps=1, step_size=step, noise_scale=0.0,
                                gradient_clip=clip, clip_range=(-1.0, 1.0))
        model = keras_jem.IGEBM(testing.LinearBackbone(FEATURES),
                                sampler=testing.RecordingSampler(sampler), buffer_size=8,
                                reinit_probability=0.0, energy_l2_weight=l2, seed=4,
                                dequantization=0.0,  # exact positives (dequantised: test_igebm)
                                buffer_type="persistent")  # chains set by hand
        model.build((None,) + SHAPE)
        weights = {(DIM, FEATURES): rng.normal(0, 0.8, (DIM, FEATURES)),
                   (FEATURES,): rng.normal(0, 0.3, (FEATURES,)),
                   (FEATURES, 1): rng.normal(0, 0.8, (FEATURES, 1)),
                   (1,): np.array([0.4])}
        buffer = _images(rng, 8)
        _prepare(model, weights, buffer)
        x_ce, x_px = _images(rng, 4), _images(rng, 4) * 0.3 + 0.5
        sample_weight = np.array([0.5, 2.0, 1.0, 0.25], np.float32)
        logs, call = _train_once(model, x_ce, x_px, sample_weight=sample_weight)
        self.assertTrue(set(_rows_of(call["start"])) <= set(_rows_of(buffer)))
        # grad_x E = K v for every x: each pixel moves by -step * clip(K v, +-0.01).
        gradient = (weights[(DIM, FEATURES)] @ weights[(FEATURES, 1)]).reshape(SHAPE)
        samples = np.clip(call["start"] - step * np.clip(gradient, -clip, clip), -1, 1)
        self.assertAllClose(call["samples"], samples, atol=1e-5)

        def formula(positives=x_px, sign=1.0, l2=l2, weight=sample_weight):
            def energy(w, x):
                return tf.squeeze((_flat(x) @ w[(DIM, FEATURES)] + w[(FEATURES,)])
                                  @ w[(FEATURES, 1)], -1) + w[(1,)][0]

            def loss(w):
                return _igebm_loss(energy(w, positives), energy(w, samples), l2, sign, weight)

            return loss

        expected = self.assertStep(model, logs, formula(), weights)
        self.assertSensitive(expected, {
            "sample_weight ignored": _formula_update(formula(weight=None), weights),
            "positives from the CE images": _formula_update(formula(positives=x_ce), weights),
            "contrastive sign flipped": _formula_update(formula(sign=-1.0), weights),
            "energy_l2 dropped": _formula_update(formula(l2=0.0), weights),
        })


class ConditionalLinearBackbone(keras.layers.Layer):
    """`features = flatten(x) @ kernel + embedding[y]`: a class-conditional linear backbone."""

    def __init__(self, num_classes, feature_dim=FEATURES, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.feature_dim = feature_dim

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(DIM, self.feature_dim))
        self.embedding = self.add_weight(name="embedding",
                                         shape=(self.num_classes, self.feature_dim))

    def call(self, x, labels=None, training=None):
        flat = keras.ops.reshape(x, (keras.ops.shape(x)[0], DIM))
        return keras.ops.matmul(flat, self.kernel) + keras.ops.take(self.embedding, labels,
                                                                    axis=0)


class ConditionalIGEBMLossTest(KnownAnswerCase):
    def test_labelled_stream_and_class_block_negatives(self):
        rng = np.random.default_rng(19)
        num_classes, step, l2 = 2, 0.3, 0.2
        sampler = sampling.SGLD(num_steps=1, step_size=step, noise_scale=0.0,
                                clip_range=(-1.0, 1.0))
        model = keras_jem.IGEBM(ConditionalLinearBackbone(num_classes),
                                sampler=testing.RecordingSampler(sampler), buffer_size=8,
                                reinit_probability=0.0, energy_l2_weight=l2, seed=4,
                                class_blocks=True, dequantization=0.0,
                                buffer_type="persistent")
        model.build((None,) + SHAPE)
        weights = {(DIM, FEATURES): rng.normal(0, 0.8, (DIM, FEATURES)),
                   (num_classes, FEATURES): rng.normal(0, 1.0, (num_classes, FEATURES)),
                   (FEATURES, 1): rng.normal(0, 0.8, (FEATURES, 1)), (1,): np.array([0.2])}
        buffer = _images(rng, 8, -0.5, 0.5)
        _prepare(model, weights, buffer)
        x_ce, x_px = _images(rng, 4), _images(rng, 4) * 0.3 + 0.5
        y = np.array([1, 0, 0, 1])
        logs, call = _train_once(model, x_ce, x_px, y)
        self.assertAllEqual(call["y"], y, "conditional negatives use the batch's labels")
        rows = _rows_of(buffer)
        for i, row in enumerate(_rows_of(call["start"])):
            self.assertEqual(rows.index(row) // (len(buffer) // num_classes), y[i])
        # E(x, y) = (x K + emb_y) v + b: grad_x E = K v for every label.
        gradient = (weights[(DIM, FEATURES)] @ weights[(FEATURES, 1)]).reshape(SHAPE)
        samples = np.clip(call["start"] - step * gradient, -1, 1)
        self.assertAllClose(call["samples"], samples, atol=1e-5)

        def formula(positives=x_ce, labels=y):
            def energy(w, x, labels):
                features = _flat(x) @ w[(DIM, FEATURES)] + tf.gather(
                    w[(num_classes, FEATURES)], labels)
                return tf.squeeze(features @ w[(FEATURES, 1)], -1) + w[(1,)][0]

            def loss(w):
                return _igebm_loss(energy(w, positives, labels), energy(w, samples, y), l2)

            return loss

        expected = self.assertStep(model, logs, formula(), weights)
        self.assertSensitive(expected, {
            "positives from px_images": _formula_update(formula(positives=x_px), weights),
            "positives with other labels": _formula_update(formula(labels=1 - y), weights),
        })
