"""GMMC: the generative Max-Mahalanobis classifier (Yang et al., ECML 2021)."""

import keras
import numpy as np
import tensorflow as tf

from keras_jem import energies
from keras_jem.models.energy_model import Batch
from keras_jem.models.energy_model import EnergyModel
from keras_jem.models.energy_model import batch_size
from keras_jem.models.energy_model import weighted
from keras_jem.sampling.latent_target import LatentTargetSampler

MODES = ("discriminative", "generative", "joint")


def max_mahalanobis_centers(num_classes, feature_dim, center_scale=10.0):
    """Max-Mahalanobis centres: `num_classes` vectors of norm `center_scale` on a simplex.

    Builds unit vectors with pairwise inner products `-1 / (num_classes - 1)` (the vertices of
    a regular simplex, the most separated arrangement of equal-norm centres) by the GMMC/MMC
    construction: `mu_1 = e_1`; for `k = 2..C`, `mu_k[j] = -(1/(C-1) + <mu_k, mu_j>) / mu_j[j]`
    for `j < k` and `mu_k[k] = sqrt(1 - ||mu_k||^2)`. The vectors span `C - 1` dimensions; they
    are zero-padded to `feature_dim` and scaled by `center_scale`.

    Args:
        num_classes: number of centres C (>= 2).
        feature_dim: dimension of the feature space (>= C - 1).
        center_scale: norm of every centre (GMMC: 10).

    Returns:
        float32 numpy array `(num_classes, feature_dim)`.

    Example:

    >>> centers = max_mahalanobis_centers(10, 128)
    >>> np.round(centers @ centers.T, 3)[0, :3]  # 100, -100/9, -100/9
    array([100.   , -11.111, -11.111], dtype=float32)
    """
    num_classes, feature_dim = int(num_classes), int(feature_dim)
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be >= 2. Received: num_classes={num_classes}")
    if not center_scale > 0:
        raise ValueError(
            f"`center_scale` (the norm of the class centres) must be positive. "
            f"Received: center_scale={center_scale}"
        )
    if feature_dim < num_classes - 1:
        raise ValueError(
            f"{num_classes} Max-Mahalanobis centres span {num_classes - 1} dimensions, but the "
            f"feature dimension is {feature_dim}. Use a backbone with feature_dim >= "
            f"{num_classes - 1}."
        )
    mu = np.zeros((num_classes, num_classes), np.float64)
    mu[0, 0] = 1.0
    for k in range(1, num_classes):
        for j in range(k):
            mu[k, j] = -(1.0 / (num_classes - 1) + mu[k] @ mu[j]) / mu[j, j]
        mu[k, k] = np.sqrt(max(0.0, 1.0 - mu[k] @ mu[k]))
    # The last coordinate is zero (the simplex lives in C - 1 dimensions).
    mu = mu[:, : num_classes - 1]
    centers = np.zeros((num_classes, feature_dim), np.float64)
    centers[:, : num_classes - 1] = mu
    return (float(center_scale) * centers).astype(np.float32)


@keras.saving.register_keras_serializable(package="keras_jem")
class MaxMahalanobisHead(keras.layers.Layer):
    """Fixed-centre LDA head: `logits_k = -1/2 ||phi - mu_k||^2` (no trainable weights).

    The centres (`max_mahalanobis_centers`) are a non-trainable weight `centers`, created at
    build time from the feature dimension, so they are saved with the model.

    Args:
        num_classes: number of classes.
        center_scale: norm of the centres (10).
        **kwargs: base `keras.layers.Layer` arguments.

    Example:

    >>> head = MaxMahalanobisHead(10)
    >>> logits = head(np.zeros((2, 128), "float32"))  # all -50: every centre at distance 10
    """

    def __init__(self, num_classes, center_scale=10.0, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.center_scale = float(center_scale)

    def build(self, input_shape):
        values = max_mahalanobis_centers(self.num_classes, input_shape[-1], self.center_scale)
        self.centers = self.add_weight(
            name="centers",
            shape=values.shape,
            initializer=lambda shape, dtype=None: tf.constant(values, dtype=dtype),
            trainable=False,
        )
        self.built = True

    def call(self, features):
        return energies.mahalanobis_logits(features, self.centers)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "center_scale": self.center_scale})
        return config


class EpochCounter(keras.callbacks.Callback):
    """Keeps a model's `epochs_trained` variable equal to the number of epochs trained.

    `GMMC.fit` adds it first in the callback list, so the counter is already incremented when
    a checkpoint or backup callback saves the weights at the end of an epoch. At the start of
    an epoch the counter is raised to the epoch index if it is lower (for `fit(initial_epoch=k)`
    on a model that did not record its epochs), and never lowered, so consecutive `fit` calls,
    `.keras` save/load and `BackupAndRestore` resumption all continue the count.
    """

    def on_epoch_begin(self, epoch, logs=None):
        counter = self.model.epochs_trained
        if int(keras.ops.convert_to_numpy(counter)) < epoch:
            counter.assign(epoch)

    def on_epoch_end(self, epoch, logs=None):
        counter = self.model.epochs_trained
        counter.assign(counter + 1)


