"""What an energy model can do with its sampler: inpainting, denoising, composition.

The functions take any model with `energy(x, y=None, training=False)` and a
`keras_jem.sampling.Sampler` (default: the model's own), so they work for IGEBM, GMMC and the
JEM family alike (IGEBM paper, section 4, and `ebm_sandbox.py` / `ebm_combine.py`):

- `inpaint`: Langevin dynamics on the masked pixels only; the others stay bit-identical.
- `denoise` (with `salt_and_pepper` to corrupt images): a few rounds of sampling from the
  corrupted image, which pulls it back toward the data manifold.
- `compose`: sampling from the sum of several energies, e.g. two class conditions of one
  conditional model (`[(model, 3), (model, 8)]`) or two models.
- `ensemble`: sampling from the summed energies of several models, e.g. the last checkpoints of
  one run (IGEBM's "historical ensemble"), optionally class-conditional.

Class-conditional generation is `model.sample(y=labels)`.
"""

import numpy as np
import tensorflow as tf

from keras_jem.sampling import noise
from keras_jem.sampling.latent_target import LatentTargetSampler
from keras_jem.sampling.sgld import SGLD


def _seed_tensor(seed):
    if seed is None:
        seed = np.random.randint(0, 2**31 - 1)
    return tf.constant([int(seed), 29], tf.int64)


def _value_range(model):
    buffer = getattr(model, "buffer", None)
    return tuple(getattr(buffer, "value_range", (-1.0, 1.0)))


def _check_images(model, images, name="images"):
    images = np.asarray(images, np.float32)
    image_shape = getattr(model, "image_shape", None)
    if images.ndim != 4 or (image_shape and tuple(images.shape[1:]) != tuple(image_shape)):
        expected = f"(n, {', '.join(map(str, image_shape))})" if image_shape else "(n, h, w, c)"
        raise ValueError(f"`{name}` must have shape {expected}. Received: {images.shape}")
    return images


def _check_labels(model, y, num_samples):
    if y is None:
        return None
    y = np.asarray(y).astype(np.int32).reshape(-1)
    if y.size == 1 and num_samples != 1:
        y = np.full((num_samples,), int(y[0]), np.int32)
    if len(y) != num_samples:
        raise ValueError(f"`y` holds {len(y)} labels for {num_samples} images.")
    num_classes = getattr(model, "num_classes", None)
    if num_classes and ((y < 0) | (y >= num_classes)).any():
        raise ValueError(f"Labels `y` must be in [0, {num_classes}). Received: {sorted(set(y))}")
    return tf.constant(y)


def _energy_sampler(model, sampler):
    """The sampler to use on `model`'s energy: `sampler`, else the model's if energy-based."""
    if sampler is not None:
        return sampler
    own = getattr(model, "sampler", None)
    if own is not None and not isinstance(own, LatentTargetSampler):
        return own
    # GMMC's latent-target sampler follows features, not an energy: use plain clipped SGLD.
    return SGLD(num_steps=40, step_size=1.0, noise_scale=0.01, clip_range=_value_range(model))


def _run_sampler(sampler, target, x_init, labels, num_steps, seed, training):
    """Runs `sampler` on `target`'s energy from `x_init` in one compiled graph.

    Args:
        sampler: a `keras_jem.sampling.Sampler`.
        target: what the sampler follows (a model or an `EnergySum`).
        x_init: float32 starting images.
        labels: `None` or an int32 label tensor, one label per image.
        num_steps: sampler steps, or `None` for the sampler's own.
        seed: optional int seed.
        training: the target's mode while sampling.

    Returns:
        A float32 tensor like `x_init`.
    """
    num_steps = sampler.num_steps if num_steps is None else int(num_steps)

    @tf.function
    def run(x, seed):
        return sampler(target, x, y=labels, seed=seed, training=training, num_steps=num_steps)

    return run(tf.constant(x_init), _seed_tensor(seed))


def langevin(model, x_init, y=None, num_steps=None, sampler=None, seed=None, training=False):
    """Runs the sampler on `model`'s energy from `x_init` (no replay buffer).

    Unlike `model.sample`, this always follows the energy: for GMMC, whose own sampler tracks
    latent targets, it uses clipped SGLD (as `inpaint`, `denoise` and `compose` do).

    Args:
        model: a model with `energy(x, y=None, training=False)`.
        x_init: starting images `(n, h, w, c)`.
        y: optional labels (one int, or `(n,)`) for the class energy `E(x, y)`.
        num_steps: sampler steps (default: the sampler's `num_steps`).
        sampler: a `keras_jem.sampling.Sampler` (default: the model's).
        seed: optional int seed.
        training: the model's mode while sampling.

    Returns:
        A float32 tensor like `x_init`.
    """
    x_init = _check_images(model, x_init, "x_init")
    labels = _check_labels(model, y, len(x_init))
    sampler = _energy_sampler(model, sampler)
    return _run_sampler(sampler, model, x_init, labels, num_steps, seed, training)


