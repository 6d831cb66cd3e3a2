"""Metropolis-adjusted Langevin algorithm: a correct MCMC sampler of p(x) = exp(-E(x)) / Z."""

import collections

import keras
import tensorflow as tf

from keras_jem.sampling import noise
from keras_jem.sampling.sampler import Sampler
from keras_jem.sampling.sampler import _check_positive

MALAResult = collections.namedtuple("MALAResult", ["samples", "acceptance_rate", "step_size"])
MALAResult.__doc__ = """What `MALA.sample` returns.

Attributes:
    samples: the final states of the chains, shape of `x`, without gradient.
    acceptance_rate: per chain (shape `(batch,)`), the fraction of the proposals accepted after
        the step-size adaptation steps (over every step if there were none).
    step_size: the step size the chains ended with (the adapted one if adaptation ran).
"""


def _tfp_mcmc():
    # tensorflow-probability imports tf-keras and takes seconds: only when a chain runs.
    import tensorflow_probability as tfp

    return tfp.mcmc


@keras.saving.register_keras_serializable(package="keras_jem")
class MALA(Sampler):
    """Metropolis-adjusted Langevin algorithm on `tfp.mcmc.MetropolisAdjustedLangevinAlgorithm`.

    JEM's SGLD (step 1, noise 0.01) is an optimizer with a little noise, not a sampler of
    `p(x) ∝ exp(-E(x))`; even textbook Langevin dynamics (`noise = sqrt(2 * step)`) is biased by
    its step size. MALA adds a Metropolis-Hastings accept/reject test to each Langevin proposal

    ```
    x' = x - step_size / 2 * grad E(x) + sqrt(step_size) * N(0, I)
    accept with probability min(1, p(x') q(x | x') / (p(x) q(x' | x)))
    ```

    so the chains leave `p(x)` exactly invariant whatever the step size: use it for long-run
    samples of a trained model and as a diagnostic (a low acceptance rate says the step is too
    large for the model's energy landscape). Each example of the batch is an independent chain,
    with its own accept/reject decision.

    With `num_adaptation_steps > 0` the step size is first tuned with the rule of
    `tfp.mcmc.SimpleStepSizeAdaptation` (multiplied by `1 + adaptation_rate` after a step whose
    mean acceptance probability is above `target_acceptance_rate`, divided by it otherwise;
    0.574 is the optimal rate of MALA in high dimension, Roberts & Rosenthal 1998), then kept
    fixed, so the chains after the adaptation are an exact MCMC. The acceptance rate reported
    counts the steps after the adaptation only.

    Args:
        num_steps: total number of steps per call (adaptation steps included).
        step_size: the Langevin step `step_size` above (noise variance per step). Images in
            [-1, 1] under a trained JEM typically need 1e-4 to 1e-3.
        num_adaptation_steps: leading steps that adapt the step size (0: fixed step size).
        target_acceptance_rate: the acceptance rate the adaptation aims at.
        adaptation_rate: relative change of the step size per adaptation step.

    Example:

    >>> sampler = MALA(num_steps=1000, step_size=1e-4, num_adaptation_steps=200)
    >>> result = sampler.sample(model, x_init, seed=tf.constant([1, 2], "int64"))
    >>> result.samples, float(tf.reduce_mean(result.acceptance_rate))
    >>> samples = sampler(model, x_init)  # the `Sampler` interface: samples only
    """

    config_names = Sampler.config_names + (
        "step_size",
        "num_adaptation_steps",
        "target_acceptance_rate",
        "adaptation_rate",
    )

    def __init__(
        self,
        num_steps=100,
        step_size=1e-3,
        num_adaptation_steps=0,
        target_acceptance_rate=0.574,
        adaptation_rate=0.05,
    ):
        super().__init__(num_steps=num_steps)
        self.step_size = _check_positive("step_size", step_size, allow_zero=False)
        if int(num_adaptation_steps) != num_adaptation_steps or num_adaptation_steps < 0:
            raise ValueError(
                "`num_adaptation_steps` must be a non-negative integer. Received: "
                f"num_adaptation_steps={num_adaptation_steps}"
            )
        self.num_adaptation_steps = int(num_adaptation_steps)
        if not 0.0 < target_acceptance_rate < 1.0:
            raise ValueError(
                "`target_acceptance_rate` must be in (0, 1), e.g. 0.574. Received: "
                f"target_acceptance_rate={target_acceptance_rate}"
            )
        self.target_acceptance_rate = float(target_acceptance_rate)
        self.adaptation_rate = _check_positive("adaptation_rate", adaptation_rate, allow_zero=False)

    def run(self, energy_fn, x, seed=None, num_steps=None):
        """Runs the chains on `energy_fn(x) -> (batch,)`; returns a `MALAResult`."""
        num_steps = self.num_steps if num_steps is None else num_steps
        x = tf.convert_to_tensor(x, tf.float32)
        if seed is None:
            seed = tf.random.uniform((2,), maxval=2**31 - 1, dtype=tf.int64)
        seed = tf.cast(seed, tf.int64)
        if tf.executing_eagerly():
            # An eager loop of tfp kernels runs hundreds of small ops per step in Python: trace
            # the chain once (10-50x faster on CPU).
            return tf.function(self._run)(energy_fn, x, seed, tf.constant(num_steps, tf.int32))
        return self._run(energy_fn, x, seed, num_steps)

    def _run(self, energy_fn, x, seed, num_steps):
        mcmc = _tfp_mcmc()
        x = tf.stop_gradient(x)

        def kernel(step_size):
            return mcmc.MetropolisAdjustedLangevinAlgorithm(
                target_log_prob_fn=lambda v: -tf.cast(energy_fn(v), tf.float32),
                step_size=step_size,
            )

        step_size = tf.constant(self.step_size, tf.float32)
        # The kernel's state (log p and its gradient at x) does not depend on the step size.
        results = kernel(step_size).bootstrap_results(x)
        accepted = tf.zeros((tf.shape(x)[0],), tf.float32)
        counted = tf.constant(0.0)
        grow = 1.0 + self.adaptation_rate

        def body(i, x, results, step_size, accepted, counted):
            step_seed = tf.cast(noise.fold_in(seed, i) % (2**31 - 1), tf.int32)
            x, results = kernel(step_size).one_step(x, results, seed=step_seed)
            adapting = i < self.num_adaptation_steps
            # tfp.mcmc.SimpleStepSizeAdaptation's rule, written here because that wrapper reads
            # the step size from the kernel results, which MALA's results do not carry.
            mean_acceptance = tf.reduce_mean(
                tf.exp(tf.minimum(tf.cast(results.log_accept_ratio, tf.float32), 0.0))
            )
            factor = tf.where(mean_acceptance > self.target_acceptance_rate, grow, 1.0 / grow)
            step_size = tf.where(adapting, step_size * factor, step_size)
            counting = 1.0 - tf.cast(adapting, tf.float32)
            is_accepted = tf.cast(results.is_accepted, tf.float32)
            return (i + 1, tf.stop_gradient(x), results, step_size,
                    accepted + counting * is_accepted, counted + counting)

        _, x, _, step_size, accepted, counted = tf.while_loop(
            lambda i, *_: i < num_steps,
            body,
            (tf.constant(0, tf.int32), x, results, step_size, accepted, counted),
            parallel_iterations=1,
        )
        # With no step after the adaptation the rate is 0 / 0 = NaN: nothing was measured.
        return MALAResult(tf.stop_gradient(x), accepted / counted, step_size)

    def sample(self, target, x, y=None, seed=None, training=False, num_steps=None):
        """Runs the chains under `target.energy(x, y, training)`; returns a `MALAResult`."""
        return self.run(
            lambda v: target.energy(v, y=y, training=training), x, seed=seed, num_steps=num_steps
        )

    def __call__(self, target, x, y=None, seed=None, training=False, num_steps=None):
        return self.sample(target, x, y=y, seed=seed, training=training,
                           num_steps=num_steps).samples
