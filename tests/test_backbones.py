import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_jem import backbones
from keras_jem.backbones import layers as backbone_layers


def _numpy(x):
    return ops.convert_to_numpy(x)


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype("float32")


def _tiny(name):
    """Small instances of every backbone, for the generic contract tests."""
    if name == "wrn":
        return backbones.WideResNet(depth=10, width=1)
    if name == "wrn_batch":
        return backbones.WideResNet(depth=10, width=1, norm="batch", dropout_rate=0.1)
    if name == "small_cnn":
        return backbones.SmallCNN(filters=(8, 16), feature_dim=12)
    if name == "small_cnn_group":
        return backbones.SmallCNN(filters=(8, 16), feature_dim=None, norm="group")
    if name == "sn_resnet":
        return backbones.SNResNet(filters=8, num_blocks=(1, 2))
    raise AssertionError(name)


def _features(backbone, x, **kwargs):
    if getattr(backbone, "num_classes", None):
        kwargs.setdefault("y", np.arange(len(x)) % backbone.num_classes)
    return _numpy(backbone(x, **kwargs))


ALL = ["wrn", "wrn_batch", "small_cnn", "small_cnn_group", "sn_resnet"]


# === Contract: shapes, stem ===


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (2, 32, 32, 3), (3, 12, 20, 3)])
def test_output_shape(name, shape):
    backbone = _tiny(name)
    features = _features(backbone, _images(shape))
    assert features.shape == (shape[0], backbone.feature_dim)
    assert np.all(np.isfinite(features))
    assert backbone.compute_output_shape(shape) == (shape[0], backbone.feature_dim)


@pytest.mark.parametrize("name", ALL)
def test_call_equals_call_from_stem(name):
    backbone = _tiny(name)
    x = _images((3, 12, 12, 3))
    expected = _features(backbone, x)
    stem = backbone.stem(x)
    assert stem.shape[:3] == (3, 12, 12)
    actual = _numpy(backbone.call_from_stem(stem))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_stem_before_build_builds():
    backbone = backbones.WideResNet(depth=10, width=1)
    h = backbone.stem(_images((2, 8, 8, 3)))
    assert backbone.built and h.shape == (2, 8, 8, 16)


# === Wide-ResNet ===


def test_wrn_28_10_parameter_count():
    backbone = backbones.get("wrn-28-10")
    backbone.build((None, 32, 32, 3))
    # The JEM-family WRN-28-10 without its linear heads: about 36.5M parameters.
    assert backbone.count_params() == 36_464_928
    assert backbone.feature_dim == 640


def test_wrn_16_2_structure():
    backbone = backbones.get("wrn-16-2")
    x = _images((2, 32, 32, 3))
    backbone(x)
    assert backbone.feature_dim == 128
    assert len(backbone.blocks) == 6  # 3 stages x (16 - 4) / 6
    assert [b.filters for b in backbone.blocks] == [32, 32, 64, 64, 128, 128]
    assert [b.strides for b in backbone.blocks] == [1, 1, 2, 1, 2, 1]

    h = backbone.stem(x)
    for block in backbone.blocks[:2]:
        h = block(h)
    strided = backbone.blocks[2]
    # The stride sits on the second conv: the first keeps the spatial size.
    assert tuple(strided.conv1(h).shape) == (2, 32, 32, 64)
    assert strided.conv1.strides == (1, 1) and strided.conv2.strides == (2, 2)
    assert tuple(strided(h).shape) == (2, 16, 16, 64)
    # The shortcut is a 1x1 strided conv with bias on the raw block input.
    assert strided.shortcut.kernel_size == (1, 1) and strided.shortcut.strides == (2, 2)
    assert strided.shortcut.use_bias
    assert backbone.blocks[1].shortcut is None  # identity when the shape is kept
    assert backbone.blocks[0].shortcut is not None  # 16 -> 32 channels


