"""Feature extractors for IS and FID: the pluggable `FeatureExtractor` and Keras' InceptionV3.

The default extractor is Keras' `InceptionV3`; its ImageNet weights cannot be downloaded here, so
the user gives a local weights file (`find_inception_weights` says where it is looked for).
"""

import os
import warnings

import numpy as np

INCEPTION_WEIGHTS_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
INCEPTION_WEIGHTS_FILE_NO_TOP = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
INCEPTION_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"


class FeatureExtractor:
    """A pluggable feature extractor for IS and FID.

    Wraps a function mapping images in [-1, 1] to activations (for FID) and, optionally, one
    mapping them to class probabilities (for IS), applied in batches.

    Args:
        feature_fn: callable, `(B, H, W, C)` float32 images in [-1, 1] -> `(B, D)` activations.
        probability_fn: optional callable, images -> `(B, K)` class probabilities. Without it,
            the Inception Score is not available.
        batch_size: int. Defaults to `50`.
        name: str recorded in the output next to every score. Defaults to `"custom"`.

    Example:

    >>> extractor = FeatureExtractor(lambda x: x.reshape(len(x), -1), name="pixels")
    >>> extractor.features(np.zeros((3, 8, 8, 1))).shape
    (3, 64)
    """

    def __init__(self, feature_fn, probability_fn=None, batch_size=50, name="custom"):
        if not callable(feature_fn):
            raise TypeError(f"`feature_fn` must be callable. Received: {feature_fn!r}")
        if probability_fn is not None and not callable(probability_fn):
            raise TypeError(f"`probability_fn` must be callable. Received: {probability_fn!r}")
        self.feature_fn = feature_fn
        self.probability_fn = probability_fn
        self.batch_size = int(batch_size)
        self.name = name

    @property
    def has_probabilities(self):
        return self.probability_fn is not None

    def _extract_batch(self, batch):
        features = self.feature_fn(batch)
        probabilities = None if self.probability_fn is None else self.probability_fn(batch)
        return features, probabilities

    def extract(self, images):
        """Activations `(N, D)` and class probabilities `(N, K)` (or `None`) in one pass.

        Args:
            images: array `(N, H, W, C)` in [-1, 1].
        """
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"Expected images (N, H, W, C) with N > 0. Received: {images.shape}")
        features, probabilities = [], []
        for start in range(0, images.shape[0], self.batch_size):
            batch_features, batch_probabilities = self._extract_batch(
                images[start : start + self.batch_size]
            )
            batch_features = np.asarray(batch_features, dtype=np.float64)
            features.append(batch_features.reshape(batch_features.shape[0], -1))
            if batch_probabilities is not None:
                probabilities.append(np.asarray(batch_probabilities, dtype=np.float64))
        features = np.concatenate(features, axis=0)
        probabilities = np.concatenate(probabilities, axis=0) if probabilities else None
        return features, probabilities

    def features(self, images):
        """Activations `(N, D)` of images `(N, H, W, C)` in [-1, 1]."""
        return self.extract(images)[0]

    def probabilities(self, images):
        """Class probabilities `(N, K)`; raises `ValueError` without a `probability_fn`."""
        if not self.has_probabilities:
            raise ValueError(
                f"Feature extractor {self.name!r} has no classifier: the Inception Score needs "
                "class probabilities (for InceptionV3, use the weights file with the top, "
                f"{INCEPTION_WEIGHTS_FILE!r})."
            )
        return self.extract(images)[1]


def find_inception_weights(path=None):
    """Locate a local Keras InceptionV3 weights file; never downloads.

    Args:
        path: a weights file, or a folder holding one of the Keras file names. Defaults to
            `None`: look in the Keras cache folder (`$KERAS_HOME/models`, by default
            `~/.keras/models`), where `keras.applications` keeps downloaded weights.

    Returns:
        A tuple `(path, include_top)`.

    Raises:
        FileNotFoundError: with instructions on which file to put where.
    """
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    cache_dir = os.path.join(keras_home, "models")
    names = (INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_FILE_NO_TOP)
    if path is None:
        folders = [cache_dir]
    elif os.path.isdir(os.fspath(path)):
        folders = [os.fspath(path)]
    else:
        folders = []
        path = os.path.expanduser(os.fspath(path))
        if os.path.isfile(path):
            return path, "notop" not in os.path.basename(path)
    for folder in folders:
        for name in names:
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate):
                return candidate, name == INCEPTION_WEIGHTS_FILE
    where = f"at {path!r}" if path is not None else f"in the Keras cache folder {cache_dir!r}"
    raise FileNotFoundError(
        f"No InceptionV3 weights found {where}, and they cannot be downloaded here (no "
        "internet). Copy Keras' ImageNet weights file onto this machine: "
        f"{INCEPTION_WEIGHTS_FILE!r} (with the classifier: IS and FID) or "
        f"{INCEPTION_WEIGHTS_FILE_NO_TOP!r} (FID only), from {INCEPTION_WEIGHTS_URL} or from "
        "~/.keras/models/ on a machine where keras.applications.InceptionV3(weights='imagenet') "
        f"has run. Put it in {cache_dir!r}, or anywhere and pass its path "
        "(`--fid_weights PATH` for trainers.evaluate)."
    )


