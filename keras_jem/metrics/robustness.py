"""Adversarial robustness: PGD under L-infinity and L2, robust-accuracy curves (JSON + PNG).

Units. The library's images live in [-1, 1]; the papers quote epsilons on the [0, 1] pixel
scale (`8/255`). `epsilon_unit="pixel"` (the default) takes epsilons and step sizes on that
[0, 1] scale and multiplies them by the width of the data range (2 for [-1, 1]) before
attacking; `epsilon_unit="data"` takes them as distances in the model's input space. Both
values are written in the output (`epsilons` and `epsilons_data`).
"""

import json
import os

import numpy as np
import tensorflow as tf

from keras_jem.metrics import _figures
from keras_jem.metrics import refinement

NORMS = ("linf", "l2")
EPSILON_UNITS = ("pixel", "data")


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}. Expected one of {NORMS}.")


def to_data_units(value, epsilon_unit="pixel", data_range=(-1.0, 1.0)):
    """Convert an epsilon or step size to the model's input units.

    Example:

    >>> to_data_units(8 / 255) == 16 / 255
    True
    """
    if epsilon_unit not in EPSILON_UNITS:
        raise ValueError(
            f"Unknown epsilon_unit {epsilon_unit!r}. Expected 'pixel' (the [0, 1] pixel scale of "
            "the papers, e.g. 8/255) or 'data' (the model's input range)."
        )
    if epsilon_unit == "data":
        return float(value)
    return float(value) * float(data_range[1] - data_range[0])


def _flat_norm(x):
    return tf.norm(tf.reshape(x, [tf.shape(x)[0], -1]), axis=-1)


def _broadcast(per_example, like):
    return tf.reshape(per_example, tf.concat([[-1], tf.ones([tf.rank(like) - 1], tf.int32)], 0))


def project(adversarial, original, epsilon, norm, data_range=(-1.0, 1.0)):
    """Project `adversarial` onto the epsilon ball around `original`, then into the data range.

    Clipping into the box after the projection keeps the point in the ball (the original is in
    the box, so clipping only shortens the perturbation, coordinate by coordinate).

    Args:
        adversarial: tensor `(B, ...)`.
        original: tensor `(B, ...)`, inside `data_range`.
        epsilon: float, radius in data units.
        norm: `"linf"` or `"l2"`.
        data_range: `(low, high)`. Defaults to `(-1.0, 1.0)`.
    """
    _check_norm(norm)
    delta = adversarial - original
    if norm == "linf":
        delta = tf.clip_by_value(delta, -epsilon, epsilon)
    else:
        length = _flat_norm(delta)
        factor = tf.minimum(1.0, epsilon / tf.maximum(length, 1e-12))
        delta = delta * _broadcast(factor, delta)
    return tf.clip_by_value(original + delta, data_range[0], data_range[1])


def _random_start(original, epsilon, norm, generator):
    if norm == "linf":
        return original + generator.uniform(tf.shape(original), -epsilon, epsilon)
    # Uniform in the L2 ball: Gaussian direction, radius epsilon * U^(1/d).
    direction = generator.normal(tf.shape(original))
    direction = direction / _broadcast(tf.maximum(_flat_norm(direction), 1e-12), direction)
    dim = tf.cast(tf.reduce_prod(tf.shape(original)[1:]), tf.float32)
    radius = epsilon * generator.uniform([tf.shape(original)[0]]) ** (1.0 / dim)
    return original + direction * _broadcast(radius, direction)


def _make_attack(logits_fn, norm, num_steps, data_range, generator):
    @tf.function(reduce_retracing=True)
    def attack(original, labels, epsilon, step_size, random_start):
        x = original
        if random_start:
            x = project(_random_start(original, epsilon, norm, generator), original, epsilon,
                        norm, data_range)
        for _ in tf.range(num_steps):
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits = logits_fn(x)
                loss = tf.reduce_sum(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
                )
            gradient = tape.gradient(loss, x)
            if norm == "linf":
                step = tf.sign(gradient)
            else:
                step = gradient / _broadcast(tf.maximum(_flat_norm(gradient), 1e-12), gradient)
            x = project(x + step_size * step, original, epsilon, norm, data_range)
        return x

    return attack


