"""Any Keras backbone works: functional, Sequential, keras.applications, registered subclasses.

Each backbone maps images to `(batch, features)`; the models read the feature size from its
output, use the proximal shortcut only when the backbone has `stem` / `call_from_stem`, and
explain a backbone that does not fit (no pooling, not differentiable).
"""

import os

import keras
import numpy as np
import pytest

import keras_jem
from keras_jem import sampling
from tests import testing

SHAPE = (16, 16, 1)


def functional_cnn(shape=SHAPE, features=24):
    """A 5-layer functional CNN, as a user would write it."""
    inputs = keras.Input(shape)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="swish")(inputs)
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="swish")(h)
    h = keras.layers.Conv2D(16, 3, padding="same", activation="swish")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(features, activation="swish")(h)
    return keras.Model(inputs, outputs, name="user_cnn")


def sequential_cnn(shape=SHAPE):
    return keras.Sequential([
        keras.Input(shape),
        keras.layers.Conv2D(8, 3, padding="same", activation="elu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="elu"),
    ], name="user_sequential")


@keras.saving.register_keras_serializable(package="keras_jem_user_backbones")
class PooledConv(keras.layers.Layer):
    """A registered user layer without `stem` / `call_from_stem` or `feature_dim`."""

    def __init__(self, filters=12, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same")

    def build(self, input_shape):
        self.conv.build(input_shape)

    def call(self, x, training=None):
        return keras.ops.mean(keras.ops.tanh(self.conv(x)), axis=(1, 2))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def data(shape=SHAPE, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n,) + shape).astype("float32"), (np.arange(n) % 4).astype("int32")


def train(model, shape=SHAPE, steps=2, build_first=False):
    """`steps` training steps; `build_first`: as `trainers/fit.py`, the model and the optimizer's
    variables exist before the first step, which is then traced once instead of twice (a
    tf.function whose first trace creates variables is traced again)."""
    x, y = data(shape)
    if build_first:
        model.build((None,) + shape)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    if build_first:
        model.optimizer.build(model.trainable_variables)
    for step in range(steps):
        logs = model.train_on_batch(x[4 * (step % 2):][:4], y[4 * (step % 2):][:4],
                                    return_dict=True)
    assert np.isfinite(logs["loss"]), logs
    return logs


def jem(backbone, cls=keras_jem.JEM, **kwargs):
    kwargs.setdefault("sampler", testing.tiny_sgld(num_steps=2))
    return cls(backbone=backbone, num_classes=4, buffer_size=20, seed=1, **kwargs)


def assert_round_trip(model, path, shape=SHAPE):
    x, _ = data(shape, n=3, seed=5)
    expected = keras.ops.convert_to_numpy(model(x))
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), expected,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(loaded.buffer.images.numpy(), model.buffer.images.numpy())
    return expected