def test_strided_conv_matches_pytorch_padding():
    # PyTorch's conv(stride=2, padding=1) equals the stride-1 "same" conv sampled at even
    # positions; Keras' "same" with stride 2 would sample odd positions for even sizes.
    x = _images((2, 8, 10, 4))
    strided = backbone_layers.TorchConv2D(5, 3, strides=2, padding="valid")
    dense = backbone_layers.TorchConv2D(5, 3, padding="same")
    strided.build((None, 10, 12, 4))
    dense.build((None, 8, 10, 4))
    dense.set_weights(strided.get_weights())
    actual = _numpy(strided(backbone_layers.pad_like_pytorch(x)))
    expected = _numpy(dense(x))[:, ::2, ::2]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_pytorch_like_init_bounds():
    backbone = backbones.get("wrn-16-2")
    backbone.build((None, 32, 32, 3))
    convs = [backbone.stem_conv] + [
        conv
        for block in backbone.blocks
        for conv in (block.conv1, block.conv2, block.shortcut)
        if conv is not None
    ]
    assert len(convs) == 1 + 6 * 2 + 3
    for conv in convs:
        kernel, bias = (_numpy(w) for w in conv.weights)
        fan_in = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
        bound = 1.0 / math.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound
        assert np.abs(bias).max() <= bound
        assert np.abs(kernel).max() > 0.9 * bound  # uniform on the full interval
        assert isinstance(conv.bias_initializer, backbone_layers.FanInUniform)
        assert conv.bias_initializer.fan_in == fan_in
    big = _numpy(backbone.blocks[-1].conv2.kernel)
    np.testing.assert_allclose(big.std(), 1.0 / math.sqrt(3 * 9 * 128), rtol=0.02)


def test_small_cnn_dense_init_bounds():
    backbone = backbones.SmallCNN(filters=(8, 16), feature_dim=32)
    backbone.build((None, 8, 8, 1))
    kernel, bias = (_numpy(w) for w in backbone.dense.weights)
    assert np.abs(kernel).max() <= 1 / 4 and np.abs(bias).max() <= 1 / 4  # fan_in = 16


@pytest.mark.parametrize(
    "norm, groups",
    [("group", [16, 32, 32]), ("instance", [16, 64, 128]), ("layer", [1, 1, 1])],
)
def test_group_norms(norm, groups):
    backbone = backbones.WideResNet(depth=10, width=4, norm=norm)
    backbone.build((None, 8, 8, 3))
    norm1s = [block.norm1 for block in backbone.blocks]
    assert all(isinstance(n, keras.layers.GroupNormalization) for n in norm1s)
    assert [n.groups for n in norm1s] == groups  # inputs: 16, 64, 128 channels
    assert all(n.epsilon == 1e-5 for n in norm1s)


def test_batch_norm_is_pytorch_momentum_converted():
    backbone = backbones.WideResNet(depth=10, width=1, norm="batch")
    backbone.build((None, 8, 8, 3))
    norms = [backbone.head_norm] + [n for b in backbone.blocks for n in (b.norm1, b.norm2)]
    for norm in norms:
        assert isinstance(norm, keras.layers.BatchNormalization)
        assert norm.momentum == pytest.approx(0.1)
        assert norm.epsilon == pytest.approx(1e-5)
    # running = 0.1 * running + 0.9 * batch (PyTorch momentum=0.9).
    features = _images((8, 4, 4, backbone.feature_dim)) + 0.5
    backbone.head_norm(features, training=True)
    np.testing.assert_allclose(
        _numpy(backbone.head_norm.moving_mean),
        0.9 * features.mean(axis=(0, 1, 2)),
        rtol=1e-4,
        atol=1e-6,
    )


def test_no_norm_has_no_norm_layers():
    backbone = backbones.WideResNet(depth=10, width=1, norm="none")
    backbone.build((None, 8, 8, 3))
    assert backbone.norm is None and backbone.head_norm is None
    assert all(b.norm1 is None and b.norm2 is None for b in backbone.blocks)


# === Serialization ===


@pytest.mark.parametrize(
    "factory",
    [
        lambda: backbones.WideResNet(depth=10, width=2, norm="batch", dropout_rate=0.2),
        lambda: backbones.SmallCNN(filters=(4, 8), feature_dim=6, norm="layer"),
        lambda: backbones.SNResNet(
            filters=(8, 16),
            num_blocks=2,
            num_classes=3,
            dropout_rate=0.5,
            activation="swish",
            pooling="mean",
            downsample=(False, True),
        ),
    ],
)
def test_config_round_trip(factory):
    original = factory()
    x = _images((3, 8, 8, 2))
    _features(original, x)
    if getattr(original, "num_classes", None):  # make the label modulation matter
        for weight in original.weights:
            if "input_bias" in weight.path or "output_gain" in weight.path:
                weight.assign(weight + _images(weight.shape, seed=1))
    config = original.get_config()
    restored = original.__class__.from_config(config)
    assert restored.get_config() == config
    _features(restored, x)
    restored.set_weights(original.get_weights())
    np.testing.assert_allclose(_features(restored, x), _features(original, x), atol=1e-6)

    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(original))
    assert type(revived) is type(original) and revived.get_config() == config