class InceptionFeatureExtractor(FeatureExtractor):
    """Keras' InceptionV3 as the IS/FID feature extractor: 2048-d pool features and, with the
    classifier top, 1000-class probabilities.

    Images in [-1, 1] are resized (bilinear) to `image_size` and grey images are repeated to
    3 channels; [-1, 1] is already InceptionV3's input range. The weights are read from a local
    file only: offline, nothing is downloaded.

    Args:
        weights: path to a Keras InceptionV3 weights `.h5` file (or a folder holding one), or
            `"default"` to look in `~/.keras/models`. `None` builds a randomly initialised
            network: only for tests, its scores mean nothing. Required.
        include_top: bool or `None`. `None` infers it from the file name (`..._notop.h5` has
            no top). Defaults to `None`.
        image_size: int, the side the images are resized to. Defaults to `299`.
        batch_size: int. Defaults to `50`.

    Example:

    >>> extractor = InceptionFeatureExtractor(
    ...     "~/.keras/models/inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
    ... )  # doctest: +SKIP
    >>> quality = sample_quality(samples, extractor, reference_statistics)  # doctest: +SKIP
    """

    def __init__(self, weights, include_top=None, image_size=299, batch_size=50):
        import keras
        import tensorflow as tf

        if weights is None:
            path, inferred_top = None, True
            warnings.warn(
                "InceptionFeatureExtractor(weights=None) uses random weights: IS/FID values are "
                "meaningless (use it for tests only).",
                stacklevel=2,
            )
        else:
            path, inferred_top = find_inception_weights(None if weights == "default" else weights)
        include_top = inferred_top if include_top is None else bool(include_top)
        image_size = int(image_size)
        if image_size < 75:
            raise ValueError(f"InceptionV3 needs image_size >= 75. Received: {image_size}")
        try:
            network = keras.applications.InceptionV3(
                include_top=include_top,
                weights=path,
                input_shape=(image_size, image_size, 3),
                pooling=None if include_top else "avg",
            )
        except ValueError as error:
            raise ValueError(
                f"Could not load InceptionV3 weights from {path!r} with include_top={include_top}: "
                f"{error}. Files named {INCEPTION_WEIGHTS_FILE_NO_TOP!r} need include_top=False, "
                f"{INCEPTION_WEIGHTS_FILE!r} include_top=True."
            ) from error
        if include_top:
            network = keras.Model(
                network.inputs, [network.get_layer("avg_pool").output, network.outputs[0]]
            )

        @tf.function(reduce_retracing=True)
        def forward(images):
            images = tf.convert_to_tensor(images, tf.float32)
            if images.shape[-1] == 1:
                images = tf.repeat(images, 3, axis=-1)
            images = tf.image.resize(images, (image_size, image_size), method="bilinear")
            return network(tf.clip_by_value(images, -1.0, 1.0), training=False)

        def feature_fn(images):
            outputs = forward(images)
            return (outputs[0] if include_top else outputs).numpy()

        def probability_fn(images):
            return forward(images)[1].numpy()

        super().__init__(
            feature_fn,
            probability_fn if include_top else None,
            batch_size=batch_size,
            name="Keras-InceptionV3" + ("" if path else " (random weights)"),
        )
        self.weights = path
        self.include_top = include_top
        self.image_size = image_size
        self.network = network
        self._forward = forward

    def _extract_batch(self, batch):
        outputs = self._forward(batch)
        if self.include_top:
            return outputs[0].numpy(), outputs[1].numpy()
        return outputs.numpy(), None
