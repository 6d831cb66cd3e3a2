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


class Backbone(keras.layers.Layer):
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
