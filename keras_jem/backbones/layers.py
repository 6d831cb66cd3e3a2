"""Building blocks shared by the backbones.

- `FanInUniform`: PyTorch's default bias initialiser, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
- `TorchConv2D`, `TorchDense`: `Conv2D`/`Dense` with PyTorch's default initialisation
  (kernel U(+-1/sqrt(fan_in)) via `VarianceScaling(1/3, "fan_in", "uniform")`, bias
  U(+-1/sqrt(fan_in)) with the fan-in read from the input shape at build time).
- `SpectralConv2D`: a convolution whose kernel is divided by its largest singular value,
  estimated by power iteration (Miyato et al., 2018), as in IGEBM.
- `get_norm_layer`: the normalisation choices of the JEM-family Wide-ResNet.
"""

import math

import keras
from keras import ops

NORMS = ("none", "batch", "group", "instance", "layer")
ACTIVATIONS = ("leaky_relu", "swish")


def pytorch_kernel_initializer(seed=None):
    """Kernel initialiser equal to PyTorch's default for `Conv2d` and `Linear`.

    PyTorch uses Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    which is `VarianceScaling(scale=1/3, mode="fan_in", distribution="uniform")`.
    """
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed
    )


@keras.saving.register_keras_serializable(package="keras_jem")
class FanInUniform(keras.initializers.RandomUniform):
    """Uniform initialiser on [-1/sqrt(fan_in), 1/sqrt(fan_in)] (PyTorch's default bias init).

    A bias vector does not know its layer's fan-in, so it is passed explicitly. `TorchConv2D`
    and `TorchDense` create it at build time from the input shape.

    Args:
        fan_in: positive int, the number of inputs of one output unit
            (kernel_height * kernel_width * input_channels for a convolution).
        seed: optional int or `keras.random.SeedGenerator`.

    Example:

    >>> init = FanInUniform(fan_in=27)
    >>> values = init((16,))  # all in [-1/sqrt(27), 1/sqrt(27)]
    """

    def __init__(self, fan_in, seed=None):
        if not isinstance(fan_in, int) or isinstance(fan_in, bool) or fan_in < 1:
            raise ValueError(f"`fan_in` must be a positive integer. Received: fan_in={fan_in!r}")
        limit = 1.0 / math.sqrt(fan_in)
        super().__init__(minval=-limit, maxval=limit, seed=seed)
        self.fan_in = fan_in

    def get_config(self):
        config = super().get_config()
        config.pop("minval", None)
        config.pop("maxval", None)
        config["fan_in"] = self.fan_in
        return config


