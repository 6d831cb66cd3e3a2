"""Coupled weight decay applies exactly `weight_decay * w` under replicas and loss scaling.

The models' `weight_decay` is added to the gradients the optimizer receives, which are those of
`scale_loss(loss / num_replicas)` on each replica: the optimizer sums the replicas and divides
by the loss scale. The decay must be put in those units, or it is R times too strong on R
replicas and 2^15 times too weak under `mixed_float16` (issue 13, section 4).

Each test runs one SGD step (no momentum: the update is `-lr * (g + wd * w)`) with and without
weight decay from the same weights and batch; the difference of the two updates is the decay
part, compared with `-lr * wd * w` computed by hand.
"""

import json

import keras
import numpy as np
import pytest

import keras_jem
from tests import testing

LEARNING_RATE = 0.1
WEIGHT_DECAY = 0.01


def _decay_parts(before, with_decay, without_decay):
    return [w - w0 for w, w0 in zip(with_decay, without_decay)], [
        -LEARNING_RATE * WEIGHT_DECAY * w for w in before]


# The default suite checks the same thing on SADA-JEM with BatchNorm and ASAM in
# tests/test_modes.py (one subprocess for all its MirroredStrategy checks); this JEM version costs
# a subprocess of its own (about 40 s idle), so it runs with --run_large.
@pytest.mark.large
def test_mirrored_step_with_weight_decay_equals_single_device_step():
    # Two logical CPUs must be configured before TensorFlow starts: a fresh interpreter.
    out = testing.run_in_subprocess(f"""
        import json
        from keras_jem import distribute
        distribute.configure_cpu_devices(2)
        import keras, numpy as np, tensorflow as tf
        import keras_jem
        from keras_jem.backbones import SmallCNN

        MIRRORED = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        SINGLE = tf.distribute.get_strategy()
        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (16, 8, 8, 1)).astype("float32")
        y = (np.arange(16) % 10).astype("int64")

        def step(strategy, weight_decay, weights=None):
            keras.utils.set_random_seed(3)
            with strategy.scope():
                # The sampler is deterministic (no noise, no restart) and the buffer holds one
                # global batch of chains: both replica counts continue the same 16 chains.
                model = keras_jem.JEM(
                    SmallCNN(filters=(8, 16), feature_dim=32), 10, buffer_size=16,
                    reinit_probability=0.0, seed=1, weight_decay=weight_decay,
                    sampler=keras_jem.sampling.SGLD(2, 1.0, 0.0))
                model.build((None, 8, 8, 1))
                if weights is not None:
                    model.set_weights(weights)
                model.compile(optimizer=keras.optimizers.SGD({LEARNING_RATE}),
                              jit_compile=False)
            initial = model.get_weights()  # weights, replay buffer, seed state
            before = [np.array(v.numpy()) for v in model.trainable_variables]
            data = tf.data.Dataset.from_tensors((x, y)).repeat()
            with strategy.scope():
                model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
            after = [np.array(v.numpy()) for v in model.trainable_variables]
            return initial, before, after

        weights, before, single = step(SINGLE, {WEIGHT_DECAY})
        _, _, single_plain = step(SINGLE, 0.0, weights)
        _, _, mirrored = step(MIRRORED, {WEIGHT_DECAY}, weights)
        _, _, mirrored_plain = step(MIRRORED, 0.0, weights)
        print(json.dumps({{name: [a.tolist() for a in arrays] for name, arrays in (
            ("before", before), ("single", single), ("single_plain", single_plain),
            ("mirrored", mirrored), ("mirrored_plain", mirrored_plain))}}))
    """, timeout=600)
    result = {k: [np.asarray(a) for a in v] for k, v in json.loads(out.splitlines()[-1]).items()}
    before = result["before"]
    for name in ("single", "mirrored"):
        decay, expected = _decay_parts(before, result[name], result[name + "_plain"])
        for got, want in zip(decay, expected):
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-8, err_msg=name)
    # And the whole step (gradient + decay) is the same on 2 replicas as on one device.
    for single, mirrored, w0 in zip(result["single"], result["mirrored"], before):
        np.testing.assert_allclose(mirrored - w0, single - w0, rtol=1e-4, atol=1e-7)


class MixedPrecisionWeightDecayTest(testing.TestCase):
    def tearDown(self):
        keras.mixed_precision.set_global_policy("float32")
        super().tearDown()

    def _decay_part(self, policy):
        keras.mixed_precision.set_global_policy(policy)
        images, labels = testing.load_digits(num_examples=16)
        updates = {}
        weights = None
        for weight_decay in (WEIGHT_DECAY, 0.0):
            keras.utils.set_random_seed(5)
            model = testing.make_model(px_weight=0.0, weight_decay=weight_decay,
                                       sampler=testing.tiny_sgld())
            if weights is None:
                weights = model.get_weights()
            model.set_weights(weights)
            model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), jit_compile=False)
            if policy == "mixed_float16":
                # Keras wraps the optimizer: the gradients it receives are scaled by 2^15.
                self.assertIsInstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
            before = [testing.to_numpy(v) for v in model.trainable_variables]
            model.train_on_batch(images, labels)
            updates[weight_decay] = [testing.to_numpy(v) for v in model.trainable_variables]
        return _decay_parts(before, updates[WEIGHT_DECAY], updates[0.0])

    @testing.parameterized.parameters("float32", "mixed_float16")
    def test_decay_is_weight_decay_times_weights(self, policy):
        decay, expected = self._decay_part(policy)
        self.assertNotEmpty(decay)
        for got, want in zip(decay, expected):
            # float16 forward passes make the two runs' gradients differ in the last bits.
            self.assertAllClose(got, want, rtol=1e-2, atol=1e-6)


class SharpnessAwareModelWeightDecayTest(testing.TestCase):
    def test_wrapper_applies_the_same_coupled_decay(self):
        images, labels = testing.load_digits(num_examples=16)
        updates = {}
        weights = None
        for weight_decay in (WEIGHT_DECAY, 0.0):
            keras.utils.set_random_seed(5)
            classifier = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                           keras.layers.Dense(10)])
            model = keras_jem.optimizers.SharpnessAwareModel(
                classifier, sam=keras_jem.optimizers.SAM(0.05), weight_decay=weight_decay)
            model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.build((None, 8, 8, 1))
            if weights is None:
                weights = classifier.get_weights()
            classifier.set_weights(weights)
            before = [testing.to_numpy(v) for v in model.trainable_variables]
            model.train_on_batch(images, labels)
            updates[weight_decay] = [testing.to_numpy(v) for v in model.trainable_variables]
        decay, expected = _decay_parts(before, updates[WEIGHT_DECAY], updates[0.0])
        for got, want in zip(decay, expected):
            self.assertAllClose(got, want, rtol=1e-4, atol=1e-7)
        config = model.get_config()
        self.assertEqual(config["weight_decay"], 0.0)
