"""The Wide-ResNet variant used by JEM, JEM++, SADA-JEM and GMMC."""

import keras
from keras import ops

from keras_jem.backbones import layers as backbone_layers
from keras_jem.backbones.backbone import Backbone
from keras_jem.backbones.backbone import NamedConfig


@keras.saving.register_keras_serializable(package="keras_jem")
class WideResNetBlock(NamedConfig, keras.layers.Layer):
    """Pre-activation basic block of the JEM-family Wide-ResNet.

    norm1 -> LeakyReLU -> conv3x3 (stride 1) -> dropout -> norm2 -> LeakyReLU ->
    conv3x3 (stride `strides`) -> + shortcut(raw input). The shortcut is the identity, or a
    1x1 convolution with bias and stride `strides` when the shape changes.

    Padding follows PyTorch's `padding=1`: "same" for the stride-1 convolution and an explicit
    symmetric 1-pixel zero padding followed by a "valid" convolution for the strided one. (Keras
    "same" with stride 2 pads only bottom/right on even sizes: same output size, but the
    sampling grid would be shifted by one pixel relative to the 1x1 strided shortcut and to
    PyTorch.)

    Args:
        filters: output channels.
        strides: 1 or 2, applied by the second 3x3 convolution and the shortcut.
        norm: None, "batch", "group", "instance" or "layer".
        dropout_rate: dropout between the two convolutions.
        leaky_relu_slope: negative slope of the LeakyReLU activations.
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    >>> block = WideResNetBlock(32, strides=2)
    >>> block(np.zeros((2, 8, 8, 16), "float32")).shape
    (2, 4, 4, 32)
    """

    config_names = ("filters", "strides", "norm", "dropout_rate", "leaky_relu_slope")

    def __init__(
        self, filters, strides=1, norm=None, dropout_rate=0.0, leaky_relu_slope=0.2, **kwargs
    ):
        super().__init__(**kwargs)
        if strides not in (1, 2):
            raise ValueError(f"`strides` must be 1 or 2. Received: strides={strides!r}")
        self.filters = int(filters)
        self.strides = strides
        self.norm = backbone_layers.standardize_norm(norm)
        self.dropout_rate = backbone_layers.validate_dropout(dropout_rate)
        self.leaky_relu_slope = backbone_layers.validate_slope(leaky_relu_slope)

        self.norm1 = None
        self.conv1 = backbone_layers.TorchConv2D(self.filters, 3, padding="same", name="conv1")
        self.dropout = (
            keras.layers.Dropout(self.dropout_rate, name="dropout") if self.dropout_rate else None
        )
        self.norm2 = backbone_layers.get_norm_layer(self.norm, self.filters, name="norm2")
        self.conv2 = backbone_layers.TorchConv2D(
            self.filters,
            3,
            strides=strides,
            padding="same" if strides == 1 else "valid",
            name="conv2",
        )
        self.shortcut = None

    def build(self, input_shape):
        in_channels = input_shape[-1]
        # norm1 depends on the input width, known only now.
        # Created in build: they take this block's dtype policy (mixed precision), not the
        # global one at build time.
        self.norm1 = backbone_layers.get_norm_layer(self.norm, in_channels, name="norm1",
                                                    dtype=self.dtype_policy)
        if self.norm1 is not None:
            self.norm1.build(input_shape)
        self.conv1.build(input_shape)
        hidden_shape = self.conv1.compute_output_shape(input_shape)
        if self.norm2 is not None:
            self.norm2.build(hidden_shape)
        self.conv2.build(hidden_shape)
        if self.strides != 1 or in_channels != self.filters:
            self.shortcut = backbone_layers.TorchConv2D(
                self.filters, 1, strides=self.strides, padding="valid", name="shortcut",
                dtype=self.dtype_policy,
            )
            self.shortcut.build(input_shape)

    def call(self, inputs, training=False):
        slope = self.leaky_relu_slope
        h = inputs
        if self.norm1 is not None:
            h = self.norm1(h, training=training)
        h = ops.leaky_relu(h, negative_slope=slope)
        h = self.conv1(h)
        if self.dropout is not None:
            h = self.dropout(h, training=training)
        if self.norm2 is not None:
            h = self.norm2(h, training=training)
        h = ops.leaky_relu(h, negative_slope=slope)
        if self.strides != 1:
            h = backbone_layers.pad_like_pytorch(h)
        h = self.conv2(h)
        shortcut = inputs if self.shortcut is None else self.shortcut(inputs)
        return h + shortcut

    def compute_output_shape(self, input_shape):
        def down(size):
            if size is None or self.strides == 1:
                return size
            return (size + 1) // 2

        return (input_shape[0], down(input_shape[1]), down(input_shape[2]), self.filters)


