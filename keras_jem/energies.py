"""Energy functions shared by the JEM family.

Sign convention (ALGORITHMS.md 0.3): an energy is low where the model puts high density.
For a classifier with logits `f(x)`:

- `E(x, y) = -f(x)[y]`   (class energy)
- `E(x) = -logsumexp_y f(x)[y]`   (marginal energy; `-E(x)` is `log p(x)` up to a constant)
- `p(y | x) = softmax(f(x))`

Samplers descend the energy: `x <- x - step_size * grad_x sum_i E(x_i)`, which is the same as the
PyTorch references' ascent on `F = -E`.
"""

import tensorflow as tf


def logsumexp_energy(logits):
    """Marginal energy `E(x) = -logsumexp(logits)`.

    Args:
        logits: float tensor of shape `(batch, num_classes)`.

    Returns:
        Tensor of shape `(batch,)`.

    Example:

    >>> float(logsumexp_energy(tf.zeros((1, 10)))[0])  # -log(10)
    -2.3025...
    """
    return -tf.reduce_logsumexp(logits, axis=-1)


def class_energy(logits, labels):
    """Class-conditional energy `E(x, y) = -logits[y]`.

    Args:
        logits: float tensor of shape `(batch, num_classes)`.
        labels: int tensor of shape `(batch,)`.

    Returns:
        Tensor of shape `(batch,)`.
    """
    labels = tf.cast(tf.reshape(labels, (-1, 1)), tf.int32)
    return -tf.squeeze(tf.gather(logits, labels, axis=-1, batch_dims=1), axis=-1)


def classifier_energy(logits, labels=None):
    """`E(x)` when `labels` is None, else `E(x, y)`."""
    if labels is None:
        return logsumexp_energy(logits)
    return class_energy(logits, labels)


def mahalanobis_logits(features, centers):
    """Logits of an LDA classifier with identity covariance (GMMC).

    `logits_k(x) = -1/2 ||phi(x) - mu_k||^2`.

    Args:
        features: `(batch, dim)` tensor `phi(x)`.
        centers: `(num_classes, dim)` tensor of class centres `mu_k`.

    Returns:
        `(batch, num_classes)` tensor.
    """
    features = tf.convert_to_tensor(features)
    centers = tf.cast(centers, features.dtype)
    squared = (
        tf.reduce_sum(tf.square(features), axis=-1, keepdims=True)
        - 2.0 * tf.matmul(features, centers, transpose_b=True)
        + tf.reduce_sum(tf.square(centers), axis=-1)[None, :]
    )
    return -0.5 * squared