def salt_and_pepper(images, fraction=0.1, seed=None, low=-0.8, high=0.8):
    """Corrupts a `fraction` of the pixels: half set to `low` ("pepper"), half to `high` ("salt").

    The defaults are IGEBM's `anticorrupt` values, 0.1 and 0.9 in [0, 1] pixels, i.e. -0.8 and
    0.8 in the library's [-1, 1] range. All channels of a chosen pixel are set.

    Args:
        images: float array `(n, h, w, c)`.
        fraction: fraction of corrupted pixels, in [0, 1] (IGEBM: 0.1).
        seed: optional int seed.
        low, high: the pepper and salt values.

    Returns:
        The corrupted float32 numpy array (the input is not modified).

    Example:

    >>> noisy = salt_and_pepper(test_images[:16], fraction=0.1, seed=0)
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"`images` must have shape (n, h, w, c). Received: {images.shape}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction` must be in [0, 1]. Received: fraction={fraction}")
    draws = np.random.default_rng(seed).uniform(size=images.shape[:3] + (1,))
    corrupted = images.copy()
    corrupted = np.where(draws < fraction / 2, np.float32(low), corrupted)
    corrupted = np.where((draws >= fraction / 2) & (draws < fraction), np.float32(high), corrupted)
    return corrupted.astype(np.float32)


def _check_mask(mask, images):
    mask = np.asarray(mask)
    shape = images.shape
    if mask.ndim == 2:
        mask = mask[None, :, :, None]
    elif mask.ndim == 3:
        mask = mask[None]
    ok = mask.ndim == 4 and all(m in (1, s) for m, s in zip(mask.shape, shape)) and (
        mask.shape[1:3] == shape[1:3]
    )
    if not ok:
        raise ValueError(
            "`mask` must cover the image: shape (h, w), (h, w, 1 or c) or (n or 1, h, w, 1 or "
            f"c) with (h, w) = {shape[1:3]}, for images of shape {shape}. Received a mask of "
            f"shape {np.asarray(mask).shape}."
        )
    return np.broadcast_to(mask.astype(bool), shape)


def inpaint(model, images, mask, num_steps=None, y=None, sampler=None, seed=None,
            training=False):
    """Fills in the masked pixels by sampling, keeping the others bit-identical.

    The masked pixels start from uniform noise in the data range; then each of `num_steps`
    iterations runs one sampler step on the whole image and keeps the result only on the
    mask (`tf.where(mask, x_new, images)`), i.e. Langevin dynamics of `E(x)` restricted to the
    masked region (IGEBM's `boxcorrupt`).

    Args:
        model: a model with `energy(x, y=None, training=False)`.
        images: float array `(n, h, w, c)` in the data range.
        mask: boolean (or 0/1) array, True on the pixels to fill in: shape `(h, w)`,
            `(h, w, 1 or c)` or `(n or 1, h, w, 1 or c)`.
        num_steps: sampler steps (default: the sampler's `num_steps`).
        y: optional labels (one int, or `(n,)`) for the class energy `E(x, y)`.
        sampler: a `keras_jem.sampling.Sampler` (default: the model's).
        seed: optional int seed.
        training: the model's mode while sampling.

    Returns:
        A float32 tensor like `images`: the same pixels off the mask, samples on it.

    Example:

    >>> mask = np.zeros((8, 8), bool); mask[4:] = True      # the bottom half
    >>> completed = keras_jem.generation.inpaint(model, test_images[:16], mask, num_steps=60)
    """
    images = _check_images(model, images)
    mask = _check_mask(mask, images)
    labels = _check_labels(model, y, len(images))
    sampler = _energy_sampler(model, sampler)
    num_steps = sampler.num_steps if num_steps is None else int(num_steps)
    low, high = _value_range(model)

    @tf.function
    def run(images, mask, seed):
        start = tf.random.stateless_uniform(
            tf.shape(images), noise.fold_in(seed, -1), minval=low, maxval=high
        )
        x = tf.where(mask, start, images)

        def body(i, x):
            proposal = sampler(
                model, x, y=labels, seed=noise.fold_in(seed, i), training=training, num_steps=1
            )
            return i + 1, tf.where(mask, proposal, images)

        _, x = tf.while_loop(
            lambda i, _: i < num_steps, body, (tf.constant(0), x), parallel_iterations=1
        )
        return x

    return run(tf.constant(images), tf.constant(mask), _seed_tensor(seed))


def denoise(model, images, num_rounds=5, num_steps=5, y=None, sampler=None, seed=None,
            training=False):
    """Restores corrupted images (e.g. `salt_and_pepper`) by sampling from them.

    Runs `num_rounds` rounds of `num_steps` sampler steps on every pixel, starting at the
    corrupted images (IGEBM's `anticorrupt`: 5 rounds). Few steps with the gradient clipped
    keep the result close to the input while the corrupted pixels move toward low energy.

    Args:
        model: a model with `energy(x, y=None, training=False)`.
        images: float array `(n, h, w, c)`.
        num_rounds: number of rounds (5).
        num_steps: sampler steps per round (5; None: the sampler's `num_steps`). Long chains
            drift away from the input toward other samples of the model.
        y: optional labels for the class energy.
        sampler: a `keras_jem.sampling.Sampler` (default: the model's).
        seed: optional int seed.
        training: the model's mode while sampling.

    Returns:
        A float32 tensor like `images`: the restored images, every pixel free to move.

    Example:

    >>> noisy = keras_jem.generation.salt_and_pepper(test_images[:16], 0.1, seed=0)
    >>> restored = keras_jem.generation.denoise(model, noisy, num_rounds=5, num_steps=10)
    """
    images = _check_images(model, images)
    if int(num_rounds) != num_rounds or num_rounds < 1:
        raise ValueError(f"`num_rounds` must be a positive integer. Received: {num_rounds}")
    labels = _check_labels(model, y, len(images))
    sampler = _energy_sampler(model, sampler)
    num_steps = sampler.num_steps if num_steps is None else int(num_steps)

    @tf.function
    def run(x, seed):
        for index in range(int(num_rounds)):
            x = sampler(model, x, y=labels, seed=noise.fold_in(seed, index), training=training,
                        num_steps=num_steps)
        return x

    return run(tf.constant(images), _seed_tensor(seed))


class EnergySum:
    """The sum of several (model, label) energies: a sampling target for composition.

    `energy(x, y) = sum_k weight_k * E_k(x, y_k)`, where a term without a label takes the
    labels `y` given to `energy` (None: the model's marginal energy `E_k(x)`). A conditional
    model with two labels gives the product of experts `p(x | y1) p(x | y2)`, i.e. images with
    both attributes; several models without labels give their ensemble, conditional on `y`
    when labels are passed.

    Args:
        terms: list of models, `(model, label)` or `(model, label, weight)` tuples.

    Example:

    >>> target = EnergySum([(model, 3), (model, 8)])
    >>> samples = model.sampler(target, x0, seed=tf.constant([0, 1], "int64"))
    """

    def __init__(self, terms):
        self.terms = []
        if not isinstance(terms, (list, tuple)) or not terms:
            raise ValueError(
                "`terms` must be a non-empty list of models or (model, label[, weight]) tuples."
                f" Received: {terms!r}"
            )
        for term in terms:
            if not isinstance(term, (list, tuple)):
                term = (term,)
            if not 1 <= len(term) <= 3 or not hasattr(term[0], "energy"):
                raise ValueError(
                    "Each composition term must be a model with `energy`, or (model, label) or "
                    f"(model, label, weight). Received: {term!r}"
                )
            model = term[0]
            label = term[1] if len(term) > 1 else None
            weight = float(term[2]) if len(term) > 2 else 1.0
            if label is not None:
                num_classes = getattr(model, "num_classes", None)
                if int(label) != label or label < 0 or (num_classes and label >= num_classes):
                    raise ValueError(
                        f"Composition label {label!r} is not a class of the model "
                        f"(num_classes={num_classes})."
                    )
                label = int(label)
            self.terms.append((model, label, weight))

    def energy(self, x, y=None, training=False):
        total = 0.0
        for model, label, weight in self.terms:
            labels = y
            if label is not None:
                labels = tf.fill(tf.shape(x)[:1], tf.constant(label, tf.int32))
            total += weight * tf.cast(model.energy(x, y=labels, training=training), tf.float32)
        return total


def _starting_images(model, num_samples, x_init, seed, caller):
    """`x_init` checked, or `num_samples` uniform noise images in `model`'s data range."""
    if x_init is None:
        if num_samples is None:
            raise ValueError(f"Pass `num_samples` or `x_init` to `{caller}`.")
        image_shape = getattr(model, "image_shape", None)
        if not image_shape:
            raise ValueError("The first model is not built: pass `x_init`.")
        low, high = _value_range(model)
        x_init = np.random.default_rng(seed).uniform(
            low, high, (int(num_samples),) + tuple(image_shape)
        ).astype(np.float32)
    return _check_images(model, x_init, "x_init")


def compose(terms, num_samples=None, x_init=None, num_steps=None, sampler=None, seed=None,
            training=False):
    """Samples from the sum of energies (IGEBM's compositional generation).

    Args:
        terms: models, `(model, label)` or `(model, label, weight)` tuples (see `EnergySum`);
            e.g. `[(model, 3), (model, 8)]` for one conditional model and two labels.
        num_samples: number of samples (or pass `x_init`).
        x_init: optional starting images; default uniform noise in the data range.
        num_steps: sampler steps (default: the sampler's).
        sampler: a `keras_jem.sampling.Sampler` (default: the first model's).
        seed: optional int seed.
        training: the models' mode while sampling.

    Returns:
        A float32 tensor `(num_samples, h, w, c)`.

    Example:

    >>> both = keras_jem.generation.compose([(model, 3), (model, 8)], num_samples=16)
    """
    target = EnergySum(terms)
    first = target.terms[0][0]
    x_init = _starting_images(first, num_samples, x_init, seed, "compose")
    sampler = _energy_sampler(first, sampler)
    return _run_sampler(sampler, target, x_init, None, num_steps, seed, training)


def ensemble(models, num_samples=None, x_init=None, y=None, num_steps=None, sampler=None,
             seed=None, training=False, weights=None):
    """Samples from the summed energies of several models (IGEBM's historical ensemble).

    The target is `E(x[, y]) = sum_k weights_k * E_k(x[, y])`: with the last checkpoints of
    one run, the sampler follows the energy the checkpoints agree on (the IGEBM paper samples
    CIFAR-10 from its 10 last checkpoints: IS 6.02 -> 6.78). Note that with a sum the gradient
    is about `len(models)` times one model's: samplers that clip the gradient per element
    (IGEBM's) are unaffected, others may want `weights=[1 / len(models)] * len(models)` (the
    mean).

    Args:
        models: a list of built models with `energy(x, y=None, training=False)` on the same
            image shape (e.g. checkpoints of one run).
        num_samples: number of samples (or pass `x_init`).
        x_init: optional starting images; default uniform noise in the data range.
        y: optional labels (one int, or one per sample) for the class energies `E_k(x, y)`.
        num_steps: sampler steps (default: the sampler's).
        sampler: a `keras_jem.sampling.Sampler` (default: the first model's).
        seed: optional int seed.
        training: the models' mode while sampling.
        weights: optional weight per model (default 1 each: the sum).

    Returns:
        A float32 tensor `(num_samples, h, w, c)`.

    Example:

    >>> checkpoints = [keras.saving.load_model(p) for p in paths]     # the last 5 of a run
    >>> samples = keras_jem.generation.ensemble(checkpoints, num_samples=64)
    >>> sevens = keras_jem.generation.ensemble(checkpoints, y=7, num_samples=16)
    """
    if not isinstance(models, (list, tuple)) or not models:
        raise ValueError(f"`models` must be a non-empty list of models. Received: {models!r}")
    weights = [1.0] * len(models) if weights is None else list(weights)
    if len(weights) != len(models):
        raise ValueError(f"`weights` holds {len(weights)} values for {len(models)} models.")
    shapes = {tuple(getattr(model, "image_shape", None) or ()) for model in models}
    if len(shapes) > 1:
        raise ValueError(
            f"The models of an ensemble must take the same images. Received image shapes "
            f"{sorted(shapes)}.")
    target = EnergySum([(model, None, weight) for model, weight in zip(models, weights)])
    first = models[0]
    x_init = _starting_images(first, num_samples, x_init, seed, "ensemble")
    labels = _check_labels(first, y, len(x_init))
    sampler = _energy_sampler(first, sampler)
    return _run_sampler(sampler, target, x_init, labels, num_steps, seed, training)
