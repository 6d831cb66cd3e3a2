"""Out-of-distribution detection: named score functions, AUROC, FPR at 95% TPR, histograms.

Every score is "higher = more in-distribution":

- `logsumexp`: `logsumexp(logits(x))`, i.e. log p(x) up to a constant (JEM's `px`).
- `max_softmax`: `max_y softmax(logits(x))_y` (JEM's `py`).
- `grad_norm`: `-||d logsumexp(logits(x)) / dx||_2` (JEM's `pxgrad`).
- `energy`: `-model.energy(x)` (GMMC / IGEBM energies).

A score function has the signature `score_fn(model, images, batch_size=100) -> (N,) numpy`.
"""

import numpy as np
import tensorflow as tf
from sklearn import metrics as sk_metrics

from keras_jem.metrics import _figures
from keras_jem.metrics import classification
from keras_jem.metrics import refinement

_SCORES = {}


def register_score(name):
    """Decorator registering `score_fn(model, images, batch_size=100)` under `name`.

    Example:

    >>> @register_score("max_logit")  # doctest: +SKIP
    ... def max_logit_score(model, images, batch_size=100):
    ...     return predict_logits(model, images, batch_size).max(axis=1)
    """

    def decorator(fn):
        if name in _SCORES and _SCORES[name] is not fn:
            raise ValueError(f"An OOD score named {name!r} is already registered.")
        _SCORES[name] = fn
        return fn

    return decorator


def available_scores():
    """Names of the registered OOD scores."""
    return sorted(_SCORES)


def get_score(identifier):
    """Return the score function registered under `identifier` (or `identifier` if callable).

    Example:

    >>> get_score("logsumexp").__name__
    'logsumexp_score'
    """
    if callable(identifier):
        return identifier
    if identifier not in _SCORES:
        raise ValueError(
            f"Unknown OOD score {identifier!r}. Available: {available_scores()}. "
            "Register new ones with `keras_jem.metrics.register_score`."
        )
    return _SCORES[identifier]


def _batched_score(model, images, batch_size, name, make):
    """Per-example float64 scores of `make(model)` on `images`, compiled once per model and name.

    Args:
        model: the scored model.
        images: float32 images `(N, H, W, C)`.
        batch_size: images per forward pass.
        name: the score's key in the model's compiled functions.
        make: callable `model -> (x -> (batch,) scores)`.
    """
    fn = classification.model_function(model, name, make)
    return classification.batched(fn, images, batch_size).astype(np.float64)


def _logits_score(model, images, batch_size, name, score):
    """`_batched_score` of `score(logits_fn, x)`, where `logits_fn` gives the model's logits."""
    def make(model):
        logits_fn = refinement.as_logits_fn(model)
        return lambda x: score(logits_fn, x)

    return _batched_score(model, images, batch_size, name, make)


@register_score("logsumexp")
def logsumexp_score(model, images, batch_size=100):
    """`logsumexp(logits(x))` per example: log p(x) up to a constant for JEM-family models."""
    def score(logits_fn, x):
        return tf.reduce_logsumexp(logits_fn(x), axis=-1)

    return _logits_score(model, images, batch_size, "logsumexp_score", score)


@register_score("max_softmax")
def max_softmax_score(model, images, batch_size=100):
    """Maximum class probability `max_y p(y|x)` per example."""
    def score(logits_fn, x):
        return tf.reduce_max(tf.nn.softmax(logits_fn(x), axis=-1), axis=-1)

    return _logits_score(model, images, batch_size, "max_softmax_score", score)


