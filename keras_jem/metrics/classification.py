"""Accuracy and loss of a classifier, with optional SGLD refinement of the inputs."""

import weakref

import numpy as np
import tensorflow as tf

from keras_jem.metrics import refinement

# model -> {name: tf.function}. The functions reach the model through a weak proxy, so the cache
# does not keep models alive; the entries go away with the model.
_COMPILED = weakref.WeakKeyDictionary()


def model_function(model, name, make):
    """A `tf.function` of `make(model)`, built once per model and name.

    Evaluating several datasets with the same score would otherwise trace a new graph for each
    call.

    Args:
        model: a Keras model or callable.
        name: str key, e.g. the score name.
        make: callable `model -> (x -> tensor)`; it receives a weak proxy of `model`.

    Returns:
        A `tf.function`.
    """
    try:
        per_model = _COMPILED.setdefault(model, {})
        proxy = weakref.proxy(model)
    except TypeError:  # not weak-referenceable: no caching
        return tf.function(make(model), reduce_retracing=True)
    if name not in per_model:
        per_model[name] = tf.function(make(proxy), reduce_retracing=True)
    return per_model[name]


def batched(fn, images, batch_size=100):
    """Apply `fn` (tensor -> tensor) to `images` in batches and concatenate the numpy results.

    `fn` is wrapped in a `tf.function` (with `reduce_retracing`) unless it already is one.

    Args:
        fn: callable on a float32 batch `(B, H, W, C)`.
        images: array `(N, H, W, C)`.
        batch_size: int. Defaults to `100`.

    Returns:
        A numpy array `(N, ...)`.
    """
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
    images = np.asarray(images, dtype=np.float32)
    if images.shape[0] == 0:
        raise ValueError("Received zero images.")
    if not hasattr(fn, "get_concrete_function"):
        fn = tf.function(fn, reduce_retracing=True)
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        outputs.append(np.asarray(fn(tf.constant(images[start : start + batch_size]))))
    return np.concatenate(outputs, axis=0)


def predict_logits(
    model, images, batch_size=100, refine_steps=0, refine_chains=1, refine_step_size=1.0,
    refine_noise=0.01, seed=None,
):
    """Logits of `model` on `images`, computed in batches in inference mode.

    Args:
        model: a Keras model (called with `training=False`) or a callable `x -> logits`.
        images: array `(N, H, W, C)` in [-1, 1].
        batch_size: int. Defaults to `100`.
        refine_steps: int, SGLD refinement steps before classifying (JEM's `test_clf
            --n_steps`). Defaults to `0`.
        refine_chains: int, refined copies whose logits are averaged. Defaults to `1`.
        refine_step_size: float. Defaults to `1.0`.
        refine_noise: float. Defaults to `0.01`.
        seed: optional int seed of the refinement noise.

    Returns:
        A float32 numpy array `(N, num_classes)`.

    Example:

    >>> logits = predict_logits(model, x_test, batch_size=256)  # doctest: +SKIP
    """
    if refine_steps:
        fn = refinement.RefinedLogits(
            model, refine_steps, num_chains=refine_chains, init_noise=0.0,
            step_size=refine_step_size, noise_scale=refine_noise, seed=seed,
        )
    else:
        fn = model_function(model, "logits", refinement.as_logits_fn)
    return batched(fn, images, batch_size).astype(np.float32)


def softmax(logits):
    """Numerically stable softmax over the last axis (numpy)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def classification_metrics(logits, labels):
    """Accuracy and mean cross-entropy from logits.

    Args:
        logits: array `(N, num_classes)`.
        labels: int array `(N,)`.

    Returns:
        A dict with `accuracy`, `loss` (mean cross-entropy, nats), `num_examples`, and per-example
        arrays under `per_example` (`loss`, `correct`, `confidence`), as JEM's `test_clf` saves.

    Example:

    >>> result = classification_metrics(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([0, 0]))
    >>> result["accuracy"]
    0.5
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            "Expected logits (N, num_classes) and labels (N,). "
            f"Received: logits.shape={logits.shape}, labels.shape={labels.shape}"
        )
    if logits.shape[1] < 2:
        raise ValueError(
            f"Classification needs at least 2 classes; the model gives {logits.shape[1]} output "
            "(an unconditional energy model has no classifier)."
        )
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(
            f"Labels must be in [0, {logits.shape[1] - 1}]. "
            f"Received labels in [{labels.min()}, {labels.max()}]"
        )
    if not np.all(np.isfinite(logits)):
        raise ValueError(
            f"The model produced {np.sum(~np.isfinite(logits))} non-finite logits "
            "(did training diverge?)."
        )
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    losses = -log_probs[np.arange(labels.shape[0]), labels]
    correct = logits.argmax(axis=1) == labels
    confidence = np.exp(log_probs.max(axis=1))
    return {
        "accuracy": float(correct.mean()),
        "loss": float(losses.mean()),
        "num_examples": int(labels.shape[0]),
        "per_example": {"loss": losses, "correct": correct, "confidence": confidence},
    }
