"""A small, fast CNN backbone for 8x8 digits, toy data and tests."""

import keras
from keras import ops

from keras_jem.backbones import layers as backbone_layers
from keras_jem.backbones.backbone import Backbone


@keras.saving.register_keras_serializable(package="keras_jem")
class SmallCNN(Backbone):
    """Small pre-activation CNN with the same contract as `WideResNet`.

    Layout: stem 3x3 conv (`filters[0]` channels) -> for each entry f of `filters`:
    [norm -> LeakyReLU -> 3x3 conv (f channels) -> norm -> LeakyReLU -> 3x3 conv (f channels,
    stride 1 for the first stage and 2 for the others)] -> norm -> LeakyReLU -> global average
    pooling -> optional Dense(`feature_dim`) + LeakyReLU. Convolutions and the dense layer use
    PyTorch's default initialisation, strided convolutions PyTorch's symmetric padding. All
    activations are LeakyReLU so the input gradients used by SGLD are never exactly zero.

    With the defaults (8x8 -> 8x8 -> 4x4 -> 2x2 for digits, about 0.3M parameters) a plain
    softmax classifier (features -> Dense(10), Adam 3e-3, batch 64, 15 epochs) reaches 97-98%
    test accuracy on scikit-learn's 8x8 digits (80/20 split).

    Args:
        filters: tuple of channel counts, one per stage (each stage after the first halves the
            spatial size).
        feature_dim: size of the dense layer after pooling, or None to return the pooled
            `filters[-1]`-dimensional vector directly.
        norm: None, "batch", "group", "instance" or "layer" (see `WideResNet`).
        dropout_rate: dropout before the final dense layer, in [0, 1).
        leaky_relu_slope: negative slope of the LeakyReLU activations.
        **kwargs: base `keras.layers.Layer` arguments.

    Attributes:
        feature_dim: the output dimension (`feature_dim`, or `filters[-1]` when it is None).

    Example:

    >>> backbone = SmallCNN()
    >>> features = backbone(np.zeros((4, 8, 8, 1), "float32"))  # (4, 128)
    >>> same = backbone.call_from_stem(backbone.stem(np.zeros((4, 8, 8, 1), "float32")))
    """

    config_names = ("filters", "norm", "dropout_rate", "leaky_relu_slope")

    def __init__(
        self,
        filters=(32, 64, 128),
        feature_dim=128,
        norm=None,
        dropout_rate=0.0,
        leaky_relu_slope=0.2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(filters, int):
            filters = (filters,)
        filters = tuple(filters) if isinstance(filters, (list, tuple)) else None
        if not filters or not all(
            isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in filters
        ):
            raise ValueError(
                "`filters` must be a non-empty tuple of positive integers, one per stage. "
                f"Received: filters={filters!r}"
            )
        if feature_dim is not None and (not isinstance(feature_dim, int) or feature_dim < 1):
            raise ValueError(
                "`feature_dim` must be a positive integer or None (no dense layer). "
                f"Received: feature_dim={feature_dim!r}"
            )
        self.filters = filters
        self.norm = backbone_layers.standardize_norm(norm)
        self.dropout_rate = backbone_layers.validate_dropout(dropout_rate)
        self.leaky_relu_slope = backbone_layers.validate_slope(leaky_relu_slope)
        self.use_dense = feature_dim is not None
        self.feature_dim = feature_dim if self.use_dense else filters[-1]

        self.stem_conv = backbone_layers.TorchConv2D(
            filters[0], 3, padding="same", name="stem_conv"
        )
        self.norms = []
        self.convs = []
        in_channels = filters[0]
        for stage, out_channels in enumerate(filters):
            strided = stage > 0
            for index, conv_strides in enumerate((1, 2 if strided else 1)):
                name = f"stage{stage + 1}_conv{index + 1}"
                self.norms.append(
                    backbone_layers.get_norm_layer(self.norm, in_channels, name=name + "_norm")
                )
                self.convs.append(
                    backbone_layers.TorchConv2D(
                        out_channels,
                        3,
                        strides=conv_strides,
                        padding="same" if conv_strides == 1 else "valid",
                        name=name,
                    )
                )
                in_channels = out_channels
        self.head_norm = backbone_layers.get_norm_layer(self.norm, filters[-1], name="head_norm")
        self.dropout = (
            keras.layers.Dropout(self.dropout_rate, name="dropout") if self.dropout_rate else None
        )
        self.dense = (
            backbone_layers.TorchDense(feature_dim, name="dense") if self.use_dense else None
        )

    def build_from_stem(self, shape):
        batch = shape[0]
        for norm, conv in zip(self.norms, self.convs):
            if norm is not None:
                norm.build(shape)
            if conv.strides[0] != 1:
                shape = (shape[0], _padded(shape[1]), _padded(shape[2]), shape[3])
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
        if self.head_norm is not None:
            self.head_norm.build(shape)
        if self.dense is not None:
            self.dense.build((batch, self.filters[-1]))

    def call_from_stem(self, h, training=False):
        """Runs the network from the stem output `h` to the features (B, feature_dim)."""
        slope = self.leaky_relu_slope
        for norm, conv in zip(self.norms, self.convs):
            if norm is not None:
                h = norm(h, training=training)
            h = ops.leaky_relu(h, negative_slope=slope)
            if conv.strides[0] != 1:
                h = backbone_layers.pad_like_pytorch(h)
            h = conv(h)
        if self.head_norm is not None:
            h = self.head_norm(h, training=training)
        h = ops.leaky_relu(h, negative_slope=slope)
        h = ops.mean(h, axis=(1, 2))
        if self.dense is not None:
            if self.dropout is not None:
                h = self.dropout(h, training=training)
            h = ops.leaky_relu(self.dense(h), negative_slope=slope)
        return h

    def get_config(self):
        config = super().get_config()
        # `feature_dim` is the argument (None: no dense layer), not the attribute.
        config["feature_dim"] = self.feature_dim if self.use_dense else None
        return config


def _padded(size):
    return None if size is None else size + 2
