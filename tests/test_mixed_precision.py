"""Mixed precision: compute in bfloat16, keep variables, energies, chains and buffer in float32."""

import keras
import numpy as np
import tensorflow as tf

import keras_jem
from keras_jem import backbones
from tests import testing


def _with_policy(name, build):
    """Constructs a model under the global policy `name`, then restores float32.

    The model is built afterwards, under float32, as `trainers.fit` and users' scripts may do:
    sublayers created in `build` must still follow the model's own policy.
    """
    keras.mixed_precision.set_global_policy(name)
    try:
        model = build()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model


def _compute_dtypes(layer):
    return {sub.name: sub.dtype_policy.compute_dtype for sub in layer._flatten_layers()
            if sub.weights}


class MixedBFloat16Test(testing.TestCase):
    def _check_training(self, model, conditional_labels=True):
        x = np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)).astype("float32")
        y = np.arange(16) % 10
        model.build((None, 8, 8, 1))
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        # Every layer with weights computes in bfloat16, including those created in `build`
        # (residual bypasses, normalisation) after the global policy went back to float32.
        # (GMMC's fixed-centre head is float32 on purpose.)
        dtypes = _compute_dtypes(model.backbone)
        self.assertTrue(dtypes)
        self.assertEqual(set(dtypes.values()), {"bfloat16"}, dtypes)
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        for key, values in history.history.items():
            self.assertTrue(np.all(np.isfinite(values)), (key, values))
        # float32 chains, or a FIFO buffer's 8-bit samples (IGEBM), never bfloat16.
        self.assertIn(model.buffer.images.dtype, ("float32", "uint8"))
        self.assertEqual(model.buffer.stored_images().dtype, tf.float32)
        for variable in model.trainable_variables:
            self.assertEqual(variable.dtype, "float32", variable.path)
        # Energies and logits are float32; the sampler's chains stay float32 and move.
        self.assertEqual(model.energy(x[:4]).dtype, tf.float32)
        self.assertEqual(model(x[:4]).dtype, tf.float32)
        start = x[:4]
        labels = y[:4] if conditional_labels else None
        samples = model.sampler(model, tf.constant(start), y=None if labels is None else
                                tf.constant(labels), seed=tf.constant([1, 2], tf.int64))
        self.assertEqual(samples.dtype, tf.float32)
        self.assertGreater(float(np.abs(samples.numpy() - start).max()), 1e-4)
        return model

    def test_jem_with_wide_resnet_and_batch_norm(self):
        model = _with_policy("mixed_bfloat16", lambda: keras_jem.JEM(
            backbones.WideResNet(depth=10, width=1, norm="batch"), 10, buffer_size=40,
            sampler=keras_jem.sampling.SGLD(num_steps=2), seed=0))
        model = self._check_training(model, conditional_labels=False)
        norms = [layer for layer in model.backbone._flatten_layers()
                 if isinstance(layer, keras.layers.BatchNormalization)]
        self.assertTrue(norms)
        # Keras keeps BatchNorm statistics in float32 under mixed precision.
        self.assertEqual(norms[0].moving_mean.dtype, "float32")

    def test_gmmc_generative(self):
        model = _with_policy("mixed_bfloat16", lambda: keras_jem.GMMC(
            testing.small_cnn(), 10, mode="generative", buffer_size=40,
            sampler=keras_jem.sampling.LatentTargetSampler(num_steps=2), seed=0))
        self._check_training(model)
        self.assertEqual(model.head.dtype_policy.compute_dtype, "float32")

    def test_conditional_igebm(self):
        model = _with_policy("mixed_bfloat16", lambda: keras_jem.IGEBM(
            backbones.SNResNet(filters=4, num_classes=10), buffer_size=40,
            sampler=keras_jem.sampling.SGLD(num_steps=2, step_size=10.0, noise_scale=0.005,
                                            gradient_clip=0.01, clip_range=(-1, 1)),
            seed=0))
        self._check_training(model)

    def test_trainers_fit_flag(self):
        from trainers import fit

        config, _ = fit.resolve_config([
            "--model", "igebm", "--mixed_precision", "mixed_bfloat16", "--sn_filters", "4",
            "--buffer_size", "100", "--num_steps", "2", "--model_dir",
            self.get_temp_dir() + "/run",
        ])
        from keras_jem import data

        model = fit.build(config, data.get_info("digits"))
        self.assertEqual(model.backbone.dtype_policy.name, "mixed_bfloat16")
        self.assertEqual(keras.mixed_precision.global_policy().name, "float32")
        with self.assertRaisesRegex(fit.ConfigError, "--mixed_precision must be one of"):
            fit.validate(dict(config, mixed_precision="float8"))
