"""GMMC's latent-target sampler: descent of the features toward a noisy class centre."""

import keras
import tensorflow as tf

from keras_jem.sampling import noise
from keras_jem.sampling.sampler import Sampler
from keras_jem.sampling.sampler import _check_positive
from keras_jem.sampling.sampler import _check_range

REDUCTIONS = ("mean", "sum")


@keras.saving.register_keras_serializable(package="keras_jem")
class LatentTargetSampler(Sampler):
    """GMMC's sampler: move images so that their features reach a target near a class centre.

    For labels `y`, each chain gets a latent target `z_i = mu_{y_i} + latent_noise * N(0, I)`
    in feature space (drawn once per call, GMMC's "staged sampling", or again at every step with
    `inject=True`). Each step is a plain gradient step, with no Langevin noise:

    ```
    x = x - step_size * grad_x reduce_i 1/2 ||phi(x_i) - z_i||^2
    x = clip(x, *clip_range)
    ```

    With `reduction="mean"` (the reference code) the per-example step is `step_size / batch`,
    so it depends on the batch size; `reduction="sum"` makes it independent of it.

    The target must expose `features(x, training=False)` -> `(batch, dim)` and `centers`
    -> `(num_classes, dim)` (`keras_jem.GMMC` does). Without labels, each chain's class is drawn
    uniformly, which samples the GMMC's marginal `p(x)` with a uniform class prior.

    Args:
        num_steps: steps per call (GMMC: 20 for training, 40 for sampling from scratch).
        step_size: gradient step `alpha` (GMMC `sgld_lr`: 1.0).
        latent_noise: standard deviation `gamma` of the latent target around the centre
            (GMMC: 0.001).
        inject: draw a new latent target at every step (GMMC's `--inject`).
        clip_range: box x is clamped to after every step (the data range, `(-1, 1)`), or None.
        reduction: `"mean"` (reference) or `"sum"` of the per-example losses.

    Example:

    >>> sampler = LatentTargetSampler(num_steps=20, step_size=1.0, latent_noise=0.001)
    >>> samples = sampler(gmmc_model, x_init, y=labels, seed=tf.constant([1, 2], "int64"))
    """

    config_names = Sampler.config_names + (
        "step_size",
        "latent_noise",
        "inject",
        "clip_range",
        "reduction",
    )

    def __init__(
        self,
        num_steps=20,
        step_size=1.0,
        latent_noise=0.001,
        inject=False,
        clip_range=(-1.0, 1.0),
        reduction="mean",
    ):
        super().__init__(num_steps=num_steps)
        self.step_size = _check_positive("step_size", step_size)
        self.latent_noise = _check_positive("latent_noise", latent_noise)
        self.inject = bool(inject)
        self.clip_range = _check_range(clip_range)
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"`reduction` must be one of {REDUCTIONS}. Received: reduction={reduction!r}"
            )
        self.reduction = reduction

    def _latent(self, means, seed):
        if self.latent_noise == 0:
            return means
        return means + self.latent_noise * tf.random.stateless_normal(
            tf.shape(means), seed, dtype=means.dtype
        )

    def __call__(self, target, x, y=None, seed=None, training=False, num_steps=None):
        if not (hasattr(target, "features") and hasattr(target, "centers")):
            raise ValueError(
                "LatentTargetSampler needs a target with `features(x, training=False)` and "
                "`centers` (a GMMC model). Received a target of type "
                f"{type(target).__name__}. Use SGLD for other models."
            )
        num_steps = self.num_steps if num_steps is None else num_steps
        x = tf.stop_gradient(tf.convert_to_tensor(x, tf.float32))
        if seed is None:
            seed = tf.random.uniform((2,), maxval=2**31 - 1, dtype=tf.int64)
        centers = tf.stop_gradient(tf.cast(tf.convert_to_tensor(target.centers), tf.float32))
        if y is None:
            y = tf.random.stateless_uniform(
                tf.shape(x)[:1], noise.fold_in(seed, 0), maxval=tf.shape(centers)[0],
                dtype=tf.int32,
            )
        means = tf.gather(centers, tf.cast(tf.reshape(y, (-1,)), tf.int32))
        reduce = tf.reduce_mean if self.reduction == "mean" else tf.reduce_sum

        def body(i, x, z):
            if self.inject:
                z = self._latent(means, noise.fold_in(seed, i + 2))
            with tf.GradientTape() as tape:
                tape.watch(x)
                features = tf.cast(target.features(x, training=training), tf.float32)
                loss = reduce(0.5 * tf.reduce_sum(tf.square(features - z), axis=-1))
            x = x - self.step_size * tape.gradient(loss, x)
            if self.clip_range is not None:
                x = tf.clip_by_value(x, *self.clip_range)
            return i + 1, tf.stop_gradient(x), z

        _, x, _ = tf.while_loop(
            lambda i, *_: i < num_steps,
            body,
            (tf.constant(0, tf.int32), x, self._latent(means, noise.fold_in(seed, 1))),
            parallel_iterations=1,
        )
        return tf.stop_gradient(x)