class UserBackboneTest(testing.TestCase):
    @testing.parameterized.named_parameters(
        ("functional", functional_cnn, 24),
        ("sequential", sequential_cnn, 16),
        ("registered", PooledConv, 12),
    )
    def test_jem_trains_and_round_trips(self, make_backbone, features):
        model = jem(make_backbone())
        train(model)
        self.assertEqual(model.feature_dim, features)  # read from the output shape
        self.assertEqual(model.head.kernel.shape, (features, 4))
        self.assertFalse(model.supports_stem)
        assert_round_trip(model, os.path.join(self.get_temp_dir(), "model.keras"))

    @testing.parameterized.named_parameters(
        ("jempp", keras_jem.JEMPP, {"sampler": testing.tiny_proximal()}),
        ("sadajem", keras_jem.SADAJEM, {}),
        ("gmmc", keras_jem.GMMC, {"mode": "generative"}),
        ("igebm", keras_jem.IGEBM, {}),
    )
    def test_every_model_class_trains_on_a_functional_backbone(self, cls, kwargs):
        if cls is keras_jem.IGEBM:
            model = cls(functional_cnn(), buffer_size=20, seed=1,
                        sampler=testing.tiny_sgld(num_steps=2), **kwargs)
        else:
            model = jem(functional_cnn(), cls=cls, **kwargs)
        if model.buffer_init == "gaussian_mixture":
            model.adapt_buffer(*data(n=16))
        logs = train(model)
        self.assertIn("loss", logs)
        self.assertEqual(model.feature_dim, 24)

    def test_proximal_sampler_takes_the_general_path_without_a_stem(self):
        # The proximal sampler on a backbone without `stem` equals the stem shortcut on the same
        # network exposed with an identity stem (`DenseBackbone`'s stem is a reshape).
        with_stem = testing.DenseBackbone(feature_dim=6)
        model = jem(with_stem, cls=keras_jem.JEMPP, buffer_init="uniform")
        model.build((None,) + SHAPE)
        self.assertTrue(model.supports_stem)
        inputs = keras.Input(SHAPE)
        plain_backbone = keras.Model(inputs, with_stem(inputs))  # the same layer, no stem
        plain = jem(plain_backbone, cls=keras_jem.JEMPP, buffer_init="uniform")
        plain.build((None,) + SHAPE)
        plain.head.set_weights(model.head.get_weights())
        self.assertFalse(plain.supports_stem)
        sampler = sampling.ProximalSGLD(num_steps=2, inner_steps=3, step_size=0.05)
        x0, _ = data(n=4, seed=2)
        seed = keras.ops.convert_to_tensor(np.array([1, 2], "int64"))
        expected = sampler(model, x0, seed=seed)
        got = sampler(plain, x0, seed=seed)
        self.assertAllClose(got, expected, rtol=1e-5, atol=1e-6)
        self.assertGreater(float(np.max(np.abs(testing.to_numpy(got) - x0))), 1e-3)

    def test_output_that_is_not_a_vector_names_the_fix(self):
        inputs = keras.Input(SHAPE)
        unpooled = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs), name="no_pooling")
        with self.assertRaisesRegex(ValueError, r"'no_pooling'.*\(None, 14, 14, 4\)|"
                                                r"'no_pooling'.*\(1, 14, 14, 4\)"):
            jem(unpooled).build((None,) + SHAPE)
        with self.assertRaisesRegex(ValueError, "pooling='avg'.*GlobalAveragePooling2D"):
            jem(unpooled).build((None,) + SHAPE)

    def test_backbone_that_cuts_the_gradient_is_refused(self):
        quantize = keras.layers.Lambda(
            lambda x: keras.ops.cast(keras.ops.cast(x * 8.0, "int32"), "float32"))
        backbone = keras.Sequential([keras.Input(SHAPE), quantize, keras.layers.Flatten(),
                                     keras.layers.Dense(8)])
        with self.assertRaisesRegex(ValueError, "not differentiable.*input images"):
            jem(backbone).build((None,) + SHAPE)

    def test_not_a_layer(self):
        with self.assertRaisesRegex(ValueError, "Keras layer or model.*Received: 'resnet'"):
            jem("resnet")


def test_fresh_process_loads_functional_and_registered_backbones(tmp_path):
    expected = {}
    for name, make_backbone in (("functional", functional_cnn), ("registered", PooledConv)):
        keras.utils.set_random_seed(1)
        model = jem(make_backbone())
        train(model, build_first=True)
        expected[name] = assert_round_trip(model, str(tmp_path / f"{name}.keras"))
    out = testing.run_in_subprocess(f"""
        import json, keras, numpy as np
        import tests.test_user_backbones as user  # registers PooledConv
        x, _ = user.data(n=3, seed=5)
        print(json.dumps({{name: keras.ops.convert_to_numpy(
            keras.saving.load_model("{tmp_path}/" + name + ".keras")(x)).tolist()
            for name in ("functional", "registered")}}))
    """)
    import json

    loaded = json.loads(out.splitlines()[-1])
    for name, logits in expected.items():
        np.testing.assert_allclose(np.asarray(loaded[name]), logits, rtol=1e-5, atol=1e-5)


def applications_backbone(name):
    common = {"input_shape": (32, 32, 3), "include_top": False, "weights": None,
              "pooling": "avg"}
    if name == "MobileNetV3Small":
        # minimalistic: no squeeze-excite blocks or hard-swish, fewer layers to trace
        return keras.applications.MobileNetV3Small(include_preprocessing=False,
                                                   minimalistic=True, **common)
    return getattr(keras.applications, name)(**common)


def check_application(name, tmp_path):
    keras.utils.set_random_seed(1)
    backbone = applications_backbone(name)
    model = jem(backbone)
    train(model, shape=(32, 32, 3), steps=1, build_first=True)
    assert model.feature_dim == backbone.output_shape[-1]
    assert_round_trip(model, str(tmp_path / "model.keras"), shape=(32, 32, 3))


def test_mobilenet_v3_small(tmp_path):
    check_application("MobileNetV3Small", tmp_path)


@pytest.mark.large
def test_resnet50_v2(tmp_path):
    check_application("ResNet50V2", tmp_path)
