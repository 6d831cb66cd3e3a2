"""JEM: a classifier reinterpreted as an energy-based model (Grathwohl et al., ICLR 2020)."""

import keras
import numpy as np
import tensorflow as tf

from keras_jem import distribute
from keras_jem import energies
from keras_jem import sampling
from keras_jem.backbones.layers import TorchDense
from keras_jem.optimizers import sam as sam_lib
from keras_jem.optimizers.sharpness_aware_model import non_trainable_state


@keras.saving.register_keras_serializable(package="keras_jem")
class JEM(keras.Model):
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
        backbone: a `keras_jem.backbones` layer (images -> features).
        num_classes: number of classes.
        sampler: a `keras_jem.sampling.Sampler` (default: JEM's `SGLD(20, 1.0, 0.01)`).
        buffer_size: number of persistent chains (10000).
        buffer_init: `"uniform"` or `"gaussian_mixture"` (then call `adapt_buffer` first).
        reinit_probability: probability of restarting a chain from a fresh sample (0.05).
        conditional_sampling: draw the p(x) samples class-conditionally (random labels, class
            blocks of the buffer; JEM's `class_cond_p_x_sample`).
        px_weight, pyx_weight, pxy_weight: weights of the three terms (1, 1, 0).
        energy_l2_weight: weight of the L2 penalty on energies (0; ~0.1 stabilises training).
        sample_in_training_mode: run the sampler with `training=True` (JEM++ and SADA-JEM keep
            BatchNorm in training mode while sampling; JEM uses eval mode).
        divergence_threshold: magnitude of loss or energies treated as divergence (1e8).
        sam: optional `keras_jem.optimizers.SAM`: both passes go through the whole loss, the
            second at perturbed weights, with BatchNorm statistics left untouched by it.
        buffer_covariance: `"full"` or `"diagonal"` class Gaussians for the informative init.
        weight_decay: coupled L2 weight decay added to the gradients before the optimizer (as
            PyTorch's `SGD(weight_decay=...)` in the papers' scripts; it goes through momentum,
            unlike Keras' decoupled `weight_decay` optimizer argument).
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

    default_sampler_config = {"num_steps": 20, "step_size": 1.0, "noise_scale": 0.01}

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
        energy_l2_weight=0.0,
        sample_in_training_mode=False,
        divergence_threshold=1e8,
        sam=None,
        buffer_covariance="full",
        weight_decay=0.0,
        seed=None,
        sequential_passes=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(
                f"`num_classes` must be an integer >= 2. Received: num_classes={num_classes}"
            )
        for name, value in (
            ("px_weight", px_weight), ("pyx_weight", pyx_weight), ("pxy_weight", pxy_weight),
            ("energy_l2_weight", energy_l2_weight), ("weight_decay", weight_decay),
        ):
            if value < 0:
                raise ValueError(f"`{name}` must be non-negative. Received: {name}={value}")
        if px_weight == 0 and pyx_weight == 0 and pxy_weight == 0:
            raise ValueError(
                "At least one of `px_weight`, `pyx_weight`, `pxy_weight` must be positive."
            )
        if not divergence_threshold > 0:
            raise ValueError(
                f"`divergence_threshold` must be positive. Received: {divergence_threshold}"
            )
        if (conditional_sampling or pxy_weight > 0) and buffer_size % num_classes:
            raise ValueError(
                f"Class-conditional sampling splits the replay buffer into {num_classes} equal "
                f"blocks, but buffer_size={buffer_size} is not divisible by "
                f"num_classes={num_classes}. Use a multiple of {num_classes}, e.g. "
                f"{(buffer_size // num_classes + 1) * num_classes}."
            )
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        sampler = sampling.deserialize(sampler)
        self.sampler = sampler if sampler is not None else self._default_sampler()
        if not isinstance(self.sampler, sampling.Sampler):
            raise ValueError(
                "`sampler` must be a keras_jem.sampling.Sampler (e.g. SGLD(...)). "
                f"Received: {sampler!r}"
            )
        self.buffer_size = int(buffer_size)
        self.buffer_init = buffer_init
        self.reinit_probability = float(reinit_probability)
        self.conditional_sampling = bool(conditional_sampling)
        self.px_weight = float(px_weight)
        self.pyx_weight = float(pyx_weight)
        self.pxy_weight = float(pxy_weight)
        self.energy_l2_weight = float(energy_l2_weight)
        self.sample_in_training_mode = bool(sample_in_training_mode)
        self.divergence_threshold = float(divergence_threshold)
        self.sam = sam_lib.deserialize(sam)
        self.buffer_covariance = buffer_covariance
        self.weight_decay = float(weight_decay)
        self.seed = seed
        self.sequential_passes = bool(sequential_passes)
        self.image_shape = None

        # === Layers ===
        self.head = self._build_head()
        self.buffer = sampling.ReplayBuffer(
            size=buffer_size,
            initialization=buffer_init,
            reinit_probability=reinit_probability,
            num_classes=num_classes,
            covariance=buffer_covariance,
            seed=seed,
            name="replay_buffer",
        )
        self.seed_generator = keras.random.SeedGenerator(seed, name="sampler_seed")

        # === Metrics ===
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.px_loss_tracker = keras.metrics.Mean(name="loss_px")
        self.ce_loss_tracker = keras.metrics.Mean(name="loss_ce")
        self.pxy_loss_tracker = keras.metrics.Mean(name="loss_pxy")
        self.energy_data_tracker = keras.metrics.Mean(name="energy_data")
        self.energy_samples_tracker = keras.metrics.Mean(name="energy_samples")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.diverged_tracker = keras.metrics.Mean(name="diverged")
        self._sample_function = None

    def _default_sampler(self):
        return sampling.SGLD(**self.default_sampler_config)

    def _build_head(self):
        return TorchDense(self.num_classes, name="class_head")

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
                "JEM models take images of shape (batch, height, width, channels) with known "
                f"height, width and channels. Received input shape: {input_shape}"
            )
        self.image_shape = tuple(int(d) for d in input_shape[1:])
        # Run the backbone once so that every sublayer creates its variables.
        self.backbone(keras.ops.zeros((1,) + self.image_shape))
        self._build_head_variables()
        self.buffer.build(self.image_shape)
        self.built = True

    def _build_head_variables(self):
        self.head.build((None, self.backbone.feature_dim))

    def call(self, inputs, training=None):
        return self.logits_from_features(
            self.backbone(self._images(inputs), training=training))

    def logits_from_features(self, features):
        # float32 logits under a mixed-precision policy, so that energies (logsumexp), losses
        # and the sampler's gradient start in float32 (a no-op under the float32 policy).
        return keras.ops.cast(self.head(features), "float32")

    def energy(self, x, y=None, training=False):
        """Energy `E(x)` (y None) or `E(x, y)` per example; lower means more likely."""
        return energies.classifier_energy(self(x, training=training), y)

    def stem(self, x):
        return self.backbone.stem(x)

    @property
    def stem_is_affine(self):
        """True when the backbone's stem is affine in x (see `ProximalSGLD`)."""
        return bool(getattr(self.backbone, "stem_is_affine", False))

    def energy_from_stem(self, stem_output, y=None, training=False):
        features = self.backbone.call_from_stem(stem_output, training=training)
        return energies.classifier_energy(self.logits_from_features(features), y)

    # === Replay buffer ===

    def adapt_buffer(self, images, labels, seed=0):
        """Fits the class Gaussians of the informative buffer init and refills the buffer.

        Needed once before training when `buffer_init="gaussian_mixture"` (JEM++, SADA-JEM).

        Args:
            images: training images `(n, height, width, channels)` in [-1, 1].
            labels: int labels `(n,)`.
        """
        images = np.asarray(images, np.float32)
        if not self.built:
            self.build((None,) + images.shape[1:])
        self.buffer.adapt(images, labels, seed=seed)

    def fit(self, *args, **kwargs):
        if not self.buffer.is_adapted:
            raise ValueError(
                f"{self.__class__.__name__} was configured with buffer_init='gaussian_mixture' "
                "(the informative initialisation of JEM++/SADA-JEM), which fits one Gaussian "
                "per class to the training data. Call `model.adapt_buffer(images, labels)` "
                "before `fit`, or pass buffer_init='uniform'."
            )
        if self.built and self.optimizer is not None and not self.optimizer.built:
            # Creating the optimizer's variables before `fit` traces the first step spares
            # tf.function a second trace (and graph optimisation) of the whole training step.
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)
        return super().fit(*args, **kwargs)

    def _next_seed(self):
        return sampling.next_seed(self.seed_generator)

    def _continue_chains(self, batch_size, labels, seed):
        """Draws chains from the buffer, runs the sampler, writes them back."""
        indices, start, reinitialized = self.buffer.draw(batch_size, labels=labels, seed=seed)
        samples = self.sampler(
            self, start, y=labels, seed=sampling.noise.fold_in(seed, 11),
            training=self.sample_in_training_mode,
        )
        self.buffer.write(indices, samples)
        return samples

    # === Training ===

    @staticmethod
    def _split_streams(x):
        if isinstance(x, dict):
            images = x["images"]
            return images, x.get("px_images", images)
        return x, x

    def _sample_for_step(self, x_px, y):
        batch_size = x_px.shape[0] if x_px.shape[0] is not None else tf.shape(x_px)[0]
        seed = self._next_seed()
        samples = {}
        if self.px_weight > 0:
            labels = None
            if self.conditional_sampling:
                labels = tf.random.stateless_uniform(
                    (batch_size,), sampling.noise.fold_in(seed, 1), maxval=self.num_classes,
                    dtype=tf.int32,
                )
            samples["px"] = self._continue_chains(batch_size, labels, seed)
        if self.pxy_weight > 0:
            samples["pxy"] = self._continue_chains(
                y.shape[0] if y.shape[0] is not None else tf.shape(y)[0], tf.cast(y, tf.int32), sampling.noise.fold_in(seed, 2)
            )
        return samples

    def _loss_passes(self, x_ce, x_px, y, samples, sample_weight, same_stream):
        """The loss as a list of per-pass functions; their losses sum to the total loss.

        Each function runs the network on one input (the labelled batch, the likelihood batch,
        the samples of p(x), the samples of p(x, y)) and returns `(loss, values)`, `values`
        holding what the logs need (`logits`, `loss_ce`, energies). Every term of the loss
        involves one pass only, so the gradient of the total is the sum of the passes'
        gradients (`sequential_passes`).
        """
        px, pxy = "px" in samples, "pxy" in samples
        l2 = self.energy_l2_weight

        def squares(energy):
            return l2 * tf.reduce_mean(tf.square(energy)) if l2 > 0 else 0.0

        def labelled():
            logits = self(x_ce, training=True)
            values = {"logits": logits}
            loss = 0.0
            if self.pyx_weight > 0:
                ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
                if sample_weight is not None:
                    ce = ce * tf.cast(tf.reshape(sample_weight, (-1,)), ce.dtype)
                values["loss_ce"] = tf.reduce_mean(ce)
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

    def _combine_passes(self, losses, values):
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

    def _loss_terms(self, x_ce, x_px, y, samples, sample_weight, same_stream):
        """All loss terms at the current weights; returns (total, terms dict, logits)."""
        results = [run() for run in self._loss_passes(
            x_ce, x_px, y, samples, sample_weight, same_stream)]
        return self._combine_passes([r[0] for r in results], [r[1] for r in results])

    def _replica_scale(self):
        return 1.0 / tf.distribute.get_strategy().num_replicas_in_sync

    def _compute_gradients(self, x_ce, x_px, y, samples, sample_weight, same_stream, variables):
        # Subclasses with their own `_loss_terms` (GMMC) differentiate it in one tape.
        if not self.sequential_passes or type(self)._loss_terms is not JEM._loss_terms:
            with tf.GradientTape() as tape:
                loss, terms, logits = self._loss_terms(
                    x_ce, x_px, y, samples, sample_weight, same_stream)
                scaled = self.optimizer.scale_loss(loss * self._replica_scale())
            return tape.gradient(scaled, variables), terms, logits
        gradients, losses, values = None, [], []
        for run in self._loss_passes(x_ce, x_px, y, samples, sample_weight, same_stream):
            # The next pass starts after the previous pass's backward step: its activations
            # are freed first (TensorFlow would otherwise run the passes concurrently).
            after = [] if gradients is None else [g for g in gradients if g is not None]
            with tf.control_dependencies(after), tf.GradientTape() as tape:
                loss, value = run()
                scaled = self.optimizer.scale_loss(
                    tf.convert_to_tensor(loss, tf.float32) * self._replica_scale())
            pass_gradients = tape.gradient(scaled, variables)
            if gradients is None:
                gradients = pass_gradients
            else:
                gradients = [
                    a if b is None else b if a is None else a + b
                    for a, b in zip(gradients, pass_gradients)
                ]
            losses.append(loss)
            values.append(value)
        total, terms, logits = self._combine_passes(losses, values)
        return gradients, terms, logits

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            if self.pyx_weight > 0 or self.pxy_weight > 0:
                raise ValueError(
                    "JEM training with pyx_weight or pxy_weight > 0 needs labels: the dataset "
                    "must yield (images, labels). For unlabelled data use pyx_weight=0."
                )
            y = tf.zeros(tf.shape(self._split_streams(x)[1])[:1], tf.int32)
        x_ce, x_px = self._split_streams(x)
        if not self.built:
            self.build(x_ce.shape)
        same_stream = x_px is x_ce
        samples = self._sample_for_step(x_px, y)
        variables = self.trainable_variables
        gradients, terms, logits = self._compute_gradients(
            x_ce, x_px, y, samples, sample_weight, same_stream, variables
        )
        if self.sam is not None:
            backup = self.sam.perturb(variables, gradients)
            moments = non_trainable_state(self.backbone)
            saved_moments = [tf.identity(v) for v in moments]
            gradients, _, _ = self._compute_gradients(
                x_ce, x_px, y, samples, sample_weight, same_stream, variables
            )
            self.sam.restore(variables, backup)
            for variable, value in zip(moments, saved_moments):
                variable.assign(value)
        self.apply_gradients(gradients, variables)
        return distribute.replica_logs(self._update_metrics(terms, y, logits))

    def apply_gradients(self, gradients, variables):
        """Applies the optimizer, with coupled weight decay when `weight_decay > 0`."""
        if self.weight_decay > 0:
            gradients = [
                g if g is None else g + self.weight_decay * tf.cast(v, g.dtype)
                for g, v in zip(gradients, variables)
            ]
        self.optimizer.apply(gradients, variables)

    def _diverged(self, terms):
        magnitude = tf.reduce_max(tf.abs(tf.stack([
            tf.cast(terms[k], tf.float32) for k in ("loss", "energy_data", "energy_samples")
            if k in terms
        ])))
        finite = tf.reduce_all(tf.math.is_finite(tf.stack(
            [tf.cast(v, tf.float32) for v in terms.values()])))
        return tf.cast(tf.logical_or(tf.logical_not(finite),
                                     magnitude > self.divergence_threshold), tf.float32)

    def _update_metrics(self, terms, y, logits):
        trackers = {
            "loss": self.loss_tracker, "loss_px": self.px_loss_tracker,
            "loss_ce": self.ce_loss_tracker, "loss_pxy": self.pxy_loss_tracker,
            "energy_data": self.energy_data_tracker,
            "energy_samples": self.energy_samples_tracker,
        }
        for name, value in terms.items():
            trackers[name].update_state(value)
        self.accuracy_tracker.update_state(y, logits)
        self.diverged_tracker.update_state(self._diverged(terms))
        names = ["loss"] + [k for k in ("loss_ce", "loss_px", "loss_pxy", "energy_data",
                                        "energy_samples") if k in terms]
        logs = {name: trackers[name].result() for name in names}
        logs["accuracy"] = self.accuracy_tracker.result()
        logs["diverged"] = self.diverged_tracker.result()
        return logs

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logits = self(self._images(x), training=False)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        self.ce_loss_tracker.update_state(ce, sample_weight=sample_weight)
        self.energy_data_tracker.update_state(energies.logsumexp_energy(logits))
        self.accuracy_tracker.update_state(y, logits, sample_weight=sample_weight)
        return distribute.replica_logs({
            "loss_ce": self.ce_loss_tracker.result(),
            "energy_data": self.energy_data_tracker.result(),
            "accuracy": self.accuracy_tracker.result(),
        })

    @property
    def metrics(self):
        return [
            self.loss_tracker, self.px_loss_tracker, self.ce_loss_tracker, self.pxy_loss_tracker,
            self.energy_data_tracker, self.energy_samples_tracker, self.accuracy_tracker,
            self.diverged_tracker,
        ]

    # === Sampling API ===

    def sample(
        self,
        num_samples=None,
        y=None,
        num_steps=None,
        x_init=None,
        from_buffer=False,
        training=None,
        seed=None,
    ):
        """Draws samples from the model with its sampler.

        Args:
            num_samples: number of samples (inferred from `y` or `x_init` when given).
            y: optional int labels `(num_samples,)`: sample from `p(x | y)` (class energy).
            num_steps: sampler steps (default: the sampler's `num_steps`).
            x_init: optional starting images; default fresh starts (uniform noise, or the class
                Gaussians with the informative init).
            from_buffer: continue persistent chains from the replay buffer and write them back
                (the papers' protocol for sample quality); `x_init` is then not allowed.
            training: BatchNorm mode while sampling (default: `sample_in_training_mode`).
            seed: optional int seed for reproducible samples.

        Returns:
            A float32 tensor `(num_samples, height, width, channels)` (clipped to the data range
            when the sampler has a `clip_range`, as JEM++'s and SADA-JEM's do). With
            `training=True` (the default of JEM++ and SADA-JEM) the sampler's forward passes
            update BatchNorm moving statistics, as in the papers; pass `training=False` to
            leave them untouched.
        """
        if not self.built:
            raise ValueError(
                "The model is not built yet: call it on a batch of images, train it, or load "
                "it before sampling."
            )
        if y is not None:
            y = np.asarray(y).reshape(-1).astype(np.int32)
            if ((y < 0) | (y >= self.num_classes)).any():
                raise ValueError(
                    f"Labels `y` must be in [0, {self.num_classes}). Received min {y.min()}, "
                    f"max {y.max()}."
                )
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
                num_samples = len(y)
            elif x_init is not None:
                num_samples = len(x_init)
            else:
                raise ValueError("Pass `num_samples`, `y` or `x_init` to `sample`.")
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
        labels = None if y is None else tf.constant(y)
        start = None if x_init is None else tf.constant(x_init)
        return self._sample_function(
            num_samples, labels, start, bool(from_buffer), seed_tensor,
            tf.constant(num_steps), training,
        )

    def _sample_graph(self, num_samples, labels, start, from_buffer, seed, num_steps, training):
        indices = None
        if start is None:
            if from_buffer:
                indices, start, _ = self.buffer.draw(num_samples, labels=labels, seed=seed)
            else:
                start = self.buffer.fresh_samples(num_samples, labels=labels, seed=seed)
        samples = self.sampler(
            self, start, y=labels, seed=sampling.noise.fold_in(seed, 3), training=training,
            num_steps=num_steps,
        )
        if indices is not None:
            self.buffer.write(indices, samples)
        return samples

    # === Config ===

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "num_classes": self.num_classes,
                "sampler": sampling.serialize(self.sampler),
                "buffer_size": self.buffer_size,
                "buffer_init": self.buffer_init,
                "reinit_probability": self.reinit_probability,
                "conditional_sampling": self.conditional_sampling,
                "px_weight": self.px_weight,
                "pyx_weight": self.pyx_weight,
                "pxy_weight": self.pxy_weight,
                "energy_l2_weight": self.energy_l2_weight,
                "sample_in_training_mode": self.sample_in_training_mode,
                "divergence_threshold": self.divergence_threshold,
                "sam": None if self.sam is None else keras.saving.serialize_keras_object(self.sam),
                "buffer_covariance": self.buffer_covariance,
                "weight_decay": self.weight_decay,
                "seed": self.seed,
                "sequential_passes": self.sequential_passes,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        config["sampler"] = sampling.deserialize(config.get("sampler"))
        config["sam"] = sam_lib.deserialize(config.get("sam"))
        return cls(**config)
