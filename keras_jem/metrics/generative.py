"""Generation quality: Inception Score, Frechet distance (FID) and pluggable feature extractors.

Both scores are computed from activations, so any feature extractor can be plugged in. The
default extractor is Keras' `InceptionV3`; its ImageNet weights cannot be downloaded here, so
the user gives a local weights file. Numbers computed with Keras' InceptionV3 are labelled
"Keras-InceptionV3": they are close to, but not identical with, the TF1 "inception-2015-12-05"
graph the papers used (see ALGORITHMS.md section 3.6). The extractors live in
`keras_jem.metrics.feature_extractors` and are re-exported here.
"""

import json
import os
import warnings

import numpy as np
import scipy.linalg

from keras_jem.metrics.feature_extractors import INCEPTION_WEIGHTS_FILE
from keras_jem.metrics.feature_extractors import INCEPTION_WEIGHTS_FILE_NO_TOP
from keras_jem.metrics.feature_extractors import INCEPTION_WEIGHTS_URL
from keras_jem.metrics.feature_extractors import FeatureExtractor
from keras_jem.metrics.feature_extractors import InceptionFeatureExtractor
from keras_jem.metrics.feature_extractors import find_inception_weights

# ---------------------------------------------------------------------------------------------
# Inception Score


def inception_score(probabilities, num_splits=1):
    """Inception Score `exp(E_x KL(p(y|x) || p(y)))` from class probabilities.

    Args:
        probabilities: array `(N, num_classes)` of class probabilities (rows sum to 1) given by
            the classifier of the feature extractor (for the papers: Inception's softmax).
        num_splits: int, the score is computed on this many equal splits and averaged; the
            papers use `max(1, N // 5000)`. Defaults to `1`.

    Returns:
        A tuple `(mean, std)` over the splits (`std` is 0 for one split).

    Example:

    >>> mean, std = inception_score(np.eye(10))  # ten confident, diverse predictions
    >>> round(mean, 6), std
    (10.0, 0.0)
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] == 0:
        raise ValueError(
            "Expected `probabilities` of shape (N, num_classes) with N > 0. "
            f"Received: shape={probabilities.shape}"
        )
    if not np.all(np.isfinite(probabilities)) or probabilities.min() < 0:
        raise ValueError("`probabilities` must be finite and non-negative (pass softmax outputs).")
    row_sums = probabilities.sum(axis=1)
    if not np.allclose(row_sums, 1.0, atol=1e-3):
        raise ValueError(
            "Each row of `probabilities` must sum to 1 (pass softmax outputs, not logits). "
            f"Received row sums in [{row_sums.min():.4g}, {row_sums.max():.4g}]"
        )
    num_splits = int(num_splits)
    if not 1 <= num_splits <= probabilities.shape[0]:
        raise ValueError(
            f"`num_splits` must be in [1, N={probabilities.shape[0]}]. Received: {num_splits}"
        )
    scores = []
    for part in np.array_split(probabilities, num_splits):
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(float(np.exp(terms.sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------
# Frechet distance


def activation_statistics(activations):
    """Mean and covariance of activations, the sufficient statistics of the FID.

    Args:
        activations: array `(N, D)` with N >= 2.

    Returns:
        A tuple `(mu, sigma)`: float64 arrays `(D,)` and `(D, D)`.

    Example:

    >>> mu, sigma = activation_statistics(np.random.normal(size=(100, 4)))
    >>> mu.shape, sigma.shape
    ((4,), (4, 4))
    """
    activations = np.asarray(activations, dtype=np.float64)
    if activations.ndim != 2 or activations.shape[0] < 2:
        raise ValueError(
            "Expected activations of shape (N, D) with N >= 2. "
            f"Received: shape={activations.shape}"
        )
    if not np.all(np.isfinite(activations)):
        raise ValueError("Activations contain NaN or infinite values.")
    return activations.mean(axis=0), np.atleast_2d(np.cov(activations, rowvar=False))


def _trace_sqrt_product(sigma1, sigma2, eps):
    """`trace(sqrtm(sigma1 @ sigma2))`, robust to near-singular covariances.

    Tries SciPy's `sqrtm` as-is; if the result is not finite or has a noticeable imaginary
    part, retries with `eps * I` added to both covariances; as the last resort uses the
    symmetric form `sum(sqrt(eigvalsh(sqrt(sigma1) @ sigma2 @ sqrt(sigma1))))`, which is real
    for any positive semi-definite inputs. Tiny imaginary parts (round-off) are discarded.
    """
    dim = sigma1.shape[0]
    attempts = [(sigma1, sigma2)]
    if eps > 0:
        offset = eps * np.eye(dim)
        attempts.append((sigma1 + offset, sigma2 + offset))
    for first, second in attempts:
        product = first @ second
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = scipy.linalg.sqrtm(product)
        if isinstance(root, tuple):  # very old SciPy returned (root, error)
            root = root[0]
        if not np.all(np.isfinite(root)):
            continue
        if np.iscomplexobj(root):
            scale = max(1.0, float(np.max(np.abs(root.real))))
            if np.max(np.abs(np.diagonal(root).imag)) > 1e-3 * scale:
                continue
            root = root.real
        return float(np.trace(root))
    # Symmetric fallback: eigenvalues of a PSD matrix, clipped at 0.
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2.0)
    sqrt_first = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = sqrt_first @ ((sigma2 + sigma2.T) / 2.0) @ sqrt_first
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    warnings.warn(
        "scipy.linalg.sqrtm gave an unusable result on these (near-singular) covariances; "
        "used the symmetric eigenvalue form of trace(sqrtm(sigma1 @ sigma2)) instead.",
        RuntimeWarning,
        stacklevel=3,
    )
    return float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between two Gaussians, the FID when fitted to network activations.

    `d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 @ sigma2))`.

    Near-singular covariances (fewer samples than feature dimensions, dead units) are handled:
    `eps * I` is added when the square root is not usable, tiny imaginary parts are discarded,
    and the result is always a real float (never complex, never an exception for PSD inputs).

    Args:
        mu1: array `(D,)`, mean of the first set of activations.
        sigma1: array `(D, D)`, covariance of the first set.
        mu2: array `(D,)`, mean of the second set.
        sigma2: array `(D, D)`, covariance of the second set.
        eps: float, diagonal offset used when the plain square root fails. Defaults to `1e-6`.

    Returns:
        A non-negative float.

    Example:

    >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))
    2.0
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"The two means have different shapes. Received: {mu1.shape} and {mu2.shape}. "
            "Were the statistics computed with the same feature extractor?"
        )
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"Expected covariances of shape ({dim}, {dim}). "
            f"Received: {sigma1.shape} and {sigma2.shape}"
        )
    diff = mu1 - mu2
    trace_root = _trace_sqrt_product(sigma1, sigma2, eps)
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)
    return max(value, 0.0)


def fid_from_activations(activations1, activations2, eps=1e-6):
    """FID between two sets of activations (see `frechet_distance`).

    Example:

    >>> a = np.random.normal(size=(500, 8))
    >>> fid_from_activations(a, a) < 1e-6
    True
    """
    mu1, sigma1 = activation_statistics(activations1)
    mu2, sigma2 = activation_statistics(activations2)
    return frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)


def save_statistics(path, mu, sigma, **metadata):
    """Save reference statistics `(mu, sigma)` to a `.npz` file, with JSON-able metadata.

    Args:
        path: output path (`.npz` is appended by NumPy when missing).
        mu: array `(D,)`.
        sigma: array `(D, D)`.
        **metadata: JSON-serializable facts about how they were computed (dataset, split,
            number of images, extractor...).

    Returns:
        The path written.

    Example:

    >>> save_statistics("cifar10_train.npz", mu, sigma, dataset="cifar10")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    np.savez(
        path,
        mu=np.asarray(mu, np.float64),
        sigma=np.asarray(sigma, np.float64),
        metadata=np.array(json.dumps(metadata)),
    )
    return path