@keras.saving.register_keras_serializable(package="keras_jem")
class TorchConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` initialised like PyTorch's `nn.Conv2d`.

    Identical to `keras.layers.Conv2D` except for the defaults: `kernel_initializer` is
    `VarianceScaling(1/3, "fan_in", "uniform")` and, when `bias_initializer` is left to
    `None`, the bias is drawn from U(+-1/sqrt(fan_in)) with fan_in = kh * kw * input_channels
    (known at build time). Both match PyTorch's defaults, which the JEM-family reference code
    relies on (its custom init is defined but never applied).

    Args:
        filters: number of output channels.
        kernel_size: int or tuple of 2 ints.
        kernel_initializer: defaults to the PyTorch-like `VarianceScaling`.
        bias_initializer: defaults to `FanInUniform(fan_in)`.
        **kwargs: any other `keras.layers.Conv2D` argument.

    Example:

    >>> conv = TorchConv2D(16, 3, padding="same")
    >>> y = conv(np.zeros((2, 8, 8, 3), "float32"))  # bias ~ U(+-1/sqrt(27))
    """

    def __init__(
        self, filters, kernel_size, kernel_initializer=None, bias_initializer=None, **kwargs
    ):
        if kernel_initializer is None:
            kernel_initializer = pytorch_kernel_initializer()
        super().__init__(
            filters,
            kernel_size,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            **kwargs,
        )

    def build(self, input_shape):
        if self.use_bias and self.bias_initializer is None:
            input_channels = input_shape[-1]
            fan_in = int(math.prod(self.kernel_size) * input_channels // self.groups)
            self.bias_initializer = FanInUniform(fan_in)
        super().build(input_shape)


@keras.saving.register_keras_serializable(package="keras_jem")
class TorchDense(keras.layers.Dense):
    """`keras.layers.Dense` initialised like PyTorch's `nn.Linear`.

    Kernel U(+-1/sqrt(fan_in)) (`VarianceScaling(1/3, "fan_in", "uniform")`) and, when
    `bias_initializer` is left to `None`, bias U(+-1/sqrt(fan_in)) with fan_in the input
    dimension. Useful for classifier/energy heads that must match the PyTorch references.

    Args:
        units: output dimension.
        kernel_initializer: defaults to the PyTorch-like `VarianceScaling`.
        bias_initializer: defaults to `FanInUniform(fan_in)`.
        **kwargs: any other `keras.layers.Dense` argument.

    Example:

    >>> head = TorchDense(10)
    >>> logits = head(np.zeros((2, 640), "float32"))
    """

    def __init__(self, units, kernel_initializer=None, bias_initializer=None, **kwargs):
        if kernel_initializer is None:
            kernel_initializer = pytorch_kernel_initializer()
        super().__init__(
            units,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            **kwargs,
        )

    def build(self, input_shape):
        if self.use_bias and self.bias_initializer is None:
            self.bias_initializer = FanInUniform(int(input_shape[-1]))
        super().build(input_shape)


def _l2_normalize(x):
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x)), 1e-24))


@keras.saving.register_keras_serializable(package="keras_jem")
class SpectralConv2D(keras.layers.Layer):
    """2D convolution (NHWC) with a spectrally normalised kernel.

    The kernel W (reshaped to a (kh * kw * c_in, c_out) matrix) is divided by an estimate of
    its largest singular value sigma(W), obtained by power iteration with a persistent
    (non-trainable) right singular vector `singular_vector`:

    - `training=True`: `power_iterations` steps update the vector (and store it), then
      sigma = ||W u||; the gradient flows through sigma with `u` held constant, as in
      Miyato et al. (2018), PyTorch's `spectral_norm` and IGEBM's TF1 code.
    - `training=False` (inference, or sampling in inference mode): the vector is not updated;
      sigma is computed from the stored vector the same way, so right after a training call
      both modes give the same output. Before any training call the vector is random and
      sigma under-estimates the true norm: run a few training-mode calls (or train) first.
      (IGEBM's TF1 graph updates the vector on every forward pass, sampling included.)

    Keras' own `keras.layers.SpectralNormalization` is not used: in training mode it overwrites
    the trainable kernel in place with W / sigma (no gradient through sigma), and in inference
    mode it uses whatever the kernel was last set to, which is no longer normalised after an
    optimizer step.

    Initialisation defaults to PyTorch's (kernel and bias U(+-1/sqrt(fan_in))); the scale of
    the kernel does not matter once normalised.

    Args:
        filters: number of output channels.
        kernel_size: int or tuple of 2 ints.
        strides: int or tuple of 2 ints.
        padding: "same" or "valid".
        use_bias: whether to add a bias after the convolution.
        kernel_initializer: defaults to `VarianceScaling(1/3, "fan_in", "uniform")`.
        bias_initializer: defaults to `FanInUniform(fan_in)`.
        power_iterations: power-iteration steps per training call (IGEBM: 1).
        clip_only: if True divide by max(sigma, 1) instead of sigma, so the spectral norm is
            bounded by 1 rather than set to 1 (IGEBM's `lower_bound` mode, used with a
            near-zero initialisation for the last conv of each residual block).
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    >>> conv = SpectralConv2D(32, 3)
    >>> y = conv(np.random.normal(size=(4, 8, 8, 3)).astype("float32"), training=True)
    >>> w = conv.normalized_kernel()  # largest singular value ~= 1 after a few calls
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="same",
        use_bias=True,
        kernel_initializer=None,
        bias_initializer=None,
        power_iterations=1,
        clip_only=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(power_iterations, int) or power_iterations < 1:
            raise ValueError(
                "`power_iterations` must be a positive integer. "
                f"Received: power_iterations={power_iterations!r}"
            )
        if padding not in ("same", "valid"):
            raise ValueError(f"`padding` must be 'same' or 'valid'. Received: {padding!r}")
        self.filters = int(filters)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.padding = padding
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or pytorch_kernel_initializer()
        )
        self.bias_initializer = (
            None if bias_initializer is None else keras.initializers.get(bias_initializer)
        )
        self.power_iterations = power_iterations
        self.clip_only = bool(clip_only)

    def build(self, input_shape):
        in_channels = int(input_shape[-1])
        self.kernel = self.add_weight(
            shape=self.kernel_size + (in_channels, self.filters),
            initializer=self.kernel_initializer,
            name="kernel",
        )
        if self.use_bias:
            if self.bias_initializer is None:
                self.bias_initializer = FanInUniform(math.prod(self.kernel_size) * in_channels)
            self.bias = self.add_weight(
                shape=(self.filters,), initializer=self.bias_initializer, name="bias"
            )
        self.singular_vector = self.add_weight(
            shape=(1, self.filters),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
            trainable=False,
            name="singular_vector",
            # The power iteration does not depend on the inputs, so every replica computes the
            # same vector; keep the first replica's.
            aggregation="only_first_replica",
        )

    def normalized_kernel(self, training=False):
        """Returns W / sigma(W) (or W / max(sigma, 1) with `clip_only`).

        With `training=True`, first runs `power_iterations` power-iteration steps and stores
        the new singular vector.
        """
        kernel = self.kernel
        matrix = ops.reshape(kernel, (-1, self.filters))
        u = _l2_normalize(ops.cast(self.singular_vector, matrix.dtype))
        if training:
            for _ in range(self.power_iterations):
                v = _l2_normalize(ops.matmul(u, ops.transpose(matrix)))
                u = _l2_normalize(ops.matmul(v, matrix))
            u = ops.stop_gradient(u)
            self.singular_vector.assign(ops.cast(u, self.singular_vector.dtype))
        u = ops.stop_gradient(u)
        sigma = ops.sqrt(ops.sum(ops.square(ops.matmul(u, ops.transpose(matrix)))))
        if self.clip_only:
            sigma = ops.maximum(sigma, 1.0)
        else:
            sigma = ops.maximum(sigma, 1e-12)
        return kernel / sigma

    def call(self, inputs, training=False):
        kernel = ops.cast(self.normalized_kernel(training=training), inputs.dtype)
        outputs = ops.conv(inputs, kernel, strides=self.strides, padding=self.padding)
        if self.use_bias:
            outputs = outputs + ops.cast(ops.reshape(self.bias, (1, 1, 1, -1)), inputs.dtype)
        return outputs

    def compute_output_shape(self, input_shape):
        spatial = []
        for size, kernel, stride in zip(input_shape[1:3], self.kernel_size, self.strides):
            if size is None:
                spatial.append(None)
            elif self.padding == "same":
                spatial.append((size + stride - 1) // stride)
            else:
                spatial.append((size - kernel) // stride + 1)
        return (input_shape[0], *spatial, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": (
                    None
                    if self.bias_initializer is None
                    else keras.initializers.serialize(self.bias_initializer)
                ),
                "power_iterations": self.power_iterations,
                "clip_only": self.clip_only,
            }
        )
        return config


def _pair(value, name):
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v >= 1 for v in value):
        raise ValueError(
            f"`{name}` must be an int or a tuple of 2 positive ints. Received: {name}={value}"
        )
    return value


def standardize_norm(norm):
    """Returns `None` or one of "batch", "group", "instance", "layer"; raises on others."""
    if norm is None:
        return None
    if isinstance(norm, str) and norm.lower() in NORMS:
        norm = norm.lower()
        return None if norm == "none" else norm
    raise ValueError(
        f"Unknown `norm`: {norm!r}. Expected one of None, {', '.join(repr(n) for n in NORMS)}."
    )


def group_norm_groups(channels, max_groups=32):
    """Number of groups for `norm="group"`: the largest divisor of `channels` <= `max_groups`.

    For the Wide-ResNet widths 16k/32k/64k with k >= 2 this is 32 (the GroupNorm paper's
    default); for 16 channels (the stem width) it is 16.
    """
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def get_norm_layer(norm, channels, name=None, dtype=None):
    """Builds the normalisation layer for `norm` (see `standardize_norm`), or `None`.

    `dtype` is the layer's dtype policy (pass the parent's `dtype_policy` when it is created in
    `build`, so that it follows the parent's mixed-precision policy, not the global one).

    - "batch": `BatchNormalization(momentum=0.1, epsilon=1e-5)`, i.e. the references'
      PyTorch `BatchNorm2d(momentum=0.9)` (running = 0.1 * running + 0.9 * batch).
    - "group": `GroupNormalization(groups=group_norm_groups(channels), epsilon=1e-5)`.
    - "instance": `GroupNormalization(groups=channels)` (PyTorch `InstanceNorm2d(affine=True)`).
    - "layer": `GroupNormalization(groups=1)` (PyTorch `GroupNorm(1, channels)`).
    """
    norm = standardize_norm(norm)
    if norm is None:
        return None
    if norm == "batch":
        return keras.layers.BatchNormalization(momentum=0.1, epsilon=1e-5, name=name,
                                               dtype=dtype)
    groups = {"group": group_norm_groups(channels), "instance": channels, "layer": 1}[norm]
    return keras.layers.GroupNormalization(groups=groups, epsilon=1e-5, name=name, dtype=dtype)


def validate_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown `activation`: {activation!r}. Expected one of {ACTIVATIONS}.")
    return activation


def validate_slope(leaky_relu_slope):
    if not isinstance(leaky_relu_slope, (int, float)) or not 0 <= leaky_relu_slope < 1:
        raise ValueError(
            "`leaky_relu_slope` must be a number in [0, 1). "
            f"Received: leaky_relu_slope={leaky_relu_slope!r}"
        )
    return float(leaky_relu_slope)


def validate_dropout(dropout_rate):
    if not isinstance(dropout_rate, (int, float)) or not 0 <= dropout_rate < 1:
        raise ValueError(
            f"`dropout_rate` must be a number in [0, 1). Received: dropout_rate={dropout_rate!r}"
        )
    return float(dropout_rate)


def apply_activation(x, activation, leaky_relu_slope):
    if activation == "swish":
        return ops.silu(x)
    return ops.leaky_relu(x, negative_slope=leaky_relu_slope)


def pad_like_pytorch(x, padding=1):
    """Symmetric spatial zero padding (PyTorch `padding=1`) for NHWC tensors."""
    return ops.pad(x, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
