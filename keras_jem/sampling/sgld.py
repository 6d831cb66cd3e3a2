"""Stochastic gradient Langevin dynamics, as used by JEM, SADA-JEM and IGEBM."""

import keras
import numpy as np
import tensorflow as tf

from keras_jem.sampling import noise
from keras_jem.sampling.sampler import Sampler
from keras_jem.sampling.sampler import _check_positive
from keras_jem.sampling.sampler import _check_range


@keras.saving.register_keras_serializable(package="keras_jem")
class SGLD(Sampler):
    """SGLD with decoupled step size and noise (Welling & Teh; JEM's variant).

    Each step:

    ```
    g = grad_x sum_i E(x_i)                        # sum: the per-example step ignores batch size
    g = clip(g, -gradient_clip, gradient_clip)     # optional (SADA-JEM: 1, IGEBM: 0.01)
    x = x - step_size * g + noise_scale * N(0, I)
    x = clip(x, *clip_range)                       # optional box, e.g. the data range
    ```

    With `noise_first=True` (the official IGEBM code's order) the noise comes first and the
    gradient is taken at the noisy point:

    ```
    x = x + noise_scale * N(0, I)
    x = x - step_size * clip(grad_x sum_i E(x_i), -gradient_clip, gradient_clip)
    x = clip(x, *clip_range)
    ```

    JEM uses `step_size=1, noise_scale=0.01` and no clipping; SADA-JEM `num_steps=5, noise_scale=0,
    gradient_clip=1, clip_range=(-1, 1)`; IGEBM `num_steps=60, step_size=10, noise_scale=0.005,
    gradient_clip=0.01, noise_first=True` with x clipped to the data range [0, 1] (keras-jem's
    `IGEBM` uses the same chain rescaled to [-1, 1]). `noise_scale = sqrt(2 * step_size)` gives
    textbook Langevin dynamics.

    Args:
        num_steps: number of steps per call (JEM: 20).
        step_size: gradient step `alpha` (JEM: 1.0).
        noise_scale: standard deviation of the Gaussian noise added each step (JEM: 0.01).
        gradient_clip: optional per-element clip of the gradient.
        clip_range: optional `(low, high)` box that x is clamped to after each step.
        noise_first: add the noise before the gradient step (True: the official IGEBM code's
            order, the gradient taken at the noisy x) or after it (False, default: JEM's).
            The noise draws are the same in both orders for the same seed.

    Example:

    >>> sampler = SGLD(num_steps=20, step_size=1.0, noise_scale=0.01)
    >>> samples = sampler(model, x_init, seed=tf.constant([1, 2], "int64"))
    >>> igebm = SGLD(60, step_size=40.0, noise_scale=0.01, gradient_clip=0.005,
    ...              clip_range=(-1.0, 1.0), noise_first=True)
    """

    config_names = Sampler.config_names + (
        "step_size",
        "noise_scale",
        "gradient_clip",
        "clip_range",
        "noise_first",
    )

    def __init__(
        self,
        num_steps=20,
        step_size=1.0,
        noise_scale=0.01,
        gradient_clip=None,
        clip_range=None,
        noise_first=False,
    ):
        super().__init__(num_steps=num_steps)
        self.step_size = _check_positive("step_size", step_size)
        self.noise_scale = _check_positive("noise_scale", noise_scale)
        self.gradient_clip = _check_positive(
            "gradient_clip", gradient_clip, allow_zero=False, allow_none=True
        )
        self.clip_range = _check_range(clip_range)
        if not isinstance(noise_first, (bool, np.bool_)):
            raise ValueError(  # noqa: TRY004 (ValueError is the keras-jem API's error here)
                "`noise_first` must be True (noise, then the gradient step at the noisy x: the "
                "official IGEBM code) or False (gradient step, then noise: JEM). "
                f"Received: noise_first={noise_first!r}"
            )
        self.noise_first = bool(noise_first)

    def step(self, energy_fn, x, seed):
        """One SGLD step under `energy_fn(x) -> (batch,)`; returns the new x."""
        if self.noise_first:
            x = self._add_noise(x, seed)
        # Only x is watched: the tape records nothing about the weights while sampling.
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            total_energy = tf.reduce_sum(tf.cast(energy_fn(x), tf.float32))
        gradient = tape.gradient(total_energy, x)
        if self.gradient_clip is not None:
            gradient = tf.clip_by_value(gradient, -self.gradient_clip, self.gradient_clip)
        x = x - self.step_size * gradient
        if not self.noise_first:
            x = self._add_noise(x, seed)
        if self.clip_range is not None:
            x = tf.clip_by_value(x, *self.clip_range)
        return x

    def _add_noise(self, x, seed):
        if self.noise_scale > 0:
            x = x + self.noise_scale * tf.random.stateless_normal(tf.shape(x), seed, dtype=x.dtype)
        return x

    def run(self, energy_fn, x, seed=None, num_steps=None):
        """Runs the chain on a plain energy function `energy_fn(x) -> (batch,)`."""
        num_steps = self.num_steps if num_steps is None else num_steps
        x = tf.stop_gradient(tf.convert_to_tensor(x, tf.float32))
        if seed is None:
            seed = tf.random.uniform((2,), maxval=2**31 - 1, dtype=tf.int64)

        def body(i, x):
            return i + 1, self.step(energy_fn, x, noise.fold_in(seed, i))

        _, x = tf.while_loop(
            lambda i, _: i < num_steps,
            body,
            (tf.constant(0, tf.int32), x),
            parallel_iterations=1,
        )
        return tf.stop_gradient(x)

    def __call__(self, target, x, y=None, seed=None, training=False, num_steps=None):
        return self.run(
            lambda v: target.energy(v, y=y, training=training), x, seed=seed, num_steps=num_steps
        )