def load_statistics(path):
    """Load statistics written by `save_statistics`: a dict with `mu`, `sigma`, `metadata`.

    Also accepts the `.npz` layout of the TTUR / pytorch-fid reference files (`mu`, `sigma`).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No reference statistics file at {path!r}.")
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in ("mu", "sigma") if key not in data.files]
        if missing:
            raise ValueError(
                f"{path!r} is not a statistics file: missing arrays {missing}; "
                f"found {data.files}. Write it with `save_statistics`."
            )
        metadata = json.loads(str(data["metadata"])) if "metadata" in data.files else {}
        return {"mu": data["mu"], "sigma": data["sigma"], "metadata": metadata}




# ---------------------------------------------------------------------------------------------
# Protocol helpers


def select_top_k_per_class(probabilities, ratio):
    """Indices of the most confident examples within each predicted class.

    The papers' buffer protocol (SADA-JEM, JEM++, GMMC): classify every replay-buffer sample,
    keep the top-k by max-softmax confidence within each predicted class.

    Args:
        probabilities: array `(N, num_classes)`, the model's class probabilities.
        ratio: float. `ratio <= 1` keeps that fraction of each class (at least one image per
            non-empty class); `ratio > 1` keeps `int(ratio)` images per class (all when the
            class has fewer).

    Returns:
        Sorted int64 array of selected indices.

    Example:

    >>> select_top_k_per_class([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], ratio=1)
    array([0, 1, 2])
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2:
        raise ValueError(f"Expected probabilities (N, num_classes). Received: {probabilities.shape}")
    ratio = float(ratio)
    if ratio <= 0:
        raise ValueError(f"`ratio` must be positive. Received: ratio={ratio}")
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    selected = []
    for label in np.unique(predicted):
        members = np.flatnonzero(predicted == label)
        members = members[np.argsort(-confidence[members], kind="stable")]
        keep = max(1, int(len(members) * ratio)) if ratio <= 1 else int(ratio)
        selected.append(members[:keep])
    if not selected:
        return np.zeros((0,), np.int64)
    return np.sort(np.concatenate(selected)).astype(np.int64)


