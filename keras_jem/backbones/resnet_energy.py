"""IGEBM's spectrally normalised ResNet energy backbone (Du & Mordatch, 2019)."""

import keras
from keras import ops

from keras_jem.backbones import layers as backbone_layers
from keras_jem.backbones.backbone import Backbone
from keras_jem.backbones.backbone import NamedConfig

HEAD_ACTIVATIONS = (None, "relu", "leaky_relu", "swish")
POOLINGS = ("sum", "mean")


def _per_example(table, y):
    """Rows of `table` (num_rows, C) selected by `y`, shaped (B or 1, 1, 1, C).

    `y` is None (unconditional: the single row), integer labels (B,), or one-hot / soft labels
    (B, num_rows) which are mixed linearly (as IGEBM's `label @ table`).
    """
    if y is None:
        rows = table[0:1]
    elif "int" in keras.backend.standardize_dtype(y.dtype):
        rows = ops.take(table, ops.reshape(y, (-1,)), axis=0)
    else:
        rows = ops.matmul(ops.cast(y, table.dtype), table)
    return ops.expand_dims(ops.expand_dims(rows, 1), 1)


@keras.saving.register_keras_serializable(package="keras_jem")
class SNResBlock(NamedConfig, keras.layers.Layer):
    """IGEBM residual block with spectrally normalised convolutions and label modulation.

    h = conv1(x + b1[y]) -> dropout -> act -> conv2(h + b2[y]) * g2[y];
    out = act(avg_pool_2x2(h + bypass(x))) (pooling only if `downsample`).

    `b1`, `b2` are additive input biases and `g2` a multiplicative output gain, one row per
    class when `num_classes` is set (FiLM-like conditioning driven by the label), a single
    shared row otherwise (IGEBM has them in the unconditional model too). They start at 0 and
    1, so a fresh conditional block ignores the label until trained. `bypass` is a 3x3
    spectrally normalised conv when the width changes, the identity otherwise. `conv2` starts
    near zero (N(0, 1e-10)) and is only scaled down when its spectral norm exceeds 1
    (`clip_only`), so every block starts close to the identity, as in IGEBM.

    Args:
        filters: output channels.
        downsample: whether to average-pool 2x2 after the residual sum.
        num_classes: None (unconditional) or the number of classes for label conditioning.
        activation: "leaky_relu" or "swish".
        leaky_relu_slope: negative slope of LeakyReLU.
        dropout_rate: dropout after the first convolution (IGEBM's large model: 0.5).
        power_iterations: power-iteration steps per training call of each convolution.
        use_bias: whether the convolutions add a bias (IGEBM's do not: False).
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    >>> block = SNResBlock(32, downsample=True, num_classes=10)
    >>> out = block(np.zeros((2, 8, 8, 16), "float32"), y=np.array([1, 2]))  # (2, 4, 4, 32)
    """

    config_names = (
        "filters", "downsample", "num_classes", "activation", "leaky_relu_slope",
        "dropout_rate", "power_iterations", "use_bias",
    )

    def __init__(
        self,
        filters,
        downsample=False,
        num_classes=None,
        activation="leaky_relu",
        leaky_relu_slope=0.2,
        dropout_rate=0.0,
        power_iterations=1,
        use_bias=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.downsample = bool(downsample)
        self.use_bias = bool(use_bias)
        self.num_classes = _validate_num_classes(num_classes)
        self.activation = backbone_layers.validate_activation(activation)
        self.leaky_relu_slope = backbone_layers.validate_slope(leaky_relu_slope)
        self.dropout_rate = backbone_layers.validate_dropout(dropout_rate)
        self.power_iterations = power_iterations

        self.conv1 = backbone_layers.SpectralConv2D(
            self.filters,
            3,
            padding="same",
            use_bias=self.use_bias,
            bias_initializer="zeros",
            power_iterations=power_iterations,
            name="conv1",
        )
        self.dropout = (
            keras.layers.Dropout(self.dropout_rate, name="dropout") if self.dropout_rate else None
        )
        self.conv2 = backbone_layers.SpectralConv2D(
            self.filters,
            3,
            padding="same",
            kernel_initializer=keras.initializers.RandomNormal(stddev=1e-10),
            use_bias=self.use_bias,
            bias_initializer="zeros",
            power_iterations=power_iterations,
            clip_only=True,
            name="conv2",
        )
        self.bypass = None

    def build(self, input_shape):
        in_channels = input_shape[-1]
        rows = self.num_classes or 1
        self.input_bias1 = self.add_weight(
            shape=(rows, in_channels), initializer="zeros", name="input_bias1"
        )
        self.input_bias2 = self.add_weight(
            shape=(rows, self.filters), initializer="zeros", name="input_bias2"
        )
        self.output_gain2 = self.add_weight(
            shape=(rows, self.filters), initializer="ones", name="output_gain2"
        )
        self.conv1.build(input_shape)
        hidden_shape = self.conv1.compute_output_shape(input_shape)
        self.conv2.build(hidden_shape)
        if in_channels != self.filters:
            self.bypass = backbone_layers.SpectralConv2D(
                self.filters,
                3,
                padding="same",
                use_bias=self.use_bias,
                bias_initializer="zeros",
                power_iterations=self.power_iterations,
                name="bypass",
                dtype=self.dtype_policy,  # created in build: follow this block's policy
            )
            self.bypass.build(input_shape)

    def call(self, inputs, y=None, training=False):
        act = self.activation
        slope = self.leaky_relu_slope
        h = self.conv1(inputs + _per_example(self.input_bias1, y), training=training)
        if self.dropout is not None:
            h = self.dropout(h, training=training)
        h = backbone_layers.apply_activation(h, act, slope)
        h = self.conv2(h + _per_example(self.input_bias2, y), training=training)
        h = h * _per_example(self.output_gain2, y)
        shortcut = inputs if self.bypass is None else self.bypass(inputs, training=training)
        h = h + shortcut
        if self.downsample:
            h = ops.average_pool(h, pool_size=2, strides=2, padding="valid")
        return backbone_layers.apply_activation(h, act, slope)

    def compute_output_shape(self, input_shape):
        def down(size):
            if size is None or not self.downsample:
                return size
            return size // 2

        return (input_shape[0], down(input_shape[1]), down(input_shape[2]), self.filters)


@keras.saving.register_keras_serializable(package="keras_jem")
class SNResNet(Backbone):
    """Spectrally normalised ResNet of IGEBM (Du & Mordatch, 2019), as a feature extractor.

    Maps images (B, H, W, C) and, for the conditional variant, labels `y` (alias `labels`) to
    features (B, feature_dim): `backbone(x, y=labels, training=...)`. The IGEBM model adds
    the (unnormalised, not spectrally normalised) Dense(1) energy head on top.

    Layout: stem 3x3 conv -> act -> stages of `SNResBlock`s with widths `filters` (int: doubled
    at each stage) -> head activation (ReLU) -> spatial sum (IGEBM) or mean pooling. As in the
    official code, the convolutions have no bias. Every convolution
    is spectrally normalised (`SpectralConv2D`: one power iteration per training-mode call; in
    inference mode the stored singular vector is used and not updated). The first block of
    each stage average-pools 2x2 when `downsample` is True for that stage, as in IGEBM's
    ResNet32/ResNet32Large. Defaults are small (64-128-256, one block per stage: 32x32 ->
    4x4, 8x8 -> 1x1). IGEBM's unconditional CIFAR-10 `ResNet32Large` is
    `SNResNet(filters=128, num_blocks=(3, 3, 3), dropout_rate=0.5)`; its conditional
    `ResNet32` is `SNResNet(filters=(128, 256, 256), num_blocks=(2, 2, 2), num_classes=10)`.

    With `num_classes`, every residual convolution gets a per-class additive bias on its input
    and the second one a per-class multiplicative gain on its output (see `SNResBlock`); they
    start at 0 and 1, so the features depend on the label only once trained.

    Args:
        filters: int base width (stage i has filters * 2**i channels) or a tuple of widths,
            one per stage.
        num_blocks: int or tuple with the number of blocks per stage.
        num_classes: None for an unconditional network, else the number of classes; `call`
            then needs `y`.
        activation: "leaky_relu" (IGEBM default) or "swish".
        leaky_relu_slope: negative slope of LeakyReLU (0.2, TF's default used by IGEBM).
        dropout_rate: dropout inside each block, in [0, 1).
        downsample: bool or tuple of bools, one per stage.
        pooling: "sum" (IGEBM; scales with the image area) or "mean".
        head_activation: activation before pooling: "relu" (the official ResNet32, conditional
            or not, and the unconditional ResNet32Large), or None for the official
            ResNet32Large's rule ("relu" when unconditional, `activation` when conditional).
        power_iterations: power-iteration steps per training-mode call.
        use_bias: whether the convolutions add a bias (the official code's do not: False;
            the per-class biases and gains of the blocks are separate weights).
        **kwargs: base `keras.layers.Layer` arguments.

    Attributes:
        feature_dim: the width of the last stage.

    Example:

    >>> backbone = SNResNet(filters=32, num_classes=10)
    >>> x = np.zeros((2, 32, 32, 3), "float32")
    >>> features = backbone(x, y=np.array([3, 7]))  # (2, 128)
    >>> same = backbone.call_from_stem(backbone.stem(x), y=np.array([3, 7]))
    """

    config_names = (
        "filters", "num_blocks", "num_classes", "activation", "leaky_relu_slope",
        "dropout_rate", "downsample", "pooling", "head_activation", "power_iterations",
        "use_bias",
    )

    # The spectrally normalised stem re-estimates its norm in training mode: not treated as a
    # fixed affine map by the proximal sampler.
    stem_is_affine = False

    def __init__(
        self,
        filters=64,
        num_blocks=(1, 1, 1),
        num_classes=None,
        activation="leaky_relu",
        leaky_relu_slope=0.2,
        dropout_rate=0.0,
        downsample=True,
        pooling="sum",
        head_activation="relu",
        power_iterations=1,
        use_bias=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.use_bias = bool(use_bias)
        num_stages = _num_stages(filters, num_blocks)
        self.filters = _per_stage(filters, num_stages, "filters", doubling=True)
        self.num_blocks = _per_stage(num_blocks, num_stages, "num_blocks")
        self.downsample = _per_stage_bools(downsample, num_stages)
        self.num_classes = _validate_num_classes(num_classes)
        self.activation = backbone_layers.validate_activation(activation)
        self.leaky_relu_slope = backbone_layers.validate_slope(leaky_relu_slope)
        self.dropout_rate = backbone_layers.validate_dropout(dropout_rate)
        if pooling not in POOLINGS:
            raise ValueError(f"Unknown `pooling`: {pooling!r}. Expected one of {POOLINGS}.")
        self.pooling = pooling
        if head_activation not in HEAD_ACTIVATIONS:
            raise ValueError(
                f"Unknown `head_activation`: {head_activation!r}. Expected one of "
                f"{HEAD_ACTIVATIONS} (None: 'relu' if unconditional, else `activation`)."
            )
        self.head_activation = head_activation
        self.power_iterations = power_iterations
        self.feature_dim = self.filters[-1]

        self.stem_conv = backbone_layers.SpectralConv2D(
            self.filters[0],
            3,
            padding="same",
            use_bias=self.use_bias,
            bias_initializer="zeros",
            power_iterations=power_iterations,
            name="stem_conv",
        )
        self.blocks = []
        for stage in range(num_stages):
            for index in range(self.num_blocks[stage]):
                self.blocks.append(
                    SNResBlock(
                        self.filters[stage],
                        downsample=self.downsample[stage] and index == 0,
                        num_classes=self.num_classes,
                        activation=self.activation,
                        leaky_relu_slope=self.leaky_relu_slope,
                        dropout_rate=self.dropout_rate,
                        power_iterations=power_iterations,
                        use_bias=self.use_bias,
                        name=f"stage{stage + 1}_block{index + 1}",
                    )
                )

    def build_from_stem(self, shape):
        for block in self.blocks:
            block.build(shape)
            shape = block.compute_output_shape(shape)

    def call_from_stem(self, h, y=None, training=False, labels=None):
        """Runs the network from the stem output `h` to the features (B, feature_dim).

        `labels` is an alias of `y`.
        """
        y = self._check_labels(_merge_label_args(y, labels))
        h = backbone_layers.apply_activation(h, self.activation, self.leaky_relu_slope)
        for block in self.blocks:
            h = block(h, y=y, training=training)
        head_activation = self.head_activation
        if head_activation is None:
            head_activation = "relu" if self.num_classes is None else self.activation
        if head_activation == "relu":
            h = ops.relu(h)
        else:
            h = backbone_layers.apply_activation(h, head_activation, self.leaky_relu_slope)
        if self.pooling == "sum":
            return ops.sum(h, axis=(1, 2))
        return ops.mean(h, axis=(1, 2))

    def call(self, inputs, y=None, training=None, labels=None):
        y = _merge_label_args(y, labels)
        return self.call_from_stem(self.stem(inputs, training=training), y=y, training=training)

    def _check_labels(self, y):
        if self.num_classes is None:
            if y is not None:
                raise ValueError(
                    "This SNResNet is unconditional (num_classes=None) but labels `y` were "
                    "given. Build it with `num_classes=...` for a class-conditional network."
                )
            return None
        if y is None:
            raise ValueError(
                f"This SNResNet is class-conditional (num_classes={self.num_classes}) and needs "
                "labels: call it as `backbone(x, y=labels)` with integer labels of shape "
                "(batch,) or one-hot/soft labels of shape (batch, num_classes)."
            )
        return ops.convert_to_tensor(y)


def _merge_label_args(y, labels):
    if labels is None:
        return y
    if y is not None:
        raise ValueError("Pass the labels either as `y` or as `labels`, not both.")
    return labels


def _validate_num_classes(num_classes):
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            "`num_classes` must be None (unconditional) or a positive integer. "
            f"Received: num_classes={num_classes!r}"
        )
    return num_classes


def _num_stages(filters, num_blocks):
    for value in (filters, num_blocks):
        if isinstance(value, (list, tuple)):
            return len(value)
    return 3


def _per_stage(value, num_stages, name, doubling=False):
    if isinstance(value, (list, tuple)):
        values = tuple(value)
    elif doubling:
        values = tuple(value * 2**stage for stage in range(num_stages)) if _is_pos(value) else ()
    else:
        values = (value,) * num_stages
    if len(values) != num_stages or not values or not all(_is_pos(v) for v in values):
        raise ValueError(
            f"`{name}` must be a positive integer or a non-empty tuple of positive integers with "
            f"one entry per stage ({num_stages} stages). Received: {name}={value!r}"
        )
    return values


def _per_stage_bools(value, num_stages):
    if isinstance(value, bool):
        return (value,) * num_stages
    if isinstance(value, (list, tuple)) and len(value) == num_stages:
        return tuple(bool(v) for v in value)
    raise ValueError(
        "`downsample` must be a bool or a tuple of bools with one entry per stage "
        f"({num_stages} stages). Received: downsample={value!r}"
    )


def _is_pos(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