def test_keras_file_round_trip(tmp_path):
    # norm1 and the shortcut of a block are created at build time: check they are saved.
    inputs = keras.Input((8, 8, 3))
    backbone = backbones.WideResNet(depth=10, width=2, norm="batch")
    model = keras.Model(inputs, backbone_layers.TorchDense(2)(backbone(inputs)))
    x = _images((4, 8, 8, 3))
    model(x, training=True)  # move the BatchNorm statistics away from their init
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(_numpy(restored(x)), _numpy(model(x)), atol=1e-6)


def test_fan_in_uniform_config():
    init = backbone_layers.FanInUniform(fan_in=27, seed=3)
    config = keras.initializers.serialize(init)
    revived = keras.initializers.deserialize(config)
    assert isinstance(revived, backbone_layers.FanInUniform) and revived.fan_in == 27
    values = _numpy(revived((1000,)))
    assert np.abs(values).max() <= 1 / math.sqrt(27)


# === Spectral norm ===


def _top_singular_value(kernel):
    kernel = _numpy(kernel)
    return np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]), compute_uv=False)[0]


def test_spectral_norm_converges_to_one():
    keras.utils.set_random_seed(0)
    conv = backbone_layers.SpectralConv2D(32, 3)
    x = _images((4, 8, 8, 16))
    conv(x)
    conv.kernel.assign(conv.kernel * 3.0)  # raw kernel far from norm 1
    assert abs(_top_singular_value(conv.kernel) - 1.0) > 0.5
    for _ in range(40):
        train_output = conv(x, training=True)
    assert _top_singular_value(conv.normalized_kernel()) == pytest.approx(1.0, abs=0.01)
    assert abs(_top_singular_value(conv.kernel) - 1.0) > 0.5  # the raw kernel is untouched

    # Inference mode neither updates the vector nor changes the result.
    vector = _numpy(conv.singular_vector)
    np.testing.assert_allclose(_numpy(conv(x)), _numpy(train_output), atol=1e-6)
    np.testing.assert_array_equal(_numpy(conv.singular_vector), vector)
    conv(x, training=True)
    assert not np.array_equal(_numpy(conv.singular_vector), vector)


def test_spectral_norm_gradient_flows_through_sigma():
    conv = backbone_layers.SpectralConv2D(4, 1, use_bias=False)
    x = _images((2, 3, 3, 4))
    conv(x)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = ops.sum(conv.normalized_kernel())
    grad = _numpy(tape.gradient(loss, conv.kernel.value))
    # d(sum(W / sigma))/dW != 1 / sigma everywhere once sigma depends on W.
    assert np.std(grad) > 1e-4


def test_clip_only_bounds_norm():
    conv = backbone_layers.SpectralConv2D(8, 3, clip_only=True)
    x = _images((2, 6, 6, 8))
    conv(x)
    conv.kernel.assign(conv.kernel * 0.01)
    small = _numpy(conv.kernel)
    for _ in range(5):
        conv(x, training=True)
    np.testing.assert_allclose(_numpy(conv.normalized_kernel()), small, rtol=1e-6)
    conv.kernel.assign(conv.kernel * 1e4)
    for _ in range(40):
        conv(x, training=True)
    assert _top_singular_value(conv.normalized_kernel()) == pytest.approx(1.0, abs=0.01)


def test_sn_resnet_normalizes_every_conv():
    backbone = backbones.SNResNet(filters=8, num_blocks=(1, 1), num_classes=2)
    backbone(_images((2, 8, 8, 3)), y=np.array([0, 1]))
    convs = [
        layer
        for layer in backbone._flatten_layers(include_self=False)
        if isinstance(layer, (keras.layers.Conv2D, backbone_layers.SpectralConv2D))
    ]
    assert len(convs) == 1 + 2 * 2 + 1  # stem, 2 convs per block, 1 bypass (8 -> 16)
    assert all(isinstance(conv, backbone_layers.SpectralConv2D) for conv in convs)


