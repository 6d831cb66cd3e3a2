"""IGEBM: implicit generation with an energy-based model (Du & Mordatch, NeurIPS 2019)."""

import keras
import numpy as np
import tensorflow as tf

from keras_jem import distribute
from keras_jem import energies
from keras_jem import generation
from keras_jem import sampling
from keras_jem.backbones import layers as backbone_layers


@keras.saving.register_keras_serializable(package="keras_jem")
class IGEBM(keras.Model):
    """An energy network trained by contrastive divergence with clipped Langevin dynamics.

    A spectrally normalised ResNet (`keras_jem.backbones.SNResNet`) maps an image to features
    and an unnormalised dense layer to a scalar energy `E(x)`. With a class-conditional backbone
    (`SNResNet(num_classes=C)`: per-class gain and bias inside the blocks) the energy is
    `E(x, y)`, the model classifies with `logits = -E(x, y)` over all labels, and
    `E(x) = -logsumexp_y(-E(x, y))`. Training minimises (ALGORITHMS.md 5.3)

    ```
    mean E(x+) - mean E(x-) + energy_l2_weight * (mean E(x+)^2 + mean E(x-)^2)
    ```

    where the negatives `x-` continue persistent chains from the replay buffer (95% of them;
    `reinit_probability=0.05` restart from uniform noise) with Langevin dynamics: per step
    `x <- clip(x - step_size * clip(grad_x E, +-gradient_clip) + noise_scale * N(0, I))` with
    x kept in the data range (`SGLD(60, step_size=10, noise_scale=0.005, gradient_clip=0.01)`).
    The paper trains with Adam(3e-4, beta_1=0, beta_2=0.999).

    A conditional model draws its negatives with the labels of the batch, from the class blocks
    of the buffer, and trains on the labelled stream (`images`, y); an unconditional model uses
    the likelihood stream (`px_images` when given) and needs no labels. An unconditional model
    is a one-class model: `num_classes == 1`, logits `(B, 1) = -E(x)`, and the label 0 (the
    only one) is accepted wherever labels are.

    Beyond `sample`, the model exposes the IGEBM paper's tasks: `inpaint`, `denoise`
    (with `keras_jem.generation.salt_and_pepper`) and `compose` (sampling from summed energies).

    Args:
        backbone: the energy network's feature extractor: images -> `(B, D)`; conditional when
            it has a `num_classes` attribute that is not None, then called as
            `backbone(x, labels=y, training=...)`.
        sampler: a `keras_jem.sampling.Sampler` (default: IGEBM's clipped Langevin dynamics).
        buffer_size: number of persistent chains (10000; a multiple of `num_classes` when
            conditional).
        reinit_probability: fraction of chains restarted from noise at each step (0.05).
        energy_l2_weight: weight `alpha` of the energy magnitude penalty (IGEBM: 1.0).
        divergence_threshold: magnitude of loss or energies reported as `diverged` (1e8).
        sample_in_training_mode: run the sampler with `training=True` (dropout on).
        seed: seed of the sampler's noise and the initial buffer.

    Example:

    >>> model = keras_jem.IGEBM(keras_jem.backbones.SNResNet(num_classes=10))
    >>> model.compile(optimizer=keras.optimizers.Adam(3e-4, beta_1=0.0, beta_2=0.999))
    >>> model.fit(train_ds, epochs=100, steps_per_epoch=390)
    >>> sevens = model.sample(y=[7] * 16)
    >>> completed = model.inpaint(images, mask)              # mask: True where to fill in
    >>> three_and_eight = model.compose([3, 8], num_samples=16)
    """

    default_sampler_config = {
        "num_steps": 60,
        "step_size": 10.0,
        "noise_scale": 0.005,
        "gradient_clip": 0.01,
        "clip_range": (-1.0, 1.0),
    }

    def __init__(
        self,
        backbone,
        sampler=None,
        buffer_size=10000,
        reinit_probability=0.05,
        energy_l2_weight=1.0,
        divergence_threshold=1e8,
        sample_in_training_mode=False,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        num_classes = getattr(backbone, "num_classes", None)
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
            raise ValueError(
                f"A conditional backbone needs num_classes >= 2. Received: {num_classes}"
            )
        if energy_l2_weight < 0:
            raise ValueError(
                f"`energy_l2_weight` must be non-negative. Received: {energy_l2_weight}"
            )
        if not divergence_threshold > 0:
            raise ValueError(
                f"`divergence_threshold` must be positive. Received: {divergence_threshold}"
            )
        self.conditional = num_classes is not None
        if self.conditional and buffer_size % num_classes:
            raise ValueError(
                f"A conditional IGEBM splits the replay buffer into {num_classes} class blocks, "
                f"but buffer_size={buffer_size} is not a multiple of {num_classes}. Use e.g. "
                f"{(buffer_size // num_classes + 1) * num_classes}."
            )
        self.backbone = backbone
        self.num_classes = int(num_classes) if self.conditional else 1
        sampler = sampling.deserialize(sampler)
        self.sampler = sampler if sampler is not None else sampling.SGLD(
            **self.default_sampler_config
        )
        if not isinstance(self.sampler, sampling.Sampler):
            raise ValueError(
                f"`sampler` must be a keras_jem.sampling.Sampler. Received: {sampler!r}"
            )
        self.buffer_size = int(buffer_size)
        self.reinit_probability = float(reinit_probability)
        self.energy_l2_weight = float(energy_l2_weight)
        self.divergence_threshold = float(divergence_threshold)
        self.sample_in_training_mode = bool(sample_in_training_mode)
        self.seed = seed
        self.image_shape = None

        # === Layers ===
        self.energy_head = backbone_layers.TorchDense(1, name="energy_head")
        self.buffer = sampling.ReplayBuffer(
            size=buffer_size,
            reinit_probability=reinit_probability,
            num_classes=num_classes,
            seed=seed,
            name="replay_buffer",
        )
        self.seed_generator = keras.random.SeedGenerator(seed, name="sampler_seed")

        # === Metrics ===
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.ml_loss_tracker = keras.metrics.Mean(name="loss_ml")
        self.l2_loss_tracker = keras.metrics.Mean(name="loss_l2")
        self.energy_data_tracker = keras.metrics.Mean(name="energy_data")
        self.energy_samples_tracker = keras.metrics.Mean(name="energy_samples")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.ce_loss_tracker = keras.metrics.Mean(name="loss_ce")
        self.diverged_tracker = keras.metrics.Mean(name="diverged")
        self._sample_function = None

    # === Forward ===

    @staticmethod
    def _images(inputs):
        if isinstance(inputs, dict):
            if "images" not in inputs:
                raise ValueError(
                    "Dict inputs must hold the key 'images' (and optionally 'px_images'). "
                    f"Received keys: {sorted(inputs)}"
                )
            return inputs["images"]
        return inputs

    def build(self, input_shape):
        if isinstance(input_shape, dict):
            input_shape = input_shape["images"]
        input_shape = tuple(input_shape)
        if len(input_shape) != 4 or any(d is None for d in input_shape[1:]):
            raise ValueError(
                "IGEBM takes images of shape (batch, height, width, channels) with known "
                f"height, width and channels. Received input shape: {input_shape}"
            )
        self.image_shape = tuple(int(d) for d in input_shape[1:])
        zeros = keras.ops.zeros((1,) + self.image_shape)
        if self.conditional:
            self.backbone(zeros, labels=keras.ops.zeros((1,), "int32"))
        else:
            self.backbone(zeros)
        self.energy_head.build((None, self.backbone.feature_dim))
        self.buffer.build(self.image_shape)
        self.built = True

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

    def _next_seed(self):
        return sampling.next_seed(self.seed_generator)

    def _positive_images(self, x):
        if isinstance(x, dict):
            if self.conditional:
                return x["images"]
            return x.get("px_images", x["images"])
        return x

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        if self.conditional and y is None:
            raise ValueError(
                "A conditional IGEBM trains on (images, labels): the dataset yields no labels."
            )
        x_pos = self._positive_images(x)
        if not self.built:
            self.build(x_pos.shape)
        labels = tf.cast(tf.reshape(y, (-1,)), tf.int32) if self.conditional else None
        batch_size = x_pos.shape[0] if x_pos.shape[0] is not None else tf.shape(x_pos)[0]
        seed = self._next_seed()
        indices, start, _ = self.buffer.draw(batch_size, labels=labels, seed=seed)
        samples = self.sampler(
            self, start, y=labels, seed=sampling.noise.fold_in(seed, 11),
            training=self.sample_in_training_mode,
        )
        self.buffer.write(indices, samples)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            energy_data = self.energy(x_pos, labels, training=True)
            energy_samples = self.energy(samples, labels, training=True)
            loss_ml = tf.reduce_mean(energy_data) - tf.reduce_mean(energy_samples)
            loss_l2 = tf.reduce_mean(tf.square(energy_data)) + tf.reduce_mean(
                tf.square(energy_samples)
            )
            loss = loss_ml + self.energy_l2_weight * loss_l2
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(loss / replicas)
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        terms = {
            "loss": loss,
            "loss_ml": loss_ml,
            "loss_l2": loss_l2,
            "energy_data": tf.reduce_mean(energy_data),
            "energy_samples": tf.reduce_mean(energy_samples),
        }
        return distribute.replica_logs(self._update_metrics(terms))

    def _diverged(self, terms):
        values = tf.stack([tf.cast(v, tf.float32) for v in terms.values()])
        magnitude = tf.reduce_max(tf.abs(values))
        finite = tf.reduce_all(tf.math.is_finite(values))
        return tf.cast(
            tf.logical_or(tf.logical_not(finite), magnitude > self.divergence_threshold),
            tf.float32,
        )

    def _update_metrics(self, terms):
        trackers = {
            "loss": self.loss_tracker, "loss_ml": self.ml_loss_tracker,
            "loss_l2": self.l2_loss_tracker, "energy_data": self.energy_data_tracker,
            "energy_samples": self.energy_samples_tracker,
        }
        logs = {}
        for name, value in terms.items():
            trackers[name].update_state(value)
            logs[name] = trackers[name].result()
        self.diverged_tracker.update_state(self._diverged(terms))
        logs["diverged"] = self.diverged_tracker.result()
        return logs

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = self._images(x)
        if self.conditional and y is not None:
            logits = self(x, training=False)
            self.accuracy_tracker.update_state(y, logits, sample_weight=sample_weight)
            self.ce_loss_tracker.update_state(
                keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True),
                sample_weight=sample_weight,
            )
            self.energy_data_tracker.update_state(
                energies.class_energy(logits, y), sample_weight=sample_weight
            )
            return distribute.replica_logs({
                "energy_data": self.energy_data_tracker.result(),
                "loss_ce": self.ce_loss_tracker.result(),
                "accuracy": self.accuracy_tracker.result(),
            })
        self.energy_data_tracker.update_state(
            self.energy(x, training=False), sample_weight=sample_weight
        )
        return distribute.replica_logs({"energy_data": self.energy_data_tracker.result()})

    @property
    def metrics(self):
        return [
            self.loss_tracker, self.ml_loss_tracker, self.l2_loss_tracker,
            self.energy_data_tracker, self.energy_samples_tracker, self.accuracy_tracker,
            self.ce_loss_tracker, self.diverged_tracker,
        ]

    # === Sampling API ===

    def _check_built(self):
        if not self.built:
            raise ValueError(
                "The model is not built yet: call it on a batch of images, train it, or load "
                "it before sampling."
            )

    def sample(self, num_samples=None, y=None, num_steps=None, x_init=None, from_buffer=False,
               training=None, seed=None):
        """Draws samples with the model's sampler.

        Args:
            num_samples: number of samples (inferred from `y` or `x_init` when given).
            y: optional int labels `(num_samples,)` (conditional models): samples of
                `p(x | y)`. A conditional model samples random labels when `y` is None.
            num_steps: sampler steps (default: the sampler's `num_steps`).
            x_init: optional starting images; default uniform noise.
            from_buffer: continue persistent chains from the replay buffer and write them back.
            training: the model's mode while sampling (default: `sample_in_training_mode`).
            seed: optional int seed.

        Returns:
            A float32 tensor `(num_samples, height, width, channels)`.
        """
        self._check_built()
        if x_init is not None:
            if from_buffer:
                raise ValueError("Pass either `x_init` or `from_buffer=True`, not both.")
            x_init = np.asarray(x_init, np.float32)
            if x_init.shape[1:] != self.image_shape:
                raise ValueError(
                    f"`x_init` must have shape (n, {', '.join(map(str, self.image_shape))}). "
                    f"Received: {x_init.shape}"
                )
        if num_samples is None:
            if y is not None:
                num_samples = len(np.asarray(y).reshape(-1))
            elif x_init is not None:
                num_samples = len(x_init)
            else:
                raise ValueError("Pass `num_samples`, `y` or `x_init` to `sample`.")
        num_samples = int(num_samples)
        if y is not None:
            y = np.asarray(y).reshape(-1).astype(np.int32)
            if ((y < 0) | (y >= self.num_classes)).any():
                unconditional = "" if self.conditional else " (this IGEBM is unconditional)"
                raise ValueError(
                    f"Labels `y` must be in [0, {self.num_classes}){unconditional}. Received "
                    f"min {y.min()}, max {y.max()}."
                )
            if not self.conditional:
                y = None  # the one class of an unconditional model
        elif self.conditional:
            y = np.random.default_rng(seed).integers(0, self.num_classes, num_samples)
            y = y.astype(np.int32)
        for name, value in (("y", y), ("x_init", x_init)):
            if value is not None and len(value) != num_samples:
                raise ValueError(
                    f"`{name}` holds {len(value)} entries but num_samples={num_samples}."
                )
        num_steps = self.sampler.num_steps if num_steps is None else int(num_steps)
        training = self.sample_in_training_mode if training is None else bool(training)
        if seed is None:
            seed_tensor = self._next_seed()
        else:
            seed_tensor = tf.constant([int(seed), 17], tf.int64)
        if self._sample_function is None:
            self._sample_function = tf.function(self._sample_graph, reduce_retracing=True)
        return self._sample_function(
            num_samples, None if y is None else tf.constant(y),
            None if x_init is None else tf.constant(x_init), bool(from_buffer), seed_tensor,
            tf.constant(num_steps), training,
        )

    def _sample_graph(self, num_samples, labels, start, from_buffer, seed, num_steps, training):
        indices = None
        if start is None:
            if from_buffer:
                indices, start, _ = self.buffer.draw(num_samples, labels=labels, seed=seed)
            else:
                start = self.buffer.fresh_samples(num_samples, seed=seed)
        samples = self.sampler(
            self, start, y=labels, seed=sampling.noise.fold_in(seed, 3), training=training,
            num_steps=num_steps,
        )
        if indices is not None:
            self.buffer.write(indices, samples)
        return samples

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

    # === Config ===

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "sampler": sampling.serialize(self.sampler),
                "buffer_size": self.buffer_size,
                "reinit_probability": self.reinit_probability,
                "energy_l2_weight": self.energy_l2_weight,
                "divergence_threshold": self.divergence_threshold,
                "sample_in_training_mode": self.sample_in_training_mode,
                "seed": self.seed,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        config["sampler"] = sampling.deserialize(config.get("sampler"))
        return cls(**config)
