"""SGLD input refinement before classifying (JEM's `test_clf --n_steps` and "JEM-n" attacks).

The refinement climbs `logsumexp(logits(x))` (= -E(x) for the JEM family) with a few noisy
gradient steps, `x <- x + step_size * grad_x logsumexp(f(x)) + noise_scale * N(0, I)`.

How an attack differentiates through it is a choice, `gradient`:

- `"straight_through"` (the default, as JEM's `attack_model.py`): each SGLD update is added
  outside the gradient (JEM writes `x_k.data += f_prime + ...`, which autograd does not see), so
  the gradient of the refined logits with respect to the input is their gradient at the refined
  point, passed back as if the refinement were the identity.
- `"exact"`: the attack differentiates through every SGLD step (second derivatives of the
  energy), a stronger, slower adaptive attack than the paper's.
"""

import tensorflow as tf

GRADIENTS = ("straight_through", "exact")


def as_logits_fn(model):
    """Return a callable `x -> logits` for a Keras model (inference mode) or a callable."""
    if hasattr(model, "call") and callable(model):
        return lambda images: model(images, training=False)
    if callable(model):
        return model
    raise ValueError(f"Expected a Keras model or a callable returning logits. Received: {model!r}")


def _check_gradient(gradient):
    if gradient not in GRADIENTS:
        raise ValueError(
            f"Unknown refinement gradient {gradient!r}. Expected 'straight_through' (JEM's "
            "attack_model.py: the SGLD updates are not differentiated) or 'exact' "
            "(differentiate through every SGLD step)."
        )


def sgld_refine(logits_fn, images, num_steps, step_size=1.0, noise_scale=0.01, seed=None,
                gradient="straight_through"):
    """Refine images with `num_steps` SGLD ascent steps on `logsumexp(logits_fn(x))`.

    Differentiable with respect to `images`, so it can sit inside an attack; `gradient` says how.

    Args:
        logits_fn: callable `x -> logits (B, num_classes)`.
        images: float32 tensor `(B, H, W, C)`.
        num_steps: int, number of SGLD steps (0 returns `images` unchanged).
        step_size: float, gradient step. JEM: `1.0`. Defaults to `1.0`.
        noise_scale: float, standard deviation of the added noise. JEM: `0.01`.
            Defaults to `0.01`.
        seed: optional `tf.random.Generator` or int for the noise.
        gradient: `"straight_through"` (JEM's attack: the updates are added under
            `stop_gradient`, so d refined / d images is the identity) or `"exact"`
            (differentiate through every step, nested tapes). Defaults to
            `"straight_through"`.

    Returns:
        The refined images, a float32 tensor of the same shape.

    Example:

    >>> refined = sgld_refine(lambda x: model(x), images, num_steps=1)  # doctest: +SKIP
    """
    num_steps = int(num_steps)
    if num_steps < 0:
        raise ValueError(f"`num_steps` must be >= 0. Received: num_steps={num_steps}")
    _check_gradient(gradient)
    generator = _generator(seed)
    x = tf.convert_to_tensor(images, tf.float32)
    for _ in range(num_steps):
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.reduce_sum(tf.reduce_logsumexp(logits_fn(x), axis=-1))
        update = step_size * tape.gradient(score, x)
        if noise_scale:
            update = update + noise_scale * generator.normal(tf.shape(x))
        x = x + (tf.stop_gradient(update) if gradient == "straight_through" else update)
    return x


def _generator(seed):
    if isinstance(seed, tf.random.Generator):
        return seed
    if seed is None:
        return tf.random.get_global_generator()
    return tf.random.Generator.from_seed(int(seed))


class RefinedLogits:
    """Logits averaged over SGLD-refined copies of the input: JEM's "JEM-n" classifier.

    Each image is copied `num_chains` times, perturbed by `N(0, init_noise^2)`, refined with
    `num_steps` SGLD steps (`sgld_refine`), and the logits of the copies are averaged. PGD attacks
    the refined classifier end to end, through the refinement as `gradient` says.

    Args:
        logits_fn: a Keras model or callable `x -> logits`.
        num_steps: int, SGLD steps (JEM-1: `1`).
        num_chains: int, copies per image. JEM: `5`. Defaults to `5`.
        init_noise: float, std of the noise added to each copy before refining. JEM: `0.03`
            for L-infinity, `0.0` for L2 attacks. Defaults to `0.03`.
        step_size: float. Defaults to `1.0`.
        noise_scale: float. Defaults to `0.01`.
        seed: optional int seed. Defaults to `None`.
        gradient: `"straight_through"` (JEM's `attack_model.py`) or `"exact"`; see
            `sgld_refine`. Defaults to `"straight_through"`.

    Example:

    >>> refined = RefinedLogits(model, num_steps=1, num_chains=5)  # doctest: +SKIP
    >>> logits = refined(images)  # doctest: +SKIP
    """

    def __init__(
        self, logits_fn, num_steps, num_chains=5, init_noise=0.03, step_size=1.0,
        noise_scale=0.01, seed=None, gradient="straight_through",
    ):
        _check_gradient(gradient)
        if int(num_chains) < 1:
            raise ValueError(f"`num_chains` must be >= 1. Received: num_chains={num_chains}")
        self.logits_fn = as_logits_fn(logits_fn)
        self.num_steps = int(num_steps)
        self.num_chains = int(num_chains)
        self.init_noise = float(init_noise)
        self.step_size = float(step_size)
        self.noise_scale = float(noise_scale)
        self.seed = seed
        self.gradient = gradient
        self._generator = _generator(seed)

    def __call__(self, images):
        x = tf.convert_to_tensor(images, tf.float32)
        batch = tf.shape(x)[0]
        copies = tf.repeat(x, self.num_chains, axis=0)
        if self.init_noise:
            copies = copies + self.init_noise * self._generator.normal(tf.shape(copies))
        copies = sgld_refine(
            self.logits_fn, copies, self.num_steps, self.step_size, self.noise_scale,
            seed=self._generator, gradient=self.gradient,
        )
        logits = self.logits_fn(copies)
        logits = tf.reshape(logits, tf.concat([[batch, self.num_chains], tf.shape(logits)[1:]], 0))
        return tf.reduce_mean(logits, axis=1)

    def get_config(self):
        return {
            "num_steps": self.num_steps,
            "num_chains": self.num_chains,
            "init_noise": self.init_noise,
            "step_size": self.step_size,
            "noise_scale": self.noise_scale,
            "seed": self.seed,
            "gradient": self.gradient,
        }