# === Conditional SNResNet ===


def test_conditional_sn_resnet_depends_on_labels():
    backbone = backbones.SNResNet(filters=8, num_blocks=(1, 1), num_classes=4)
    x = np.repeat(_images((1, 8, 8, 3)), 4, axis=0)
    labels = np.arange(4)
    # IGEBM initialisation: biases 0 and gains 1, so a fresh network ignores the label.
    fresh = _numpy(backbone(x, y=labels))
    np.testing.assert_allclose(fresh, np.repeat(fresh[:1], 4, axis=0), atol=1e-6)
    for weight in backbone.weights:
        if "input_bias" in weight.path or "output_gain" in weight.path:
            weight.assign(weight + 0.5 * _images(weight.shape, seed=2))
    for block in backbone.blocks:  # let the residual branch through (conv2 starts near 0)
        block.conv2.kernel.assign(_images(block.conv2.kernel.shape, seed=3))
    features = _numpy(backbone(x, y=labels))
    assert features.shape == (4, backbone.feature_dim)
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(features[i] - features[j]).max() > 1e-4
    # One-hot labels and the `labels` alias give the same result.
    one_hot = np.eye(4, dtype="float32")[labels]
    np.testing.assert_allclose(_numpy(backbone(x, y=one_hot)), features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_numpy(backbone(x, labels=labels)), features, atol=1e-6)


def test_sn_resnet_label_errors():
    x = _images((2, 8, 8, 3))
    with pytest.raises(ValueError, match="needs labels"):
        backbones.SNResNet(filters=4, num_classes=3)(x)
    with pytest.raises(ValueError, match="unconditional"):
        backbones.SNResNet(filters=4)(x, y=np.array([0, 1]))
    with pytest.raises(ValueError, match="not both"):
        backbones.SNResNet(filters=4, num_classes=3)(x, y=np.array([0, 1]), labels=[0, 1])


def test_sn_resnet_defaults_and_pooling():
    backbone = backbones.SNResNet()
    assert backbone.filters == (64, 128, 256) and backbone.feature_dim == 256
    summed = backbones.SNResNet(filters=4, num_blocks=(1,), downsample=False)
    averaged = backbones.SNResNet.from_config({**summed.get_config(), "pooling": "mean"})
    x = _images((2, 6, 6, 1))
    summed(x)
    averaged(x)
    averaged.set_weights(summed.get_weights())
    np.testing.assert_allclose(_numpy(summed(x)), 36 * _numpy(averaged(x)), rtol=1e-5)


def test_sn_resnet_convolutions_have_no_bias():
    # The official conv_block drops its bias (use_bias=False); only the per-class input biases
    # and output gains of the blocks are added.
    backbone = backbones.SNResNet(filters=8, num_blocks=(1, 1), num_classes=3)
    backbone(_images((2, 8, 8, 3)), y=np.array([0, 1]))
    names = sorted(w.path.split("/")[-1] for w in backbone.weights)
    assert not [n for n in names if "bias" in n and not n.startswith("input_bias")], names
    assert {n for n in names if n.startswith("input_bias")} == {"input_bias1", "input_bias2"}
    convs = [layer for layer in backbone._flatten_layers(include_self=False)
             if isinstance(layer, backbone_layers.SpectralConv2D)]
    assert len(convs) == 6 and not any(conv.use_bias for conv in convs)
    assert backbone.get_config()["use_bias"] is False
    with_bias = backbones.SNResNet(filters=8, num_blocks=(1, 1), use_bias=True)
    with_bias(_images((2, 8, 8, 3)))
    assert sum(w.path.endswith("/bias") for w in with_bias.weights) == 6


