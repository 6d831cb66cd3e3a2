"""JEM: a classifier reinterpreted as an energy-based model (Grathwohl et al., ICLR 2020)."""

import keras
import tensorflow as tf

from keras_jem import energies
from keras_jem.backbones.layers import TorchDense
from keras_jem.models.energy_model import Batch
from keras_jem.models.energy_model import EnergyModel
from keras_jem.models.energy_model import batch_size
from keras_jem.models.energy_model import weighted
from keras_jem.sampling import noise

CE_CLASSES = ("all", "batch")


@keras.saving.register_keras_serializable(package="keras_jem")
class JEM(EnergyModel):
    """Joint Energy-based Model: `p(y|x)` by softmax, `p(x)` by contrastive divergence.

    The logits `f(x)` of a classifier (backbone + linear head) define `E(x, y) = -f(x)[y]` and
    `E(x) = -logsumexp_y f(x)[y]`. Training minimises

    ```
    L = px_weight * (mean E(x_data) - mean E(x_samples))        # maximum likelihood of p(x)
        + pyx_weight * cross_entropy(f(x), y)                    # p(y|x)
        + pxy_weight * (mean E(x, y) - mean E(x_samples_y, y))   # optional p(x, y) term
        + energy_l2_weight * (mean E(x_data)^2 + mean E(x_samples)^2)
    ```

    where `x_samples` continue persistent chains from a `ReplayBuffer` with the `sampler`
    (SGLD by default) and are written back after each step. The data may be a plain `(x, y)`
    dataset (both terms use x) or `({"images": x_ce, "px_images": x_px}, y)` with separate
    streams for cross-entropy and likelihood (see `keras_jem.data.make_train_dataset`).

    Every step also reports `diverged` (1 when the loss is non-finite or an energy or the loss
    exceeds `divergence_threshold` in magnitude); `keras_jem.callbacks.DivergenceGuard` stops
    training on it so the run can be rolled back.

    Args:
        backbone: a Keras layer or model mapping images to features `(batch, features)`: a
            `keras_jem.backbones` layer, a functional or Sequential model, or e.g.
            `keras.applications.ResNet50V2(include_top=False, pooling="avg", weights=None)`
            (the feature size is read from its output).
        num_classes: number of classes.
        sampler: a `keras_jem.sampling.Sampler` (default: JEM's `SGLD(20, 1.0, 0.01)`).
        buffer_size: number of persistent chains (10000).
        buffer_init: `"uniform"` or `"gaussian_mixture"` (then call `adapt_buffer` first).
        reinit_probability: probability of restarting a chain from a fresh sample (0.05).
        conditional_sampling: draw the p(x) samples class-conditionally (random labels, class
            blocks of the buffer; JEM's `class_cond_p_x_sample`).
        px_weight, pyx_weight, pxy_weight: weights of the three terms (1, 1, 0).
        ce_classes: `"all"` (the cross-entropy's softmax runs over every class) or `"batch"`
            (over the classes present in the batch's labels only: the logits of absent classes
            are masked out, so a class-incremental learner does not push down the classes of
            earlier tasks; the "labels trick" of continual learning). The logged accuracy
            and predictions always use every class.
        energy_l2_weight: weight of the L2 penalty on energies (0; ~0.1 stabilises training).
        sample_in_training_mode: run the sampler with `training=True` (JEM++ and SADA-JEM keep
            BatchNorm in training mode while sampling; JEM uses eval mode).
        divergence_threshold: magnitude of loss or energies treated as divergence (1e8).
        sam: optional `keras_jem.optimizers.SAM`: both passes go through the whole loss, the
            second at perturbed weights, with BatchNorm statistics left untouched by it.
        buffer_covariance: `"full"` or `"diagonal"` class Gaussians for the informative init.
        weight_decay: coupled L2 weight decay added to the gradients before the optimizer (as
            PyTorch's `SGD(weight_decay=...)` in the papers' scripts; it goes through momentum,
            unlike Keras' decoupled `weight_decay` optimizer argument). Exactly
            `weight_decay * w` per step under any replica count and loss scale.
        seed: seed of the sampler's noise and buffer draws.
        sequential_passes: back-propagate the loss one network pass at a time (labelled batch,
            likelihood batch, samples), so that only one pass's activations are held in memory;
            the loss is a sum of per-pass terms, so the gradient is the same. False: one tape
            over every pass (peak memory grows with the number of passes).

    Example:

    >>> model = keras_jem.JEM(
    ...     backbone=keras_jem.backbones.WideResNet(depth=28, width=10), num_classes=10)
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-4))
    >>> model.fit(train_ds, epochs=200, steps_per_epoch=703)
    >>> samples = model.sample(num_samples=64)         # unconditional
    >>> digits_of_3 = model.sample(y=[3] * 16)        # class-conditional
    """

    # The sampler is EnergyModel's: SGLD, whose own defaults are JEM's (20 steps of size 1,
    # noise 0.01).
    config_names = EnergyModel.config_names + (
        "conditional_sampling", "px_weight", "pyx_weight", "pxy_weight", "ce_classes")
    tracked_terms = ("loss", "loss_ce", "loss_px", "loss_pxy", "energy_data", "energy_samples")

    def __init__(
        self,
        backbone,
        num_classes,
        sampler=None,
        buffer_size=10000,
        buffer_init="uniform",
        reinit_probability=0.05,
        conditional_sampling=False,
        px_weight=1.0,
        pyx_weight=1.0,
        pxy_weight=0.0,
        ce_classes="all",
        **kwargs,
    ):
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(
                f"`num_classes` must be an integer >= 2. Received: num_classes={num_classes}"
            )
        for name, value in (
            ("px_weight", px_weight), ("pyx_weight", pyx_weight), ("pxy_weight", pxy_weight),
        ):
            if value < 0:
                raise ValueError(f"`{name}` must be non-negative. Received: {name}={value}")
        if px_weight == 0 and pyx_weight == 0 and pxy_weight == 0:
            raise ValueError(
                "At least one of `px_weight`, `pyx_weight`, `pxy_weight` must be positive."
            )
        if ce_classes not in CE_CLASSES:
            raise ValueError(
                f"`ce_classes` must be one of {', '.join(CE_CLASSES)}. Received: "
                f"ce_classes={ce_classes!r}"
            )
        self.ce_classes = ce_classes
        self.conditional_sampling = bool(conditional_sampling)
        self.px_weight = float(px_weight)
        self.pyx_weight = float(pyx_weight)
        self.pxy_weight = float(pxy_weight)
        # energy_l2_weight, sample_in_training_mode, divergence_threshold, sam,
        # buffer_covariance, weight_decay, seed, sequential_passes: `EnergyModel`'s defaults.
        super().__init__(
            backbone, num_classes=num_classes, sampler=sampler, buffer_size=buffer_size,
            buffer_init=buffer_init, reinit_probability=reinit_probability,
            class_blocks=conditional_sampling or pxy_weight > 0, **kwargs,
        )

    def _create_head(self):
        self.head = TorchDense(self.num_classes, name="class_head")

    # === Training ===

    def training_batch(self, x, y, sample_weight):
        if isinstance(x, dict):
            images = x["images"]
            px_images = x.get("px_images", images)
        else:
            images = px_images = x
        if y is None:
            if self.pyx_weight > 0 or self.pxy_weight > 0:
                raise ValueError(
                    "JEM training with pyx_weight or pxy_weight > 0 needs labels: the dataset "
                    "must yield (images, labels). For unlabelled data use pyx_weight=0."
                )
            y = tf.zeros(tf.shape(px_images)[:1], tf.int32)
        return Batch(images, px_images, y, sample_weight)

    def draw_samples(self, batch):
        size = batch_size(batch.px_images)
        seed = self._next_seed()
        samples = {}
        if self.px_weight > 0:
            labels = None
            if self.conditional_sampling:
                labels = tf.random.stateless_uniform(
                    (size,), noise.fold_in(seed, 1), maxval=self.num_classes, dtype=tf.int32,
                )
            samples["px"] = self.continue_chains(size, labels, seed)
        if self.pxy_weight > 0:
            samples["pxy"] = self.continue_chains(
                batch_size(batch.labels), tf.cast(batch.labels, tf.int32), noise.fold_in(seed, 2))
        return samples

    def loss_passes(self, batch, samples):
        """The loss as a list of per-pass functions; their losses sum to the total loss.

        Each function runs the network on one input (the labelled batch, the likelihood batch,
        the samples of p(x), the samples of p(x, y)) and returns `(loss, values)`, `values`
        holding what the logs need (`logits`, `loss_ce`, energies). Every term of the loss
        involves one pass only, so the gradient of the total is the sum of the passes'
        gradients (`sequential_passes`).
        """
        x_ce, x_px, y, sample_weight = batch
        same_stream = x_px is x_ce
        px, pxy = "px" in samples, "pxy" in samples
        l2 = self.energy_l2_weight

        def squares(energy):
            return l2 * tf.reduce_mean(tf.square(energy)) if l2 > 0 else 0.0

        def labelled():
            logits = self(x_ce, training=True)
            values = {"logits": logits}
            loss = 0.0
            if self.pyx_weight > 0:
                ce = keras.losses.sparse_categorical_crossentropy(
                    y, self._ce_logits(logits, y), from_logits=True)
                values["loss_ce"] = tf.reduce_mean(weighted(ce, sample_weight))
                loss += self.pyx_weight * values["loss_ce"]
            if same_stream:
                energy_data = energies.logsumexp_energy(logits)
                values["energy_data"] = tf.reduce_mean(energy_data)
                if px:
                    loss += self.px_weight * values["energy_data"] + squares(energy_data)
            if pxy:
                energy_joint = energies.class_energy(logits, y)
                values["energy_joint"] = tf.reduce_mean(energy_joint)
                loss += self.pxy_weight * values["energy_joint"] + squares(energy_joint)
            return loss, values

        def likelihood():
            energy_data = energies.logsumexp_energy(self(x_px, training=True))
            loss = 0.0
            if px:
                loss = self.px_weight * tf.reduce_mean(energy_data) + squares(energy_data)
            return loss, {"energy_data": tf.reduce_mean(energy_data)}

        def px_samples():
            energy = energies.logsumexp_energy(self(samples["px"], training=True))
            mean = tf.reduce_mean(energy)
            return -self.px_weight * mean + squares(energy), {"energy_samples": mean}

        def pxy_samples():
            energy = energies.class_energy(self(samples["pxy"], training=True), y)
            mean = tf.reduce_mean(energy)
            return -self.pxy_weight * mean + squares(energy), {"energy_joint_samples": mean}

        passes = [labelled]
        if not same_stream:
            passes.append(likelihood)
        if px:
            passes.append(px_samples)
        if pxy:
            passes.append(pxy_samples)
        return passes

    def _ce_logits(self, logits, y):
        """The logits the cross-entropy sees: all, or those of the batch's classes only."""
        if self.ce_classes == "all":
            return logits
        logits = tf.cast(logits, tf.float32)
        present = tf.reduce_max(
            tf.one_hot(tf.reshape(tf.cast(y, tf.int32), (-1,)), self.num_classes), axis=0) > 0
        # A large finite value rather than -inf: exp underflows to 0 all the same and the
        # gradient of an absent class is exactly 0, with no inf - inf anywhere.
        return tf.where(present[None, :], logits, tf.constant(-1e9, tf.float32))

    def loss_terms(self, losses, values):
        """The total loss, the log terms and the logits from the passes' results."""
        merged = {}
        for value in values:
            merged.update(value)
        terms = {}
        if "loss_ce" in merged:
            terms["loss_ce"] = merged["loss_ce"]
        if "energy_samples" in merged:
            terms["loss_px"] = merged["energy_data"] - merged["energy_samples"]
            terms["energy_samples"] = merged["energy_samples"]
        if "energy_joint_samples" in merged:
            terms["loss_pxy"] = merged["energy_joint"] - merged["energy_joint_samples"]
        terms["energy_data"] = merged["energy_data"]
        total = tf.add_n([tf.convert_to_tensor(loss, tf.float32) for loss in losses])
        terms["loss"] = total
        return total, terms, merged["logits"]

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return self._evaluate_classifier(x, y, sample_weight, {
            "loss_ce": lambda logits, y: keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True),
            "energy_data": lambda logits, y: energies.logsumexp_energy(logits),
        })
