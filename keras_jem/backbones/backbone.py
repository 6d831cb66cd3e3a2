"""The backbone contract, and the base class of keras-jem's own backbones.

Any Keras layer or model that maps images `(batch, height, width, channels)` to one feature
vector per image `(batch, features)` is a backbone: a functional or `Sequential` model, a
`keras.applications` network with `include_top=False, pooling="avg"`, or a subclass of
`Backbone`. The energy models infer the feature size from the output shape at `build`.

Optional capabilities, detected by the models (`supports_stem`) and used when present:

- `stem(x, training=False)` and `call_from_stem(h, training=False)` with
  `backbone(x) == backbone.call_from_stem(backbone.stem(x))`: JEM++'s proximal sampler then
  differentiates the stem alone in its inner steps;
- `stem_is_affine = True` when the stem is affine in x (one convolution): the proximal
  sampler then computes its inner direction once per outer step;
- `num_classes` (not None): a class-conditional backbone called as `backbone(x, labels=y)`
  (IGEBM).

A backbone without a stem gets the general path of every sampler (full input gradients).
"""

import keras
import tensorflow as tf


def check_image_shape(input_shape, owner):
    """`input_shape` as a tuple of rank 4, or a clear error naming `owner`."""
    input_shape = tuple(input_shape)
    if len(input_shape) != 4:
        raise ValueError(
            f"{owner} expects images of shape (batch, height, width, channels). "
            f"Received input_shape={input_shape}"
        )
    return input_shape


def supports_stem(backbone):
    """Whether `backbone` exposes `stem` and `call_from_stem` (the proximal shortcut)."""
    return callable(getattr(backbone, "stem", None)) and callable(
        getattr(backbone, "call_from_stem", None))


def check_backbone(backbone):
    """`backbone` (deserialised if a config dict), or a clear error if it is not a layer."""
    if isinstance(backbone, dict):
        backbone = keras.saving.deserialize_keras_object(backbone)
    if not isinstance(backbone, keras.layers.Layer):
        raise ValueError(  # noqa: TRY004 (the models' constructors raise ValueError)
            "`backbone` must be a Keras layer or model mapping images (batch, height, width, "
            "channels) to features (batch, features), e.g. keras_jem.backbones.WideResNet(...), "
            "a keras.Sequential or functional model, or keras.applications.ResNet50V2("
            f"include_top=False, pooling='avg', weights=None). Received: {backbone!r}"
        )
    return backbone


def output_feature_dim(backbone, call, image_shape):
    """Runs `call(images)` (the backbone) on one zero image; returns the feature size.

    Creates the backbone's variables, checks that its output is `(batch, features)` and that it
    is differentiable with respect to the images (the samplers follow input gradients), and
    raises an error that names the fix otherwise.

    Args:
        backbone: the backbone (for its name and optional `feature_dim`).
        call: function of the images returning the features (a conditional model passes
            labels).
        image_shape: `(height, width, channels)`.
    """
    input_shape = (None,) + tuple(image_shape)
    zeros = tf.zeros((1,) + tuple(image_shape))
    with tf.GradientTape() as tape:
        tape.watch(zeros)
        features = call(zeros)
    shape = tuple(features.shape)
    if len(shape) != 2 or shape[-1] is None:
        raise ValueError(
            f"The backbone {backbone.name!r} maps images of shape {input_shape} to outputs of "
            f"shape {shape}, but an energy model needs one feature vector per image: "
            "(batch, features). Add global pooling at its end, e.g. keras.applications."
            "ResNet50V2(include_top=False, pooling='avg'), or "
            "keras.layers.GlobalAveragePooling2D() / keras.layers.Flatten() as its last layer."
        )
    feature_dim = int(shape[-1])
    declared = getattr(backbone, "feature_dim", None)
    if declared is not None and int(declared) != feature_dim:
        raise ValueError(
            f"The backbone {backbone.name!r} declares feature_dim={declared} but outputs "
            f"{feature_dim} features."
        )
    if tape.gradient(features, zeros) is None:
        raise ValueError(
            f"The backbone {backbone.name!r} is not differentiable with respect to its input "
            "images, which the samplers need (they follow the energy's input gradient). Remove "
            "the layers that cut the gradient (integer casts, argmax, stop_gradient, lookups) "
            "or move them into the data pipeline."
        )
    return feature_dim


class NamedConfig:
    """Mixin for layers: `get_config` from the constructor arguments named in `config_names`.

    The samplers and energy models build their configs the same way. Each name is a constructor
    argument stored as the attribute of that name; a subclass extends its parent's tuple.

    Example:

    >>> class Scale(NamedConfig, keras.layers.Layer):
    ...     config_names = ("factor",)
    ...     def __init__(self, factor=2.0, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.factor = factor
    >>> Scale(3.0).get_config()["factor"]
    3.0
    """

    config_names = ()

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self.config_names})
        return config


class Backbone(NamedConfig, keras.layers.Layer):
    """Base class of keras-jem's backbones: a stem convolution, then the rest of the network.

    Subclasses create `self.stem_conv` (the first convolution) and `self.feature_dim` in
    `__init__`, and implement `build_from_stem(shape)` (create the variables after the stem,
    given the stem's output shape) and `call_from_stem(h, training=False)`. This class supplies
    `build`, `stem`, `call` and `compute_output_shape`, so that
    `backbone(x) == backbone.call_from_stem(backbone.stem(x))` holds by construction.

    Args:
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    >>> class Tiny(Backbone):
    ...     def __init__(self, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.feature_dim = 8
    ...         self.stem_conv = keras.layers.Conv2D(8, 3, padding="same")
    ...     def build_from_stem(self, shape):
    ...         pass
    ...     def call_from_stem(self, h, training=False):
    ...         return keras.ops.mean(keras.ops.leaky_relu(h, 0.2), axis=(1, 2))
    >>> Tiny()(np.zeros((2, 8, 8, 1), "float32")).shape
    (2, 8)
    """

    # The stem is one convolution: affine in x (ProximalSGLD relies on it).
    stem_is_affine = True

    def build(self, input_shape):
        input_shape = check_image_shape(input_shape, self.__class__.__name__)
        self.stem_conv.build(input_shape)
        self.build_from_stem(self.stem_conv.compute_output_shape(input_shape))

    def build_from_stem(self, shape):
        """Creates the variables after the stem; `shape` is the stem's output shape."""
        raise NotImplementedError

    def stem(self, x, training=False):
        """Returns the output of the first convolution (batch, height, width, channels)."""
        if not self.built:
            self.build(tuple(x.shape))
        return self.stem_conv(x, training=training)

    def call_from_stem(self, h, training=False):
        """Runs the network from the stem output `h` to the features (batch, feature_dim)."""
        raise NotImplementedError

    def call(self, inputs, training=None):
        return self.call_from_stem(self.stem(inputs, training=training), training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.feature_dim)