@keras.saving.register_keras_serializable(package="keras_jem")
class WideResNet(Backbone):
    """Wide-ResNet backbone in the variant of the JEM-family reference code.

    Maps images (B, H, W, C) to features (B, 64 * width). Differences from the stock WRN
    (Zagoruyko & Komodakis, 2016), all taken from the JEM/JEM++/SADA-JEM/GMMC code:
    LeakyReLU(0.2) everywhere, the stride on the *second* conv of a block, convolutions with
    bias, optional normalisation (JEM: none), and PyTorch's default initialisation.

    Layout: stem 3x3 conv (16 channels, bias) -> 3 stages of n = (depth - 4) / 6
    `WideResNetBlock`s with widths 16k, 32k, 64k and strides 1, 2, 2 -> norm -> LeakyReLU ->
    global average pooling. For 32x32 inputs the final map is 8x8, so the global pool equals
    the references' `avg_pool2d(out, 8)`; other sizes work too. WRN-28-10 has about 36.5M
    parameters (the classification/energy heads live in the models, not here).

    Args:
        depth: total depth, 6n + 4 (28 for WRN-28-10).
        width: widening factor k (10 for WRN-28-10).
        norm: None/"none" (JEM, GMMC), "batch" (JEM++, SADA-JEM; momentum=0.1 and
            epsilon=1e-5, PyTorch's momentum=0.9 converted), "group" (GroupNormalization with
            the largest group count <= 32 dividing the channels: 32 for k >= 2, 16 for the
            16-channel stages), "instance" (one group per channel) or "layer" (one group).
        dropout_rate: dropout between the two convs of each block, in [0, 1).
        leaky_relu_slope: negative slope of every LeakyReLU (0.2 in the references).
        **kwargs: base `keras.layers.Layer` arguments.

    Attributes:
        feature_dim: 64 * width.

    Example:

    >>> backbone = WideResNet(depth=16, width=2)
    >>> features = backbone(np.zeros((2, 32, 32, 3), "float32"))  # (2, 128)
    >>> h = backbone.stem(np.zeros((2, 32, 32, 3), "float32"))  # (2, 32, 32, 16)
    >>> same = backbone.call_from_stem(h)
    """

    config_names = ("depth", "width", "norm", "dropout_rate", "leaky_relu_slope")

    def __init__(
        self, depth=28, width=10, norm=None, dropout_rate=0.0, leaky_relu_slope=0.2, **kwargs
    ):
        super().__init__(**kwargs)
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                "`depth` must be an integer of the form 6n + 4 with n >= 1 (e.g. 10, 16, 22, "
                f"28, 34, 40). Received: depth={depth!r}"
            )
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"`width` must be a positive integer. Received: width={width!r}")
        self.depth = depth
        self.width = width
        self.norm = backbone_layers.standardize_norm(norm)
        self.dropout_rate = backbone_layers.validate_dropout(dropout_rate)
        self.leaky_relu_slope = backbone_layers.validate_slope(leaky_relu_slope)
        self.blocks_per_stage = (depth - 4) // 6
        self.stage_filters = (16 * width, 32 * width, 64 * width)
        self.feature_dim = 64 * width

        self.stem_conv = backbone_layers.TorchConv2D(16, 3, padding="same", name="stem_conv")
        self.blocks = []
        for stage, (filters, stage_strides) in enumerate(zip(self.stage_filters, (1, 2, 2))):
            for index in range(self.blocks_per_stage):
                self.blocks.append(
                    WideResNetBlock(
                        filters,
                        strides=stage_strides if index == 0 else 1,
                        norm=self.norm,
                        dropout_rate=self.dropout_rate,
                        leaky_relu_slope=self.leaky_relu_slope,
                        name=f"stage{stage + 1}_block{index + 1}",
                    )
                )
        self.head_norm = backbone_layers.get_norm_layer(
            self.norm, self.feature_dim, name="head_norm"
        )

    def build_from_stem(self, shape):
        for block in self.blocks:
            block.build(shape)
            shape = block.compute_output_shape(shape)
        if self.head_norm is not None:
            self.head_norm.build(shape)

    def call_from_stem(self, h, training=False):
        """Runs the network from the stem output `h` to the features (B, feature_dim)."""
        for block in self.blocks:
            h = block(h, training=training)
        if self.head_norm is not None:
            h = self.head_norm(h, training=training)
        h = ops.leaky_relu(h, negative_slope=self.leaky_relu_slope)
        return ops.mean(h, axis=(1, 2))
