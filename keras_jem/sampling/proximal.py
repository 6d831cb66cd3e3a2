"""JEM++'s proximal (YOPO-style) clipped Langevin sampler (PYLD)."""

import keras
import tensorflow as tf

from keras_jem.sampling import noise
from keras_jem.sampling.sampler import Sampler
from keras_jem.sampling.sampler import _check_positive
from keras_jem.sampling.sampler import _check_range


@keras.saving.register_keras_serializable(package="keras_jem")
class ProximalSGLD(Sampler):
    """JEM++'s proximal sampler: few full gradients, many cheap clipped steps through the stem.

    For each of `num_steps` outer steps (JEM++ "M"):

    1. one forward/backward of the whole network gives `p = dE/dh`, the energy gradient with
       respect to the stem output `h = stem(x)`;
    2. `inner_steps` ("N") updates differentiate only the stem:
       `x <- clip(x - step_size * clip(grad_x <stem(x), p>, -gradient_clip, gradient_clip),
       *clip_range)`;
    3. optional Gaussian noise (`noise_scale`, 0 in the paper) after the inner loop.

    The target may expose `stem(x)` and `energy_from_stem(h, y=None, training=False)` (a keras-jem
    model does when its backbone has `stem` / `call_from_stem`, see `supports_stem`). A target
    without them gets the general path: the stem is taken to be the identity (affine), so the
    inner direction is the clipped input gradient of the energy at the start of the outer step.

    When the target's stem is affine (`target.stem_is_affine`: one convolution, as in every
    keras-jem backbone), `grad_x <stem(x), p> = J_stem^T p = grad_x E(x)` at the start of the
    outer step, whatever x the inner step is at: the inner direction is then computed once per
    outer step, by one input-gradient pass of the whole network, and the inner steps cost only
    the clipped update. The samples are the same as re-differentiating the stem at every inner
    step (the JEM++ code's way), which is what a non-affine stem gets.

    Args:
        num_steps: outer steps M (JEM++: 10 or 20).
        inner_steps: inner steps N per outer step (JEM++: 5).
        step_size: inner step size (JEM++ `pyld_lr`: 0.2).
        gradient_clip: per-element clip of the inner gradient (JEM++: 1).
        clip_range: box for x (JEM++: the data range (-1, 1)).
        noise_scale: Gaussian noise per outer step (JEM++: 0).

    Example:

    >>> sampler = ProximalSGLD(num_steps=10, inner_steps=5, step_size=0.2)
    >>> samples = sampler(model, x_init, seed=tf.constant([1, 2], "int64"), training=True)
    """

    config_names = Sampler.config_names + (
        "inner_steps",
        "step_size",
        "gradient_clip",
        "clip_range",
        "noise_scale",
    )

    def __init__(
        self,
        num_steps=10,
        inner_steps=5,
        step_size=0.2,
        gradient_clip=1.0,
        clip_range=(-1.0, 1.0),
        noise_scale=0.0,
    ):
        super().__init__(num_steps=num_steps)
        if int(inner_steps) != inner_steps or inner_steps < 1:
            raise ValueError(
                f"`inner_steps` must be a positive integer. Received: inner_steps={inner_steps}"
            )
        self.inner_steps = int(inner_steps)
        self.step_size = _check_positive("step_size", step_size)
        self.gradient_clip = _check_positive(
            "gradient_clip", gradient_clip, allow_zero=False, allow_none=True
        )
        self.clip_range = _check_range(clip_range)
        self.noise_scale = _check_positive("noise_scale", noise_scale)

    def _inner_update(self, x, direction):
        if self.gradient_clip is not None:
            direction = tf.clip_by_value(direction, -self.gradient_clip, self.gradient_clip)
        x = x - self.step_size * direction
        if self.clip_range is not None:
            x = tf.clip_by_value(x, *self.clip_range)
        return x

    def __call__(self, target, x, y=None, seed=None, training=False, num_steps=None):
        num_steps = self.num_steps if num_steps is None else num_steps
        x = tf.stop_gradient(tf.convert_to_tensor(x, tf.float32))
        if seed is None:
            seed = tf.random.uniform((2,), maxval=2**31 - 1, dtype=tf.int64)
        # An affine stem's inner gradient does not depend on x (see the class docstring).
        has_stem = _supports_stem(target) and not getattr(target, "stem_is_affine", False)

        def outer(i, x):
            if has_stem:
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    stem_output = target.stem(x)
                    tape.watch(stem_output)
                    total = tf.reduce_sum(
                        tf.cast(target.energy_from_stem(stem_output, y=y, training=training),
                                tf.float32)
                    )
                stem_gradient = tf.stop_gradient(tape.gradient(total, stem_output))

                def inner(j, x):
                    with tf.GradientTape(watch_accessed_variables=False) as inner_tape:
                        inner_tape.watch(x)
                        linear = tf.reduce_sum(
                            tf.cast(target.stem(x), tf.float32) * tf.cast(stem_gradient, tf.float32)
                        )
                    return j + 1, self._inner_update(x, inner_tape.gradient(linear, x))

            else:
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(x)
                    total = tf.reduce_sum(
                        tf.cast(target.energy(x, y=y, training=training), tf.float32))
                input_gradient = tf.stop_gradient(tape.gradient(total, x))

                def inner(j, x):
                    return j + 1, self._inner_update(x, input_gradient)

            _, x = tf.while_loop(
                lambda j, _: j < self.inner_steps, inner, (tf.constant(0), x),
                parallel_iterations=1,
            )
            if self.noise_scale > 0:
                x = x + self.noise_scale * tf.random.stateless_normal(
                    tf.shape(x), noise.fold_in(seed, i), dtype=x.dtype
                )
                if self.clip_range is not None:
                    x = tf.clip_by_value(x, *self.clip_range)
            return i + 1, tf.stop_gradient(x)

        _, x = tf.while_loop(
            lambda i, _: i < num_steps, outer, (tf.constant(0), x), parallel_iterations=1
        )
        return tf.stop_gradient(x)


def _supports_stem(target):
    """Whether `target` has a usable stem (its `supports_stem`, else both methods exist)."""
    supported = getattr(target, "supports_stem", None)
    if supported is not None:
        return bool(supported)
    return hasattr(target, "stem") and hasattr(target, "energy_from_stem")