@pytest.mark.parametrize("num_classes", [None, 3])
def test_sn_resnet_relu_before_the_sum_pool(num_classes):
    # The official ResNet32 (conditional CIFAR) and the unconditional ResNet32Large apply
    # ReLU to the last block's output before the spatial sum; LeakyReLU would let negative
    # activations through.
    backbone = backbones.SNResNet(filters=4, num_blocks=(1,), downsample=False,
                                  num_classes=num_classes)
    x = _images((3, 6, 6, 2))
    y = None if num_classes is None else np.array([0, 1, 2])
    backbone(x, y=y)
    for weight in backbone.weights:  # a residual branch that lets negative values through
        if "conv2" in weight.path and weight.path.endswith("kernel"):
            weight.assign(_images(weight.shape, seed=4))
    h = backbone.stem(x)
    h = backbone_layers.apply_activation(h, "leaky_relu", 0.2)
    for block in backbone.blocks:
        h = block(h, y=y)
    last = _numpy(h)
    assert last.min() < 0  # the block ends in LeakyReLU, so negatives reach the head
    expected = np.maximum(last, 0.0).sum(axis=(1, 2))
    np.testing.assert_allclose(_numpy(backbone(x, y=y)), expected, rtol=1e-5, atol=1e-6)
    # The official conditional ResNet32Large's rule (head_activation=None): LeakyReLU again.
    if num_classes is not None:
        large = backbones.SNResNet.from_config({**backbone.get_config(),
                                                "head_activation": None})
        large(x, y=y)
        large.set_weights(backbone.get_weights())
        leaky = np.where(last > 0, last, 0.2 * last).sum(axis=(1, 2))
        np.testing.assert_allclose(_numpy(large(x, y=y)), leaky, rtol=1e-5, atol=1e-6)


# === Registry ===


def test_get_registry():
    assert isinstance(backbones.get("small_cnn"), backbones.SmallCNN)
    assert isinstance(backbones.get("sn_resnet", num_classes=10), backbones.SNResNet)
    wrn = backbones.get("WRN-16-8", norm="batch")
    assert (wrn.depth, wrn.width, wrn.norm, wrn.feature_dim) == (16, 8, "batch", 512)
    wrn = backbones.get("wrn", depth=22, width=3)
    assert (wrn.depth, wrn.width) == (22, 3)
    assert backbones.get("wrn-28-10").feature_dim == 640
    layer = backbones.SmallCNN()
    assert backbones.get(layer) is layer
    with pytest.raises(ValueError, match="Valid names: wrn, wrn-28-10, wrn-16-2"):
        backbones.get("resnet50")
    with pytest.raises(ValueError, match="fixes depth=28"):
        backbones.get("wrn-28-10", depth=16)


# === Argument validation ===


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: backbones.WideResNet(depth=27), r"6n \+ 4.*depth=27"),
        (lambda: backbones.WideResNet(depth=4), r"depth=4"),
        (lambda: backbones.WideResNet(width=0), r"positive integer.*width=0"),
        (lambda: backbones.WideResNet(norm="weight"), r"Unknown `norm`: 'weight'"),
        (lambda: backbones.WideResNet(dropout_rate=1.0), r"\[0, 1\).*dropout_rate=1.0"),
        (lambda: backbones.WideResNet(dropout_rate=-0.1), r"dropout_rate=-0.1"),
        (lambda: backbones.WideResNet(leaky_relu_slope=2), r"leaky_relu_slope=2"),
        (lambda: backbones.SmallCNN(filters=()), r"filters"),
        (lambda: backbones.SmallCNN(feature_dim=0), r"feature_dim=0"),
        (lambda: backbones.SmallCNN(norm="batchnorm"), r"Unknown `norm`"),
        (lambda: backbones.SNResNet(filters=(8, 16), num_blocks=(1, 1, 1)), r"num_blocks"),
        (lambda: backbones.SNResNet(filters=0), r"filters=0"),
        (lambda: backbones.SNResNet(num_classes=0), r"num_classes=0"),
        (lambda: backbones.SNResNet(activation="relu"), r"Unknown `activation`"),
        (lambda: backbones.SNResNet(pooling="max"), r"Unknown `pooling`"),
        (lambda: backbones.SNResNet(head_activation="tanh"), r"head_activation"),
        (lambda: backbones.SNResNet(downsample=(True,)), r"downsample"),
        (lambda: backbone_layers.SpectralConv2D(4, 3, power_iterations=0), r"power_iter"),
        (lambda: backbone_layers.FanInUniform(0), r"fan_in=0"),
    ],
)
def test_invalid_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_wrong_input_rank():
    with pytest.raises(ValueError, match="batch, height, width, channels"):
        backbones.WideResNet(depth=10, width=1).build((None, 8, 8))