@register_score("grad_norm")
def grad_norm_score(model, images, batch_size=100):
    """`-||d logsumexp(logits(x)) / dx||_2` per example (flat regions of log p(x) are in-dist)."""
    def score(logits_fn, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(tf.reduce_logsumexp(logits_fn(x), axis=-1))
        gradient = tf.reshape(tape.gradient(total, x), [tf.shape(x)[0], -1])
        return -tf.norm(gradient, axis=-1)

    return _logits_score(model, images, batch_size, "grad_norm_score", score)


@register_score("energy")
def energy_score(model, images, batch_size=100):
    """`-model.energy(x)` per example (for GMMC/IGEBM, or any model with an `energy` method)."""
    if not callable(getattr(model, "energy", None)):
        raise TypeError(
            f"The `energy` score needs a model with an `energy(x, training=False)` method; "
            f"{type(model).__name__} has none. Use `logsumexp` for a plain classifier."
        )
    def make(model):
        return lambda x: -tf.reshape(model.energy(x, training=False), [-1])

    return _batched_score(model, images, batch_size, "energy_score", make)


def _check_scores(scores, name):
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError(f"`{name}` is empty.")
    bad = np.sum(~np.isfinite(scores))
    if bad:
        raise ValueError(
            f"`{name}` holds {bad} non-finite values out of {scores.size} "
            "(the model may have diverged, or the score overflowed)."
        )
    return scores


def ood_metrics(in_scores, out_scores, tpr_level=0.95):
    """AUROC and FPR at a TPR level for in-distribution vs out-of-distribution scores.

    In-distribution examples are the positives (label 1): higher score = more in-distribution.
    AUROC comes from `sklearn.metrics.roc_auc_score`, as in JEM's `eval_wrn_ebm.py`.

    Args:
        in_scores: array `(N_in,)` of scores of in-distribution examples.
        out_scores: array `(N_out,)` of scores of OOD examples.
        tpr_level: float, the true-positive rate at which the false-positive rate is read.
            Defaults to `0.95`.

    Returns:
        A dict with `auroc`, `fpr_at_95_tpr` (the smallest FPR whose TPR reaches `tpr_level`),
        `threshold_at_95_tpr` (keep examples with score >= threshold), `tpr_level`,
        `num_in`, `num_out`.

    Example:

    >>> result = ood_metrics([3.0, 2.0, 1.0], [0.0, 1.5])
    >>> round(result["auroc"], 4)
    0.8333
    """
    in_scores = _check_scores(in_scores, "in_scores")
    out_scores = _check_scores(out_scores, "out_scores")
    if not 0.0 < tpr_level <= 1.0:
        raise ValueError(f"`tpr_level` must be in (0, 1]. Received: {tpr_level}")
    labels = np.concatenate([np.ones_like(in_scores), np.zeros_like(out_scores)])
    scores = np.concatenate([in_scores, out_scores])
    fpr, tpr, thresholds = sk_metrics.roc_curve(labels, scores, drop_intermediate=False)
    index = int(np.argmax(tpr >= tpr_level - 1e-12))
    return {
        "auroc": float(sk_metrics.roc_auc_score(labels, scores)),
        "fpr_at_95_tpr": float(fpr[index]),
        "threshold_at_95_tpr": float(thresholds[index]),
        "tpr_level": float(tpr_level),
        "num_in": int(in_scores.size),
        "num_out": int(out_scores.size),
    }


def score_histogram(
    in_scores, out_scores, path, score_name="score", in_name="in-distribution", num_bins=50
):
    """Overlaid, normalised histograms of OOD scores, one per dataset, as a PNG.

    The x-range is the 0.5-99.5 percentile range of all scores (outliers go to the edge bins),
    so one exploding score does not squash the others.

    Args:
        in_scores: array of in-distribution scores.
        out_scores: dict `{name: scores}` of OOD sets (or one array, named "out-of-distribution").
        path: output `.png` path.
        score_name: str, x-axis label. Defaults to `"score"`.
        in_name: str, legend label of the in-distribution set. Defaults to `"in-distribution"`.
        num_bins: int. Defaults to `50`.

    Returns:
        The path written.

    Example:

    >>> score_histogram(s_in, {"svhn": s_svhn}, "hist.png", "logsumexp")  # doctest: +SKIP
    """
    if not isinstance(out_scores, dict):
        out_scores = {"out-of-distribution": out_scores}
    series = {in_name: _check_scores(in_scores, "in_scores")}
    for name, values in out_scores.items():
        series[name] = _check_scores(values, f"out_scores[{name!r}]")
    everything = np.concatenate(list(series.values()))
    low, high = np.percentile(everything, [0.5, 99.5])
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, int(num_bins) + 1)
    figure, axes = _figures.new_figure(figsize=(6.0, 4.0))
    for index, (name, values) in enumerate(series.items()):
        axes.hist(
            np.clip(values, low, high), bins=edges, density=True, histtype="stepfilled",
            alpha=0.35 if index else 0.5, label=f"{name} (n={values.size})",
            color=f"C{index}", edgecolor=f"C{index}", linewidth=1.0,
        )
    axes.set_xlabel(f"{score_name} (higher = more in-distribution)")
    axes.set_ylabel("density")
    axes.set_title(f"OOD score: {score_name}", fontsize=10)
    axes.legend(fontsize=8)
    return _figures.save_figure(figure, path)
