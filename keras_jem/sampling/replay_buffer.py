"""The persistent-chain replay buffer, held in Keras variables."""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_jem.sampling import noise

INITIALIZATIONS = ("uniform", "gaussian_mixture")
COVARIANCES = ("full", "diagonal")


@keras.saving.register_keras_serializable(package="keras_jem")
class ReplayBuffer(keras.layers.Layer):
    """A replay buffer of persistent Markov chains for contrastive-divergence training.

    The chains live in a non-trainable Keras variable `images` of shape `(size, *image_shape)`, so
    they are saved by `model.save`, `model.save_weights` and `BackupAndRestore` with the model.
    Each training step:

    1. `draw` picks `batch_size` chains (distinct chains, or for class-conditional sampling a
       random chain in the block of each label: the buffer is split into `num_classes` contiguous
       blocks of `size / num_classes`), and replaces each of them with a fresh start with
       probability `reinit_probability`;
    2. the sampler runs the chains;
    3. `write` stores the final states back at the same indices.

    Fresh starts are uniform in `value_range` (JEM) or drawn from a per-class Gaussian fitted to
    the training data (`initialization="gaussian_mixture"`, JEM++/SADA-JEM's informative init);
    the latter requires `adapt(images, labels)` once before training. With the Gaussian
    mixture, `uniform_fraction` of the fresh starts are uniform noise instead: chains started
    only from the mixture never visit noise-like images, so the energy of such images is never
    trained and the density of uniform noise comes out above or below the data's depending on
    the seed (docs/batch_norm.md).

    Under `tf.distribute` (R replicas) every replica holds a full, identical copy of the chains:
    replica r draws only from its own contiguous shard (`[r * size / R, (r + 1) * size / R)`,
    or that part of each class block), so no two replicas continue the same chain, and `write`
    all-gathers the chains of every replica and applies them to every copy, so none is lost. The
    saved buffer is the one full buffer, whatever the replica count it is restored onto.

    Args:
        size: number of chains (papers: 10000).
        initialization: `"uniform"` or `"gaussian_mixture"`.
        reinit_probability: probability that a drawn chain restarts from a fresh sample (0.05).
        num_classes: number of classes; required for class-conditional draws and the Gaussian
            mixture.
        value_range: `(low, high)` of the data; fresh samples are clipped to it.
        covariance: `"full"` (the papers) or `"diagonal"` (for large images/many classes, where
            full covariances do not fit in memory) for the Gaussian mixture.
        jitter: added to the covariance diagonal before the Cholesky factorisation (1e-4).
        seed: seed of the uniform initial buffer.
        uniform_fraction: with `initialization="gaussian_mixture"`, the probability that a
            fresh start (a restart, or a chain of `reset`) is uniform noise rather than a draw
            from the class Gaussians (0: the papers' informative init only).

    Example:

    >>> buffer = ReplayBuffer(size=1000, num_classes=10)
    >>> buffer.build((8, 8, 1))
    >>> indices, x0, reinit = buffer.draw(64, seed=tf.constant([0, 1], "int64"))
    >>> buffer.write(indices, sampler(model, x0))
    """

    def __init__(
        self,
        size=10000,
        initialization="uniform",
        reinit_probability=0.05,
        num_classes=None,
        value_range=(-1.0, 1.0),
        covariance="full",
        jitter=1e-4,
        seed=None,
        uniform_fraction=0.0,
        **kwargs,
    ):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if int(size) != size or size < 1:
            raise ValueError(f"`size` must be a positive integer. Received: size={size}")
        if initialization not in INITIALIZATIONS:
            raise ValueError(
                f"`initialization` must be one of {INITIALIZATIONS}. "
                f"Received: initialization={initialization!r}"
            )
        if not 0.0 <= reinit_probability <= 1.0:
            raise ValueError(
                "`reinit_probability` must be in [0, 1]. "
                f"Received: reinit_probability={reinit_probability}"
            )
        if not 0.0 <= uniform_fraction <= 1.0:
            raise ValueError(
                f"`uniform_fraction` must be in [0, 1]. Received: uniform_fraction={uniform_fraction}")
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
            raise ValueError(f"`num_classes` must be a positive integer. Received: {num_classes}")
        if initialization == "gaussian_mixture" and num_classes is None:
            raise ValueError(
                "`initialization='gaussian_mixture'` fits one Gaussian per class and needs "
                "`num_classes`. Received: num_classes=None"
            )
        if covariance not in COVARIANCES:
            raise ValueError(
                f"`covariance` must be one of {COVARIANCES}. Received: covariance={covariance!r}"
            )
        low, high = (float(v) for v in value_range)
        if not low < high:
            raise ValueError(f"`value_range` must be (low, high). Received: {value_range}")
        self.size = int(size)
        self.initialization = initialization
        self.reinit_probability = float(reinit_probability)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.value_range = (low, high)
        self.covariance = covariance
        self.jitter = float(jitter)
        self.seed = seed
        self.uniform_fraction = float(uniform_fraction)

    def _set_image_shape(self, image_shape):
        """Checks and keeps the shape of one image; returns it as a tuple of ints."""
        image_shape = tuple(int(d) for d in image_shape)
        if len(image_shape) != 3:
            raise ValueError(
                f"{type(self).__name__}.build expects the shape of one image (height, width, "
                f"channels). Received: {image_shape}"
            )
        self.image_shape = image_shape
        return image_shape

    def build(self, image_shape):
        image_shape = self._set_image_shape(image_shape)
        self.images = self.add_weight(
            name="images",
            shape=(self.size,) + image_shape,
            initializer=keras.initializers.RandomUniform(*self.value_range, seed=self.seed),
            trainable=False,
            autocast=False,
        )
        if self.initialization == "gaussian_mixture":
            dim = math.prod(image_shape)
            scale_shape = (self.num_classes, dim, dim) if self.covariance == "full" else (
                self.num_classes, dim)
            self.class_means = self.add_weight(
                name="class_means", shape=(self.num_classes, dim), initializer="zeros",
                trainable=False, autocast=False,
            )
            self.class_scales = self.add_weight(
                name="class_scales", shape=scale_shape, initializer="zeros", trainable=False,
                autocast=False,
            )
            self.adapted = self.add_weight(
                name="adapted", shape=(), initializer="zeros", trainable=False, autocast=False
            )
        self.built = True

    # === Informative initialisation ===

    @property
    def is_adapted(self):
        if self.initialization != "gaussian_mixture":
            return True
        return bool(self.built and float(self.adapted.numpy()) > 0)

    def adapt(self, images, labels, seed=0):
        """Fits one Gaussian per class to `images` and refills the buffer from the mixture.

        Args:
            images: float array `(n, *image_shape)` in `value_range`.
            labels: int array `(n,)` in `[0, num_classes)`.
            seed: seed for the refill.
        """
        images = np.asarray(images)
        if images.dtype.kind != "f":
            images = images.astype(np.float32)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if not self.built:
            self.build(images.shape[1:])
        if images.shape[1:] != self.image_shape or len(images) != len(labels):
            raise ValueError(
                f"`adapt` expects images of shape (n, {self.image_shape}) and n labels. "
                f"Received images {images.shape} and labels {labels.shape}"
            )
        num_classes = self.num_classes or int(labels.max()) + 1
        # The images stay in their own dtype; each class is copied to float64 only while its
        # statistics are computed (a float64 copy of 50000 CIFAR images, plus its centred copy,
        # would take 2.5 GB).
        flat = images.reshape(len(images), -1)
        dim = flat.shape[1]
        means = np.zeros((num_classes, dim))
        # float32 factors, filled class by class: a float64 (classes, dim, dim) array plus its
        # float32 copy would hold three times the memory of the buffer's own variable (about
        # 1.1 GB more for CIFAR-10).
        scales = np.zeros((num_classes, dim, dim) if self.covariance == "full" else (
            num_classes, dim), np.float32)
        pooled_mean = flat.mean(axis=0, dtype=np.float64)
        for c in range(num_classes):
            members = flat[labels == c].astype(np.float64)
            if len(members) >= 2:
                means[c] = members.mean(axis=0)
                centered = members - means[c]
            else:
                # Too few examples to estimate a covariance: use the pooled statistics.
                means[c] = members[0] if len(members) else pooled_mean
                centered = flat.astype(np.float64) - pooled_mean
            del members
            if self.covariance == "full":
                cov = centered.T @ centered / (len(centered) - 1) + self.jitter * np.eye(dim)
                del centered
                scales[c] = np.linalg.cholesky(cov)
                del cov
            else:
                scales[c] = np.sqrt(centered.var(axis=0, ddof=1) + self.jitter)
                del centered
        if self.initialization == "gaussian_mixture":
            self.class_means.assign(means.astype(np.float32))
            self.class_scales.assign(scales)
            self.adapted.assign(1.0)
            self.images.assign(
                self._numpy_mixture_samples(means, scales, seed).astype(np.float32)
            )
        return means, scales

    def _numpy_mixture_samples(self, means, scales, seed):
        """`size` float32 samples of the mixture: equal class blocks, then random classes."""
        rng = np.random.default_rng(seed)
        num_classes, dim = means.shape
        block = self.size // num_classes
        labels = np.concatenate(
            [np.repeat(np.arange(num_classes), block),
             rng.integers(0, num_classes, self.size - block * num_classes)]
        )
        samples = np.empty((self.size, dim), np.float32)
        # Class by class, in float32: gathering one (dim, dim) factor per chain would need
        # size * dim^2 floats (703 GiB for 10000 CIFAR chains). Written by hand rather than with
        # tensorflow-probability: `MixtureSameFamily(Categorical, MultivariateNormalTriL)`
        # draws every component for every sample and then selects one (size x classes x dim
        # floats and `classes` times the matmuls: 1.2 GB and 10x the work for 10000 CIFAR-10
        # chains), and it assigns classes at random, while class-conditional sampling needs
        # exact blocks of `size / classes` chains per class. A per-class
        # `MultivariateNormalTriL(means[c], scales[c]).sample(n)` is this same `z @ L^T`;
        # it would add a dependency (tfp + tf-keras) and change the seeded draws.
        for c in range(num_classes):
            members = np.flatnonzero(labels == c)
            z = rng.standard_normal((len(members), dim), dtype=np.float32)
            offsets = z @ scales[c].T if scales.ndim == 3 else z * scales[c]
            samples[members] = np.clip(means[c] + offsets, *self.value_range)
        return samples.reshape((self.size,) + self.image_shape)

    def reset(self, seed=None):
        """Refills every chain with fresh samples (e.g. for sampling from scratch)."""
        seed = tf.constant([0 if seed is None else seed, 7], tf.int64)
        for start in range(0, self.size, 1024):
            count = min(1024, self.size - start)
            labels = None
            if self.num_classes is not None and self.initialization == "gaussian_mixture":
                block = self.size // self.num_classes
                labels = tf.minimum(
                    tf.range(start, start + count) // max(block, 1), self.num_classes - 1)
            fresh = self.fresh_samples(count, labels=labels, seed=noise.fold_in(seed, start))
            self.images.value[start:start + count].assign(fresh)

    # === Chains ===

    def stored_images(self):
        """Every chain, float32 in `value_range` (`(size, *image_shape)`)."""
        return tf.convert_to_tensor(self.images)

    def fresh_samples(self, batch_size, labels=None, seed=None):
        """Fresh chain starts: uniform noise, or the class Gaussians (labels random if None).

        `batch_size` may be a Python int (static shape) or a scalar int tensor.
        """
        if seed is None:
            seed = tf.random.uniform((2,), maxval=2**31 - 1, dtype=tf.int64)
        if isinstance(batch_size, int):
            shape = (batch_size,) + self.image_shape
        else:
            shape = tf.concat([tf.reshape(tf.cast(batch_size, tf.int32), (1,)),
                               tf.constant(self.image_shape, tf.int32)], axis=0)
        if self.initialization == "uniform":
            return tf.random.stateless_uniform(
                shape, seed, minval=self.value_range[0], maxval=self.value_range[1]
            )
        mixture = self._mixture_samples(shape, labels, seed)
        if self.uniform_fraction <= 0.0:
            return mixture
        uniform = tf.random.stateless_uniform(
            shape, noise.fold_in(seed, 3), minval=self.value_range[0], maxval=self.value_range[1])
        use_uniform = tf.random.stateless_uniform(shape[:1], noise.fold_in(seed, 4)) < (
            self.uniform_fraction)
        rank = len(self.image_shape)
        return tf.where(tf.reshape(use_uniform, [-1] + [1] * rank), uniform, mixture)

    def _mixture_samples(self, shape, labels, seed):
        """Draws from the class Gaussians (labels random if None), clipped to `value_range`."""
        if labels is None:
            labels = tf.random.stateless_uniform(
                shape[:1], noise.fold_in(seed, 1), maxval=self.num_classes, dtype=tf.int32
            )
        labels = tf.cast(labels, tf.int32)
        dim = math.prod(self.image_shape)
        z = tf.random.stateless_normal(tf.stack([shape[0], dim]), noise.fold_in(seed, 2))
        means = tf.gather(self.class_means, labels)
        if self.covariance == "full":
            offsets = self._full_covariance_offsets(z, labels)
        else:
            offsets = tf.gather(self.class_scales, labels) * z
        samples = tf.clip_by_value(means + offsets, *self.value_range)
        return tf.reshape(samples, shape)

    def _full_covariance_offsets(self, z, labels):
        """`z_i @ L_{y_i}^T` for every row: one matmul per class present in `labels`.

        Never materialises a (dim, dim) factor per row, nor every row against every class
        (b x classes x dim^2 multiply-adds, 6 GFLOP per CIFAR batch of 64).
        """

        def one_class(c, offsets):
            rows = tf.where(tf.equal(labels, c))

            def transform():
                part = tf.matmul(tf.gather_nd(z, rows), tf.gather(self.class_scales, c),
                                 transpose_b=True)
                return tf.tensor_scatter_nd_update(offsets, rows, part)

            return c + 1, tf.cond(tf.size(rows) > 0, transform, lambda: offsets)

        _, offsets = tf.while_loop(
            lambda c, _: c < self.num_classes, one_class, (tf.constant(0), tf.zeros_like(z)),
            parallel_iterations=1,
        )
        return offsets

    def _check_draw(self, batch_size, labels):
        if isinstance(batch_size, int) and batch_size > self.size:
            raise ValueError(
                f"The replay buffer holds {self.size} chains, fewer than the batch of "
                f"{batch_size} drawn from it. Use a buffer at least as large as the batch."
            )
        if labels is not None:
            if self.num_classes is None:
                raise ValueError(
                    "Class-conditional draws need a buffer built with `num_classes`."
                )
            if self.size % self.num_classes:
                raise ValueError(
                    f"Class-conditional sampling splits the buffer into {self.num_classes} "
                    f"equal blocks, but size={self.size} is not divisible by "
                    f"num_classes={self.num_classes}. Use a multiple of {self.num_classes}."
                )

    def draw(self, batch_size, labels=None, seed=None):
        """Draws chains to continue.

        Args:
            batch_size: number of chains (a Python int).
            labels: optional int tensor `(batch_size,)`: draw each chain from its class block.
            seed: stateless seed, int64 `(2,)`.

        Returns:
            `(indices, images, reinitialized)`: buffer indices `(batch_size,)`, the starting
            images, and a boolean mask of the chains that restarted from a fresh sample.
        """
        self._check_draw(batch_size, labels)
        if seed is None:
            seed = tf.random.uniform((2,), maxval=2**31 - 1, dtype=tf.int64)
        replica, replicas = _replica()
        if labels is None:
            # Distinct chains: the top-k of random keys is a draw without replacement. Under
            # tf.distribute each replica draws from its own contiguous shard of the chains.
            keys = tf.random.stateless_uniform((self.size,), noise.fold_in(seed, 0))
            if replicas > 1:
                self._check_shard(batch_size, self.size // replicas, replicas, "chains",
                                  batch_size * replicas)
                low, high = _shard_bounds(self.size, replica, replicas)
                position = tf.range(self.size)
                keys = tf.where((position >= low) & (position < high), keys, -1.0)
            indices = tf.math.top_k(keys, batch_size, sorted=False).indices
        else:
            block = self.size // self.num_classes
            low, high = 0, block
            if replicas > 1:
                self._check_shard(1, block // replicas, replicas, "chains of each class block",
                                  replicas * self.num_classes)
                low, high = _shard_bounds(block, replica, replicas)
            offsets = tf.random.stateless_uniform(
                (batch_size,), noise.fold_in(seed, 0), maxval=high - low, dtype=tf.int32
            )
            indices = tf.cast(labels, tf.int32) * block + low + offsets
        images = tf.gather(self.images, indices)
        reinitialized = (
            tf.random.stateless_uniform((batch_size,), noise.fold_in(seed, 1))
            < self.reinit_probability
        )
        if self.reinit_probability > 0:
            if self.initialization == "gaussian_mixture" and self.covariance == "full":
                # A full-covariance draw costs dim^2 per chain: draw only the restarted ones.
                restart = tf.where(reinitialized)
                fresh = self.fresh_samples(
                    tf.shape(restart)[0],
                    labels=None if labels is None else tf.gather_nd(labels, restart),
                    seed=noise.fold_in(seed, 2),
                )
                images = tf.tensor_scatter_nd_update(images, restart, fresh)
            else:
                fresh = self.fresh_samples(
                    batch_size, labels=labels, seed=noise.fold_in(seed, 2))
                images = tf.where(reinitialized[:, None, None, None], fresh, images)
        return indices, images, reinitialized

    def _check_shard(self, batch_size, shard_size, replicas, what, needed):
        if isinstance(batch_size, int) and batch_size > shard_size:
            raise ValueError(
                f"Under tf.distribute each of the {replicas} replicas continues chains from "
                f"its own shard of the replay buffer, but a shard holds {shard_size} {what}, "
                f"fewer than the {batch_size} drawn per replica. Use a buffer of at least "
                f"{needed} chains."
            )

    def write(self, indices, images):
        """Writes the final chain states back to `indices`.

        Under `tf.distribute` every replica holds a full copy of the buffer (a mirrored variable
        that each replica updates locally); the chains of all replicas are all-gathered and
        written to every copy, so the copies stay identical and no chain is lost.
        """
        images = tf.cast(tf.stop_gradient(images), self.images.dtype)
        indices = tf.cast(indices, tf.int32)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            indices = context.all_gather(indices, axis=0)
            images = context.all_gather(images, axis=0)
        self.images.value.scatter_update(tf.IndexedSlices(images, indices))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "size": self.size,
                "initialization": self.initialization,
                "reinit_probability": self.reinit_probability,
                "num_classes": self.num_classes,
                "value_range": list(self.value_range),
                "covariance": self.covariance,
                "jitter": self.jitter,
                "seed": self.seed,
                "uniform_fraction": self.uniform_fraction,
            }
        )
        return config


def _replica():
    """`(replica_id, num_replicas)` in a replica context of `tf.distribute`, else `(0, 1)`."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 0, 1
    return context.replica_id_in_sync_group, context.num_replicas_in_sync


def _shard_bounds(size, replica, replicas):
    """`[low, high)` of replica `replica`'s contiguous shard of `size` positions."""
    replica = tf.cast(replica, tf.int32)
    return (replica * size) // replicas, ((replica + 1) * size) // replicas