def sample_quality(images, extractor, reference_statistics=None, num_splits=None):
    """Inception Score and FID of a set of images with a feature extractor.

    Args:
        images: array `(N, H, W, C)` in [-1, 1].
        extractor: a `FeatureExtractor` (e.g. `InceptionFeatureExtractor`).
        reference_statistics: dict with `mu` and `sigma` (see `load_statistics`) of the real
            data, or `None` to skip FID.
        num_splits: int, IS splits. Defaults to the papers' `max(1, N // 5000)`.

    Returns:
        A dict with `num_images`, `extractor`, `inception_score`, `inception_score_std`, `fid`
        (`None` when not available, with the reason under `"skipped"`).

    Example:

    >>> quality = sample_quality(samples, extractor, load_statistics("ref.npz"))  # doctest: +SKIP
    """
    images = np.asarray(images, dtype=np.float32)
    result = {
        "num_images": int(images.shape[0]),
        "extractor": extractor.name,
        "inception_score": None,
        "inception_score_std": None,
        "fid": None,
        "skipped": {},
    }
    features, probabilities = extractor.extract(images)
    if probabilities is not None:
        splits = max(1, images.shape[0] // 5000) if num_splits is None else num_splits
        mean, std = inception_score(probabilities, num_splits=splits)
        result.update(inception_score=mean, inception_score_std=std, inception_score_splits=splits)
    else:
        result["skipped"]["inception_score"] = "the feature extractor has no classifier top"
    if reference_statistics is not None:
        mu, sigma = activation_statistics(features)
        if mu.shape != np.shape(reference_statistics["mu"]):
            raise ValueError(
                f"The reference statistics have dimension {np.shape(reference_statistics['mu'])}, "
                f"the extractor gives {mu.shape}: they come from different extractors."
            )
        result["fid"] = frechet_distance(
            mu, sigma, reference_statistics["mu"], reference_statistics["sigma"]
        )
    else:
        result["skipped"]["fid"] = "no reference statistics"
    if not result["skipped"]:
        del result["skipped"]
    return result


__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_FILE_NO_TOP",
    "INCEPTION_WEIGHTS_URL",
    "FeatureExtractor",
    "InceptionFeatureExtractor",
    "activation_statistics",
    "fid_from_activations",
    "find_inception_weights",
    "frechet_distance",
    "inception_score",
    "load_statistics",
    "sample_quality",
    "save_statistics",
    "select_top_k_per_class",
]