def _make_predict(logits_fn):
    @tf.function(reduce_retracing=True)
    def predict(x):
        return tf.argmax(logits_fn(x), axis=-1)

    return predict


def pgd_attack(
    model, images, labels, epsilon, norm="linf", num_steps=20, step_size=None,
    random_start=True, num_restarts=1, epsilon_unit="pixel", data_range=(-1.0, 1.0),
    batch_size=100, seed=None,
):
    """Projected gradient descent (Madry et al.) on the cross-entropy of a logits function.

    Each step moves by `step_size` along the sign of the gradient (L-infinity) or the
    normalised gradient (L2), then projects onto the epsilon ball and clips to `data_range`.
    With `num_restarts > 1`, an example keeps the first adversarial that fools the model.

    Args:
        model: a Keras model (called with `training=False`) or a callable `x -> logits`, e.g.
            `RefinedLogits(model, num_steps=1)` for JEM's refined classifier.
        images: array `(N, H, W, C)` inside `data_range`.
        labels: int array `(N,)`.
        epsilon: float, radius of the threat model in `epsilon_unit`.
        norm: `"linf"` or `"l2"`. Defaults to `"linf"`.
        num_steps: int. Defaults to `20`.
        step_size: float in `epsilon_unit`. Defaults to `2.5 * epsilon / num_steps`.
        random_start: bool, start from a uniform point of the ball. Defaults to `True`.
        num_restarts: int. Defaults to `1`.
        epsilon_unit: `"pixel"` ([0, 1] pixel scale, as in the papers: `8/255`) or `"data"`
            (the model's input units). Defaults to `"pixel"`.
        data_range: `(low, high)` of valid inputs. Defaults to `(-1.0, 1.0)`.
        batch_size: int. Defaults to `100`.
        seed: optional int seed of the random starts.

    Returns:
        A float32 numpy array of adversarial images, same shape as `images`.

    Example:

    >>> x_adv = pgd_attack(model, x, y, epsilon=8 / 255, norm="linf", num_steps=50,
    ...                    step_size=2 / 255)  # doctest: +SKIP
    """
    _check_norm(norm)
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    _check_inputs(images, labels, data_range)
    epsilon_data, step_data = _resolve_epsilon(epsilon, step_size, num_steps, epsilon_unit,
                                               data_range)
    logits_fn = refinement.as_logits_fn(model)
    generator = tf.random.Generator.from_seed(0 if seed is None else int(seed))
    attack = _make_attack(logits_fn, norm, int(num_steps), data_range, generator)
    predict = _make_predict(logits_fn)
    return _attack_all(attack, predict, images, labels, epsilon_data, step_data, random_start,
                       num_restarts, batch_size)


def _check_inputs(images, labels, data_range):
    if images.ndim < 2 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            "Expected images (N, ...) and labels (N,). "
            f"Received: images.shape={images.shape}, labels.shape={labels.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError("Received zero images to attack.")
    low, high = data_range
    if images.min() < low - 1e-5 or images.max() > high + 1e-5:
        raise ValueError(
            f"Images must lie in the data range [{low}, {high}]. Received values in "
            f"[{images.min():.4g}, {images.max():.4g}]."
        )


def _resolve_epsilon(epsilon, step_size, num_steps, epsilon_unit, data_range):
    if float(epsilon) < 0:
        raise ValueError(f"`epsilon` must be >= 0. Received: epsilon={epsilon}")
    if int(num_steps) < 0:
        raise ValueError(f"`num_steps` must be >= 0. Received: num_steps={num_steps}")
    epsilon_data = to_data_units(epsilon, epsilon_unit, data_range)
    if step_size is None:
        step_data = 2.5 * epsilon_data / max(1, int(num_steps))
    else:
        step_data = to_data_units(step_size, epsilon_unit, data_range)
    return epsilon_data, step_data


