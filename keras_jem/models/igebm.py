"""IGEBM: implicit generation with an energy-based model (Du & Mordatch, NeurIPS 2019)."""

from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from keras_jem import distribute
from keras_jem import energies
from keras_jem import generation
from keras_jem.backbones import layers as backbone_layers
from keras_jem.models.energy_model import Batch
from keras_jem.models.energy_model import EnergyModel
from keras_jem.models.energy_model import batch_size
from keras_jem.models.energy_model import weighted


@keras.saving.register_keras_serializable(package="keras_jem")
class IGEBM(EnergyModel):
    """An energy network trained by contrastive divergence with clipped Langevin dynamics.

    A spectrally normalised ResNet (`keras_jem.backbones.SNResNet`) maps an image to features
    and an unnormalised dense layer to a scalar energy `E(x)`. With a class-conditional backbone
    (`SNResNet(num_classes=C)`: per-class gain and bias inside the blocks) the energy is
    `E(x, y)`, the model classifies with `logits = -E(x, y)` over all labels, and
    `E(x) = -logsumexp_y(-E(x, y))`. Training minimises (ALGORITHMS.md 5.3)

    ```
    mean E(x+) - mean E(x-) + energy_l2_weight * (mean E(x+)^2 + mean E(x-)^2)
    ```

    where the negatives `x-` start from the replay buffer (95% of them;
    `reinit_probability=0.05` start from uniform noise) and run Langevin dynamics: per step
    `x <- x + noise_scale * N(0, I)`, then `x <- clip(x - step_size * clip(grad_x E,
    +-gradient_clip))` with the gradient taken at the noisy x and x kept in the data range.
    The positives `x+` are dequantised first (`dequantization`).

    keras-jem works on [-1, 1]; the official code (`openai/ebm_code_release`) on [0, 1] with
    step 10, gradient clip 0.01 and noise 0.005. With `u = 2x - 1`, `grad_u E = grad_x E / 2`,
    so the same chains on [-1, 1] take step 40, clip 0.005 and noise 0.01: the default sampler
    is `SGLD(60, step_size=40, noise_scale=0.01, gradient_clip=0.005, clip_range=(-1, 1),
    noise_first=True)`, and each of its steps is `2 * (official step) - 1`, noise first as in
    the official chain (`noise_first=False` gives JEM's order, noise after the gradient step).
    The paper trains with its clipped Adam
    (`keras_jem.optimizers.ClippedAdam(3e-4, beta_1=0, beta_2=0.999)`).

    As in the official `train.py`, the replay buffer is a first-in-first-out ring of the
    latest samples stored in 8 bits (`keras_jem.sampling.FIFOReplayBuffer`): every step appends
    its final chain states (the oldest are overwritten) and the next batch starts from images
    drawn from it with replacement and dequantised; until it holds more than a batch, every
    chain starts from noise. `buffer_type="persistent"` keeps JEM's persistent chains instead
    (`keras_jem.sampling.ReplayBuffer`, written back in place).

    A conditional model runs its chains under the labels of the batch: as in the official
    `train.py`, the buffer is class-agnostic (an image sampled under label 3 may continue
    under label 7); with `buffer_type="persistent"`, `class_blocks=True` draws each chain from
    its label's block of the buffer instead. It trains on the labelled stream (`images`, y);
    an unconditional model uses the likelihood stream (`px_images` when given) and needs no
    labels. An unconditional model is a one-class model: `num_classes == 1`, logits
    `(B, 1) = -E(x)`, and the label 0 (the only one) is accepted wherever labels are.

    Beyond `sample`, the model exposes the IGEBM paper's tasks: `inpaint`, `denoise`
    (with `keras_jem.generation.salt_and_pepper`) and `compose` (sampling from summed energies).

    Args:
        backbone: the energy network's feature extractor: any Keras layer or model mapping
            images to `(B, D)`; conditional when it has a `num_classes` attribute that is not
            None, then called as `backbone(x, labels=y, training=...)`.
        sampler: a `keras_jem.sampling.Sampler` (default: IGEBM's clipped Langevin dynamics).
        buffer_size: capacity of the replay buffer (10000, the paper's; the official
            `train.py` uses 50000; a multiple of `num_classes` with `class_blocks`).
        reinit_probability: fraction of chains started from noise at each step (0.05).
        energy_l2_weight: weight `alpha` of the energy magnitude penalty (IGEBM: 1.0).
        divergence_threshold: magnitude of loss or energies reported as `diverged` (1e8).
        sample_in_training_mode: run the sampler with `training=True` (dropout on, spectral
            norms updated). None (default): True when the backbone has dropout
            (`dropout_rate > 0`, the ResNet32Large), as the official code, whose dropout is
            on in every forward pass of training, Langevin steps included.
        class_blocks: draw a conditional model's chains from per-label blocks of the buffer
            (False: one class-agnostic buffer, the official code's). Needs
            `buffer_type="persistent"`.
        dequantization: width `d` of the uniform noise added to the positives in training:
            `x+ = (x + 1) (1 - d / 2) - 1 + U(0, d)` (2/256: the official `x * 255/256 +
            U(0, 1/256)` on [0, 1], mapped to [-1, 1]; 0 turns it off).
        seed: seed of the sampler's noise and the buffer draws.
        buffer_type: `"fifo"` (default: the official code's ring of 8-bit samples) or
            `"persistent"` (chains written back in place).
        **kwargs: other `EnergyModel` arguments (`weight_decay`, `sam`, ...).

    Example:

    >>> model = keras_jem.IGEBM(keras_jem.backbones.SNResNet(num_classes=10))
    >>> model.buffer                                   # FIFOReplayBuffer (buffer_type="fifo")
    >>> model.compile(optimizer=keras_jem.optimizers.ClippedAdam(3e-4, beta_1=0.0))
    >>> model.fit(train_ds, epochs=100, steps_per_epoch=390)
    >>> sevens = model.sample(y=[7] * 16)
    >>> completed = model.inpaint(images, mask)              # mask: True where to fill in
    >>> three_and_eight = model.compose([3, 8], num_samples=16)
    """

    # The official sampler on [0, 1] (step 10, clip 0.01, noise 0.005) rescaled to [-1, 1]; the
    # noise, 0.01, is SGLD's own default.
    default_sampler_config: ClassVar[dict] = {
        "num_steps": 60, "step_size": 40.0, "gradient_clip": 0.005, "clip_range": (-1.0, 1.0),
        "noise_first": True}

    config_names = tuple(
        name for name in EnergyModel.config_names if name != "num_classes"
    ) + ("class_blocks", "dequantization")
    tracked_terms = ("loss", "loss_ml", "loss_l2", "energy_data", "energy_samples", "loss_ce")
    divergence_terms = tracked_terms

    def __init__(
        self,
        backbone,
        sampler=None,
        buffer_size=10000,
        reinit_probability=0.05,
        energy_l2_weight=1.0,
        divergence_threshold=1e8,
        sample_in_training_mode=None,
        seed=None,
        class_blocks=False,
        dequantization=2.0 / 256.0,
        buffer_type="fifo",
        **kwargs,
    ):
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        num_classes = getattr(backbone, "num_classes", None)
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
            raise ValueError(
                f"A conditional backbone needs num_classes >= 2. Received: {num_classes}"
            )
        self.conditional = num_classes is not None
        if not 0.0 <= dequantization < 2.0:
            raise ValueError(
                "`dequantization` is the width of the uniform noise added to the positives on "
                f"[-1, 1] and must be in [0, 2). Received: dequantization={dequantization}"
            )
        self.dequantization = float(dequantization)
        self.class_blocks = bool(class_blocks) and self.conditional
        if sample_in_training_mode is None:
            sample_in_training_mode = float(getattr(backbone, "dropout_rate", 0.0) or 0.0) > 0
        super().__init__(
            backbone,
            num_classes=num_classes,
            sampler=sampler,
            buffer_size=buffer_size,
            reinit_probability=reinit_probability,
            class_blocks=self.class_blocks,
            energy_l2_weight=energy_l2_weight,
            sample_in_training_mode=sample_in_training_mode,
            divergence_threshold=divergence_threshold,
            seed=seed,
            buffer_type=buffer_type,
            **kwargs,
        )
        # An unconditional model is a one-class model (logits (B, 1) = -E(x)).
        self.num_classes = int(num_classes) if self.conditional else 1
        self.samples_random_labels = self.conditional

    def _create_head(self):
        self.energy_head = backbone_layers.TorchDense(1, name="energy_head")

    def _build_head(self, feature_dim):
        self.energy_head.build((None, feature_dim))

    # The energy is the head's scalar output, not a classifier energy: the samplers take the
    # general path (full input gradients), never the stem shortcut of `EnergyModel`.
    supports_stem = False

    def _backbone_on(self, images):
        if self.conditional:
            return self.backbone(images, labels=keras.ops.zeros((1,), "int32"))
        return self.backbone(images)

    def _energy(self, x, labels, training):
        if self.conditional:
            features = self.backbone(x, labels=labels, training=training)
        else:
            features = self.backbone(x, training=training)
        # float32 energies under a mixed-precision policy: the loss, its square penalty and the
        # sampler's gradient start in float32 (a no-op under the float32 policy).
        return tf.cast(tf.squeeze(self.energy_head(features), axis=-1), tf.float32)

    def class_energies(self, x, training=False):
        """`E(x, y)` for every label: `(batch, num_classes)` (conditional models)."""
        x = tf.convert_to_tensor(self._images(x))
        if not self.conditional:
            return self._energy(x, None, training)[:, None]
        batch = tf.shape(x)[0]
        tiled = tf.tile(x, [self.num_classes, 1, 1, 1])
        labels = tf.repeat(tf.range(self.num_classes, dtype=tf.int32), batch)
        values = self._energy(tiled, labels, training)
        return tf.transpose(tf.reshape(values, (self.num_classes, batch)))

    def ood_score(self, x):
        """The official sandbox's OOD score: `-min_y E(x, y)` (`-E(x)` when unconditional).

        Higher means more in-distribution. `-E(x) = logsumexp_y -E(x, y)` (the `energy` score)
        differs from it by at most `log(num_classes)`.
        """
        return tf.reduce_max(self(x, training=False), axis=-1)

    def call(self, inputs, training=None):
        """Logits: `-E(x, y)` over all labels `(B, num_classes)`, or `-E(x)` `(B, 1)`."""
        return -self.class_energies(inputs, training=training)

    def energy(self, x, y=None, training=False):
        """`E(x, y)` with labels, else `E(x)` (`-logsumexp_y -E(x, y)` when conditional).

        An unconditional model ignores `y` (its one class: `E(x, 0) = E(x)`).
        """
        x = tf.convert_to_tensor(self._images(x))
        if not self.conditional:
            # A one-class model: E(x, 0) = E(x).
            return self._energy(x, None, training)
        if y is not None:
            return self._energy(x, tf.cast(tf.reshape(y, (-1,)), tf.int32), training)
        return energies.logsumexp_energy(self(x, training=training))

    # === Training ===

    def training_batch(self, x, y, sample_weight):
        if self.conditional and y is None:
            raise ValueError(
                "A conditional IGEBM trains on (images, labels): the dataset yields no labels."
            )
        if isinstance(x, dict):
            x = x["images"] if self.conditional else x.get("px_images", x["images"])
        labels = tf.cast(tf.reshape(y, (-1,)), tf.int32) if self.conditional else None
        positives = self.dequantize(x, self._next_seed())
        return Batch(positives, positives, labels, sample_weight)

    def dequantize(self, images, seed):
        """`(x + 1) (1 - d / 2) - 1 + U(0, d)` for `d = dequantization` (positives, training).

        On [0, 1] (`p = (x + 1) / 2`) this is the official `p * 255/256 + U(0, 1/256)`: the
        images stay in the data range and each 8-bit level fills its own bin.
        """
        images = tf.convert_to_tensor(images)
        if self.dequantization == 0:
            return images
        width = tf.cast(self.dequantization, images.dtype)
        noise = tf.random.stateless_uniform(tf.shape(images), seed, maxval=1.0,
                                            dtype=images.dtype)
        return (images + 1.0) * (1.0 - width / 2.0) - 1.0 + width * noise

    def _buffer_labels(self, labels):
        """The labels the buffer draws by: the batch's with class blocks, else None (any
        chain, whatever label it was last sampled under)."""
        return labels if self.class_blocks else None

    def draw_samples(self, batch):
        # Chains continue under the batch's labels (official train.py); the buffer is drawn
        # from by label only with class blocks (`_buffer_labels`).
        seed = self._next_seed()
        return {"samples": self.continue_chains(batch_size(batch.images), batch.labels, seed)}

    def loss_passes(self, batch, samples):
        def contrastive_divergence():
            # `sample_weight` weighs the positives (a weighted maximum likelihood); the
            # negatives are the model's own samples and stay unweighted.
            energy_data = self.energy(batch.images, batch.labels, training=True)
            energy_samples = self.energy(samples["samples"], batch.labels, training=True)
            weight = batch.sample_weight
            loss_ml = tf.reduce_mean(weighted(energy_data, weight)) - tf.reduce_mean(
                energy_samples)
            loss_l2 = tf.reduce_mean(weighted(tf.square(energy_data), weight)) + tf.reduce_mean(
                tf.square(energy_samples)
            )
            return loss_ml + self.energy_l2_weight * loss_l2, {
                "loss_ml": loss_ml,
                "loss_l2": loss_l2,
                "energy_data": tf.reduce_mean(energy_data),
                "energy_samples": tf.reduce_mean(energy_samples),
            }

        return [contrastive_divergence]

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.conditional and y is not None:
            return self._evaluate_classifier(x, y, sample_weight, {
                "energy_data": energies.class_energy,
                "loss_ce": lambda logits, y: keras.losses.sparse_categorical_crossentropy(
                    y, logits, from_logits=True),
            })
        tracker = self.loss_trackers["energy_data"]
        tracker.update_state(self.energy(self._images(x), training=False),
                             sample_weight=sample_weight)
        return distribute.replica_logs({"energy_data": tracker.result()})

    # === Sampling API ===

    def _sample_labels(self, y, num_samples, seed):
        y = super()._sample_labels(y, num_samples, seed)
        return y if self.conditional else None  # the one class of an unconditional model

    def _label_note(self):
        return "" if self.conditional else " (this IGEBM is unconditional)"

    def inpaint(self, images, mask, num_steps=None, y=None, seed=None):
        """Fills in the pixels where `mask` is True (see `keras_jem.generation.inpaint`)."""
        self._check_built()
        return generation.inpaint(self, images, mask, num_steps=num_steps, y=y, seed=seed,
                                  training=self.sample_in_training_mode)

    def denoise(self, images, num_rounds=5, num_steps=None, y=None, seed=None):
        """Restores corrupted images (see `keras_jem.generation.denoise`)."""
        self._check_built()
        return generation.denoise(self, images, num_rounds=num_rounds, num_steps=num_steps, y=y,
                                  seed=seed, training=self.sample_in_training_mode)

    def compose(self, conditions, num_samples=None, x_init=None, num_steps=None, seed=None):
        """Samples from a sum of energies (see `keras_jem.generation.compose`).

        Args:
            conditions: list whose items are labels of this model (`[3, 8]`: digits that are
                both a 3 and an 8), other models, or `(model, label[, weight])` tuples.
            num_samples, x_init, num_steps, seed: as in `keras_jem.generation.compose`.
        """
        self._check_built()
        terms = []
        for item in conditions:
            if isinstance(item, (int, np.integer)):
                if not self.conditional:
                    raise ValueError(
                        "Label conditions need a conditional IGEBM; this one is unconditional."
                    )
                item = (self, int(item))
            terms.append(item)
        return generation.compose(terms, num_samples=num_samples, x_init=x_init,
                                  num_steps=num_steps, sampler=self.sampler, seed=seed,
                                  training=self.sample_in_training_mode)