@keras.saving.register_keras_serializable(package="keras_jem")
class GMMC(EnergyModel):
    """Generative Max-Mahalanobis classifier: an LDA head with fixed simplex centres.

    The backbone's features `phi(x)` are compared to fixed class centres `mu_k`
    (`max_mahalanobis_centers`, norm `center_scale`): `logits_k = -1/2 ||phi(x) - mu_k||^2`,
    prediction = nearest centre, `E(x, y) = 1/2 ||phi(x) - mu_y||^2` and
    `E(x) = -logsumexp_k logits_k` (`log p(x)` up to a constant). Training modes
    (ALGORITHMS.md 4.3):

    - `"discriminative"`: the MMC loss `mean_i E(x_i, y_i)` (squared distance to the own
      centre, no softmax).
    - `"generative"`: `mean_i E(x_i, y_i) - beta * mean_i E(x_q_i, y_i)`, with class-conditional
      samples `x_q` continuing persistent chains from the class blocks of the replay buffer
      (block `y` holds chains of class `y`), run by `LatentTargetSampler`.
    - `"joint"`: discriminative for the first `start_generative` epochs, generative after. The
      number of epochs trained is the non-trainable weight `epochs_trained` (saved with the
      model, updated by `fit` through `EpochCounter`), so the switch survives save/load,
      repeated `fit` calls and `BackupAndRestore` resumption.

    Both terms use the labelled stream: for `({"images": x, "px_images": x_px}, y)` batches
    `px_images` is ignored (GMMC's data term needs the labels).

    Args:
        backbone: a Keras layer or model mapping images to `(batch, features)`, with at least
            `num_classes - 1` features.
        num_classes: number of classes.
        mode: `"discriminative"`, `"generative"` or `"joint"`.
        center_scale: norm of the class centres (GMMC `mu_c`: 10).
        beta: weight of the sample energy in the generative loss (0.5).
        start_generative: epoch at which `"joint"` switches to the generative loss (50).
        sampler: a `keras_jem.sampling.Sampler` (default `LatentTargetSampler()`: 20 steps of
            size 1, latent noise 0.001).
        buffer_size: number of persistent chains, a multiple of `num_classes` (CIFAR-10:
            100000 generative, 50000 joint).
        reinit_probability: chain restart probability (generative 0.025, joint 0.05).
        **kwargs: other `EnergyModel` arguments (`energy_l2_weight`, `divergence_threshold`,
            `weight_decay`, `sam`, `seed`, `buffer_init`, ...). GMMC has no `px_weight`,
            `pyx_weight`, `pxy_weight` or `conditional_sampling`: its loss is set by `mode`
            and `beta`, and its chains are always class-conditional.

    Example:

    >>> model = keras_jem.GMMC(
    ...     backbone=keras_jem.backbones.WideResNet(28, 10), num_classes=10, mode="joint",
    ...     start_generative=50, buffer_size=50000)
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-4))
    >>> model.fit(train_ds, epochs=150, steps_per_epoch=703)
    >>> threes = model.sample(y=[3] * 16, num_steps=40)
    """

    default_sampler_class = LatentTargetSampler
    config_names = EnergyModel.config_names + ("mode", "center_scale", "beta",
                                               "start_generative")
    tracked_terms = ("loss", "loss_mmc", "energy_data", "energy_samples", "loss_ce")
    samples_random_labels = True

    def __init__(
        self,
        backbone,
        num_classes,
        mode="discriminative",
        center_scale=10.0,
        beta=0.5,
        start_generative=50,
        sampler=None,
        buffer_size=10000,
        reinit_probability=0.05,
        **kwargs,
    ):
        if mode not in MODES:
            raise ValueError(f"Unknown GMMC `mode` {mode!r}. Expected one of {MODES}.")
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        # Checks the centre constants (and a declared feature dimension) before building.
        max_mahalanobis_centers(num_classes, getattr(backbone, "feature_dim", num_classes),
                                center_scale)
        if not beta >= 0:
            raise ValueError(f"`beta` must be non-negative. Received: beta={beta}")
        if int(start_generative) != start_generative or start_generative < 0:
            raise ValueError(
                "`start_generative` must be a non-negative integer (an epoch). "
                f"Received: start_generative={start_generative}"
            )
        # Read by `_create_head`, which the base constructor calls.
        self.mode = mode
        self.center_scale = float(center_scale)
        super().__init__(
            backbone,
            num_classes=int(num_classes),
            sampler=sampler,
            buffer_size=buffer_size,
            reinit_probability=reinit_probability,
            # Class blocks of the buffer: checks that buffer_size is a multiple of num_classes.
            class_blocks=mode != "discriminative",
            **kwargs,
        )
        self.beta = float(beta)
        self.start_generative = int(start_generative)
        self.epochs_trained = self.add_weight(
            name="epochs_trained", shape=(), dtype="int32", initializer="zeros", trainable=False
        )

    def _create_head(self):
        # float32 distances under a mixed-precision policy: with centres of norm 10 the squared
        # distances are ~100, beyond bfloat16's resolution for class differences.
        self.head = MaxMahalanobisHead(self.num_classes, self.center_scale,
                                       name="mahalanobis_head", dtype="float32")

    # === What the latent-target sampler reads ===

    @property
    def centers(self):
        """The fixed class centres `(num_classes, feature_dim)`."""
        return self.head.centers

    def features(self, x, training=False):
        """Backbone features `phi(x)`."""
        return self.backbone(self._images(x), training=training)

    # === Training ===

    def generative_phase(self):
        """Boolean tensor: whether this step uses the generative loss."""
        if self.mode == "generative":
            return tf.constant(True)
        if self.mode == "discriminative":
            return tf.constant(False)
        return tf.convert_to_tensor(self.epochs_trained) >= self.start_generative

    def fit(self, *args, **kwargs):
        # Keras' positional order: x, y, batch_size, epochs, verbose, callbacks.
        if len(args) > 5:
            args = list(args)
            kwargs["callbacks"] = args.pop(5)
        callbacks = kwargs.get("callbacks")
        if callbacks is None:
            callbacks = []
        if isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = callbacks.callbacks
        callbacks = list(callbacks)
        if not any(isinstance(c, EpochCounter) for c in callbacks):
            callbacks.insert(0, EpochCounter())
        kwargs["callbacks"] = callbacks
        return super().fit(*args, **kwargs)

    def training_batch(self, x, y, sample_weight):
        if y is None:
            raise ValueError(
                "GMMC training needs labels in every mode (its energies are class energies): "
                "the dataset must yield (images, labels)."
            )
        images = self._images(x)
        return Batch(images, images, y, sample_weight)

    def draw_samples(self, batch):
        if self.mode == "discriminative":
            return {}
        labels = tf.cast(tf.reshape(batch.labels, (-1,)), tf.int32)
        size = batch_size(labels)
        seed = self._next_seed()

        def continue_chains():
            return self.continue_chains(size, labels, seed)

        if self.mode == "generative":
            return {"samples": continue_chains()}
        return {
            "samples": tf.cond(
                self.generative_phase(),
                continue_chains,
                lambda: tf.zeros(tf.concat([[size], self.image_shape], 0), tf.float32),
            )
        }

    def loss_passes(self, batch, samples):
        """One pass: the MMC loss, and in the generative phase the sample energies.

        The two network passes stay in one function (one tape) because the joint mode switches
        the sample term on and off inside the graph (`tf.cond`).
        """
        return [lambda: self._loss(batch, samples)]

    def _loss(self, batch, samples):
        x, _, y, sample_weight = batch
        logits = self(x, training=True)
        energy_data = energies.class_energy(logits, y)  # 1/2 ||phi(x) - mu_y||^2
        loss_mmc = tf.reduce_mean(weighted(energy_data, sample_weight))
        values = {"loss_mmc": loss_mmc, "energy_data": tf.reduce_mean(energy_data),
                  "logits": logits}
        total = loss_mmc
        if "samples" in samples:

            def generative():
                energy_samples = energies.class_energy(
                    self(samples["samples"], training=True), y
                )
                loss = loss_mmc - self.beta * tf.reduce_mean(energy_samples)
                if self.energy_l2_weight > 0:
                    loss += self.energy_l2_weight * (
                        tf.reduce_mean(tf.square(energy_data))
                        + tf.reduce_mean(tf.square(energy_samples))
                    )
                return loss, tf.reduce_mean(energy_samples)

            if self.mode == "joint":
                total, energy_samples = tf.cond(
                    self.generative_phase(),
                    generative,
                    lambda: (loss_mmc, tf.zeros((), loss_mmc.dtype)),
                )
            else:
                total, energy_samples = generative()
            values["energy_samples"] = energy_samples
        return total, values

    def _update_metrics(self, terms, labels, logits):
        logs = super()._update_metrics(terms, labels, logits)
        if self.mode == "joint":
            logs["generative"] = tf.cast(self.generative_phase(), tf.float32)
        return logs

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # loss_ce: cross-entropy of the Gaussian posterior softmax(-1/2 ||phi - mu_k||^2), for
        # comparison with the softmax models.
        return self._evaluate_classifier(x, y, sample_weight, {
            "loss_mmc": energies.class_energy,
            "loss_ce": lambda logits, y: keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True),
        })