def _attack_all(attack, predict, images, labels, epsilon_data, step_data, random_start,
                num_restarts, batch_size):
    batch_size = int(batch_size)
    if epsilon_data == 0:  # the ball is a point: nothing to attack
        return images.copy()
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        original = tf.constant(images[start : start + batch_size])
        target = tf.constant(labels[start : start + batch_size])
        best = None
        fooled = None
        for _ in range(max(1, int(num_restarts))):
            candidate = attack(original, target, tf.constant(epsilon_data, tf.float32),
                               tf.constant(step_data, tf.float32), tf.constant(bool(random_start)))
            candidate_fooled = predict(candidate) != target
            if best is None:
                best, fooled = candidate, candidate_fooled
            else:
                take = tf.logical_and(candidate_fooled, tf.logical_not(fooled))
                best = tf.where(_broadcast(take, best), candidate, best)
                fooled = tf.logical_or(fooled, candidate_fooled)
            if bool(tf.reduce_all(fooled)):
                break
        outputs.append(best.numpy())
    return np.concatenate(outputs, axis=0)


def robust_accuracy_curve(
    model, images, labels, epsilons, norm="linf", num_steps=20, step_size=None,
    random_start=True, num_restarts=1, epsilon_unit="pixel", data_range=(-1.0, 1.0),
    batch_size=100, seed=None, refine_steps=0, refine_chains=5, refine_init_noise=None,
    refine_step_size=1.0, refine_noise=0.01, refine_gradient="straight_through",
):
    """Accuracy under PGD for a list of epsilons.

    Two curves are returned: `per_epsilon_accuracy` is the accuracy on the PGD adversarials of
    each epsilon, and `accuracy` is the worst case over all attacks that fit the ball (an
    adversarial found at a smaller epsilon is also one at every larger epsilon), hence
    non-increasing in epsilon. Report `accuracy`.

    Args:
        model: a Keras model or a callable `x -> logits` (e.g. `RefinedLogits`).
        images: array `(N, H, W, C)` in `data_range`.
        labels: int array `(N,)`.
        epsilons: list of floats in `epsilon_unit` (0 gives the clean accuracy).
        step_size: float in `epsilon_unit`, the same for every epsilon; `None` uses
            `2.5 * epsilon / num_steps` per epsilon. Defaults to `None`.
        norm, num_steps, random_start, num_restarts, epsilon_unit, data_range, batch_size,
        seed: see `pgd_attack`.
        refine_steps: int, SGLD refinement steps applied inside the attacked classifier (JEM's
            "JEM-n" protocol, see `RefinedLogits`). Defaults to `0` (plain PGD on the logits).
        refine_chains: int, refined copies whose logits are averaged. JEM: `5`.
        refine_init_noise: float, std of the noise added to each copy before refining.
            Defaults to `None`: JEM's `0.03` for L-infinity, `0.0` for L2.
        refine_step_size: float, SGLD step. Defaults to `1.0`.
        refine_noise: float, SGLD noise. Defaults to `0.01`.
        refine_gradient: how the attack differentiates through the refinement:
            `"straight_through"` (JEM's `attack_model.py`, the SGLD updates are not
            differentiated) or `"exact"` (through every step). Defaults to
            `"straight_through"`.

    Returns:
        A JSON-serializable dict: the settings (`norm`, `epsilon_unit`, `epsilons`,
        `epsilons_data`, `step_sizes_data`, `num_steps`, `random_start`, `num_restarts`,
        `num_examples`, `data_range`, `refinement`), `accuracy`, `per_epsilon_accuracy` and
        `max_perturbation_data` (largest norm of the perturbations found, per epsilon).

    Example:

    >>> curve = robust_accuracy_curve(model, x, y, [0, 2 / 255, 8 / 255])  # doctest: +SKIP
    >>> save_robustness_plot([curve], "robustness.png")  # doctest: +SKIP
    """
    _check_norm(norm)
    epsilons = sorted(float(e) for e in epsilons)
    if not epsilons:
        raise ValueError("`epsilons` must hold at least one value.")
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    _check_inputs(images, labels, data_range)
    refined = None
    if refine_steps:
        if refine_init_noise is None:
            refine_init_noise = 0.03 if norm == "linf" else 0.0
        refined = refinement.RefinedLogits(
            model, refine_steps, num_chains=refine_chains, init_noise=refine_init_noise,
            step_size=refine_step_size, noise_scale=refine_noise, seed=seed,
            gradient=refine_gradient,
        )
        model = refined
    logits_fn = refinement.as_logits_fn(model)
    generator = tf.random.Generator.from_seed(0 if seed is None else int(seed))
    attack = _make_attack(logits_fn, norm, int(num_steps), data_range, generator)
    predict = _make_predict(logits_fn)

    robust = np.ones(labels.shape[0], dtype=bool)
    result = {
        "norm": norm,
        "epsilon_unit": epsilon_unit,
        "data_range": [float(data_range[0]), float(data_range[1])],
        "epsilons": epsilons,
        "epsilons_data": [],
        "step_sizes_data": [],
        "num_steps": int(num_steps),
        "random_start": bool(random_start),
        "num_restarts": int(num_restarts),
        "num_examples": int(labels.shape[0]),
        "refinement": None if refined is None else refined.get_config(),
        "accuracy": [],
        "per_epsilon_accuracy": [],
        "max_perturbation_data": [],
    }
    for epsilon in epsilons:
        epsilon_data, step_data = _resolve_epsilon(epsilon, step_size, num_steps, epsilon_unit,
                                                   data_range)
        adversarial = _attack_all(attack, predict, images, labels, epsilon_data, step_data,
                                  random_start, num_restarts, batch_size)
        predictions = np.concatenate([
            predict(tf.constant(adversarial[i : i + batch_size])).numpy()
            for i in range(0, adversarial.shape[0], int(batch_size))
        ])
        correct = predictions == labels
        robust &= correct
        delta = (adversarial - images).reshape(images.shape[0], -1)
        size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        result["epsilons_data"].append(epsilon_data)
        result["step_sizes_data"].append(step_data)
        result["per_epsilon_accuracy"].append(float(correct.mean()))
        result["accuracy"].append(float(robust.mean()))
        result["max_perturbation_data"].append(float(size.max()))
    return result


def save_robustness_json(curves, path):
    """Write one curve dict or a list of them as JSON and return the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(curves, f, indent=2)
    return path


def save_robustness_plot(curves, path, title=None):
    """Plot robust accuracy against epsilon, one line per curve (e.g. per norm or model).

    Args:
        curves: a dict from `robust_accuracy_curve`, or a list of them. A curve may carry a
            `"label"` key for the legend.
        path: output `.png` path.
        title: optional str.

    Returns:
        The path written.
    """
    if isinstance(curves, dict):
        curves = [curves]
    figure, axes = _figures.new_figure(figsize=(5.5, 4.0))
    units = set()
    for index, curve in enumerate(curves):
        scale = 255.0 if curve["epsilon_unit"] == "pixel" else 1.0
        label = curve.get("label", curve["norm"])
        axes.plot(np.asarray(curve["epsilons"]) * scale, curve["accuracy"], marker="o",
                  color=f"C{index}", label=label)
        units.add("epsilon x 255 ([0,1] pixel scale)" if scale == 255.0 else "epsilon (data)")
    axes.set_xlabel(" / ".join(sorted(units)))
    axes.set_ylabel("robust accuracy (PGD)")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title, fontsize=10)
    return _figures.save_figure(figure, path)
