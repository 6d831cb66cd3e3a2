"""`EnergyModel`: what every keras-jem method shares; a method supplies its loss terms."""

import collections
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from keras_jem import distribute
from keras_jem import energies
from keras_jem import sampling
from keras_jem.backbones import backbone as backbone_lib
from keras_jem.models.sampling_api import SamplingAPI
from keras_jem.optimizers import gradient_steps
from keras_jem.optimizers import sam as sam_lib

Batch = collections.namedtuple("Batch", ["images", "px_images", "labels", "sample_weight"])
Batch.__doc__ = """One training batch, as `train_step` hands it to a method's hooks.

`images` is the labelled (cross-entropy) stream and the shape the model is built from;
`px_images` the likelihood stream (the same tensor when the data has one stream); `labels` int
labels or None; `sample_weight` None or per-example weights."""


def weighted(values, sample_weight):
    """`values * sample_weight` per example (`values` unchanged when `sample_weight` is None).

    The mean of the result is Keras' "sum_over_batch_size" reduction of a weighted loss.
    """
    if sample_weight is None:
        return values
    return values * tf.cast(tf.reshape(sample_weight, (-1,)), values.dtype)


def batch_size(tensor):
    """The static batch size of `tensor` when known, else a scalar tensor."""
    return tensor.shape[0] if tensor.shape[0] is not None else tf.shape(tensor)[0]


class EnergyModel(SamplingAPI, keras.Model):
    """Base class of the energy-based models: backbone, replay buffer, sampler, training step.

    A method (JEM, GMMC, IGEBM, or a new one) subclasses it and supplies:

    - `_build_head()`: the layer on top of the backbone's features (stored as `self.head`);
    - `training_batch(x, y, sample_weight)`: a `Batch` (which streams and labels it trains on);
    - `draw_samples(batch)`: a dict of sampler outputs, usually via `continue_chains`;
    - `loss_passes(batch, samples)`: a list of functions, each running the network on one input
      and returning `(loss, values)`; the total loss is the sum of their losses, and with
      `sequential_passes=True` each pass is differentiated alone (one pass's activations in
      memory at a time);
    - `tracked_terms`: the names of the loss terms its training logs report, and optionally
      `loss_terms(losses, values)` to derive them.

    Everything else is here: `build` (from the image shape; the feature size is read from the
    backbone's output, so any Keras layer or model mapping images to `(batch, features)` is a
    backbone), `call` and `energy` for a classifier head, `sample` and its compiled graph, the
    replay buffer and the sampler's seed generator, gradients (one tape or pass by pass), SAM's
    second pass and coupled weight decay (`keras_jem.optimizers.gradient_steps`, shared with
    `SharpnessAwareModel`), divergence detection, the loss trackers, `get_config` (the names in
    `config_names`) and `from_config`. `docs/architecture.md` shows a new method written on it.

    Args:
        backbone: a Keras layer or model mapping images to `(batch, features)`.
        num_classes: number of classes (None: the method has no labels).
        sampler: a `keras_jem.sampling.Sampler` (None: the method's own,
            `default_sampler_class(**default_sampler_config)`).
        buffer_size: number of persistent chains (or of stored samples, `buffer_type="fifo"`).
        buffer_type: `"persistent"` (`keras_jem.sampling.ReplayBuffer`: chains continued and
            written back in place, JEM's) or `"fifo"` (`keras_jem.sampling.FIFOReplayBuffer`:
            a ring of the latest samples in 8 bits, class-agnostic, uniform init only; the
            official IGEBM code's).
        buffer_init: `"uniform"` or `"gaussian_mixture"` (then call `adapt_buffer` first).
        reinit_probability: probability of restarting a chain from a fresh sample.
        buffer_covariance: `"full"` or `"diagonal"` class Gaussians for the informative init.
        buffer_uniform_fraction: with the informative init, the fraction of fresh chain starts
            drawn from uniform noise instead (`ReplayBuffer(uniform_fraction=...)`), so that the
            energy of noise-like images is trained too (docs/batch_norm.md).
        class_blocks: whether chains are drawn per class (the buffer is then split into
            `num_classes` equal blocks, and `buffer_size` must be a multiple of `num_classes`).
        energy_l2_weight: weight of the L2 penalty on energies.
        sample_in_training_mode: run the sampler with `training=True`.
        divergence_threshold: magnitude of loss or energies reported as `diverged`.
        sam: a `keras_jem.optimizers.SAM` (two passes per step) or None; `"default"`:
            `SAM(**default_sam_config)` for a method that sets one (SADA-JEM), else None.
        weight_decay: coupled L2 weight decay (see `add_coupled_weight_decay`).
        seed: seed of the sampler's noise and buffer draws.
        sequential_passes: differentiate the loss one network pass at a time.
        **kwargs: base `keras.Model` arguments.
    """

    #: The method's sampler: `default_sampler_class` with the settings in which the method
    #: differs from that class's own defaults (JEM's are `SGLD`'s, so JEM adds none). The
    #: trainers read them from here (`trainers.presets.defaults`); keep each default in one place.
    default_sampler_class = sampling.SGLD
    default_sampler_config: ClassVar[dict] = {}
    #: `SAM` arguments of the method's default sharpness-aware step (None: no SAM).
    default_sam_config: ClassVar[dict | None] = None
    #: Loss terms of the training logs, in log order.
    tracked_terms = ("loss",)
    #: Terms whose magnitude above `divergence_threshold` counts as divergence.
    divergence_terms = ("loss", "energy_data", "energy_samples")
    #: Constructor arguments saved by `get_config` (besides `backbone`), read from attributes.
    config_names = (
        "num_classes", "sampler", "buffer_size", "buffer_init", "reinit_probability",
        "energy_l2_weight", "sample_in_training_mode", "divergence_threshold", "sam",
        "buffer_covariance", "weight_decay", "seed", "sequential_passes",
        "buffer_uniform_fraction", "buffer_type",
    )
    #: The replay buffer classes of `buffer_type`.
    buffer_classes: ClassVar[dict] = {
        "persistent": sampling.ReplayBuffer, "fifo": sampling.FIFOReplayBuffer}

    def __init__(
        self,
        backbone,
        num_classes=None,
        sampler=None,
        buffer_size=10000,
        buffer_init="uniform",
        reinit_probability=0.05,
        buffer_covariance="full",
        class_blocks=False,
        energy_l2_weight=0.0,
        sample_in_training_mode=False,
        divergence_threshold=1e8,
        sam="default",
        weight_decay=0.0,
        seed=None,
        sequential_passes=True,
        buffer_uniform_fraction=0.0,
        buffer_type="persistent",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if buffer_type not in self.buffer_classes:
            raise ValueError(
                f"`buffer_type` must be one of {tuple(self.buffer_classes)}: 'persistent' "
                "(chains written back in place) or 'fifo' (a ring of recent 8-bit samples). "
                f"Received: buffer_type={buffer_type!r}"
            )
        if buffer_type == "fifo" and class_blocks:
            raise ValueError(
                f"{self.__class__.__name__} draws its chains class-conditionally (from per-class "
                "blocks of the replay buffer), but buffer_type='fifo' is class-agnostic, as the "
                "official IGEBM buffer. Use buffer_type='persistent' for class-conditional "
                "chains, or turn class-conditional sampling off."
            )
        for name, value in (("energy_l2_weight", energy_l2_weight),
                            ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"`{name}` must be non-negative. Received: {name}={value}")
        if not divergence_threshold > 0:
            raise ValueError(
                f"`divergence_threshold` must be positive. Received: {divergence_threshold}"
            )
        if class_blocks and buffer_size % num_classes:
            raise ValueError(
                f"{self.__class__.__name__} samples class-conditionally from {num_classes} "
                f"class blocks of the replay buffer, but buffer_size={buffer_size} is not "
                f"divisible by num_classes={num_classes} (not a multiple of {num_classes}). "
                f"Use a multiple of {num_classes}, e.g. "
                f"{(buffer_size // num_classes + 1) * num_classes}."
            )
        self.backbone = backbone_lib.check_backbone(backbone)
        self.num_classes = None if num_classes is None else int(num_classes)
        sampler = sampling.deserialize(sampler)
        self.sampler = sampler if sampler is not None else self._default_sampler()
        if not isinstance(self.sampler, sampling.Sampler):
            raise ValueError(  # noqa: TRY004 (ValueError is the keras-jem API's error here)
                "`sampler` must be a keras_jem.sampling.Sampler (e.g. SGLD(...)). "
                f"Received: {sampler!r}"
            )
        self.buffer_size = int(buffer_size)
        self.buffer_init = buffer_init
        self.reinit_probability = float(reinit_probability)
        self.buffer_covariance = buffer_covariance
        self.buffer_uniform_fraction = float(buffer_uniform_fraction)
        self.buffer_type = buffer_type
        self.energy_l2_weight = float(energy_l2_weight)
        self.sample_in_training_mode = bool(sample_in_training_mode)
        self.divergence_threshold = float(divergence_threshold)
        if isinstance(sam, str) and sam == "default":
            sam = None if self.default_sam_config is None else sam_lib.SAM(
                **self.default_sam_config)
        self.sam = sam_lib.deserialize(sam)
        self.weight_decay = float(weight_decay)
        self.seed = seed
        self.sequential_passes = bool(sequential_passes)
        self.image_shape = None
        self.feature_dim = getattr(self.backbone, "feature_dim", None)

        # === Layers ===
        self._create_head()
        self.buffer = self.buffer_classes[buffer_type](
            size=buffer_size,
            initialization=buffer_init,
            reinit_probability=reinit_probability,
            num_classes=num_classes,
            covariance=buffer_covariance,
            seed=seed,
            uniform_fraction=buffer_uniform_fraction,
            name="replay_buffer",
        )
        self.seed_generator = keras.random.SeedGenerator(seed, name="sampler_seed")

        # === Metrics ===
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in self.tracked_terms}
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.diverged_tracker = keras.metrics.Mean(name="diverged")
        self._sample_function = None

    def _default_sampler(self):
        return self.default_sampler_class(**self.default_sampler_config)

    def _create_head(self):
        """Creates `self.head`, the layer on top of the features (subclasses)."""
        raise NotImplementedError

    def _build_head(self, feature_dim):
        self.head.build((None, feature_dim))

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
                f"{self.__class__.__name__} takes images of shape (batch, height, width, "
                f"channels) with known height, width and channels. Received input shape: "
                f"{input_shape}"
            )
        self.image_shape = tuple(int(d) for d in input_shape[1:])
        # Run the backbone once so that every sublayer creates its variables, and read the
        # feature size from its output (any Keras model mapping images to vectors works).
        self.feature_dim = backbone_lib.output_feature_dim(
            self.backbone, self._backbone_on, self.image_shape)
        self._build_head(self.feature_dim)
        self.buffer.build(self.image_shape)
        self.built = True

    def _backbone_on(self, images):
        """The backbone on `images` when building (conditional models pass labels)."""
        return self.backbone(images)

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

    @property
    def supports_stem(self):
        """Whether the backbone has `stem` / `call_from_stem` (JEM++'s proximal shortcut)."""
        return backbone_lib.supports_stem(self.backbone)

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

    def continue_chains(self, batch_size, labels, seed):
        """Draws chains from the buffer, runs the sampler, writes them back.

        The sampler runs under `labels`; the buffer draws by `_buffer_labels(labels)`.
        """
        indices, start, _ = self.buffer.draw(
            batch_size, labels=self._buffer_labels(labels), seed=seed)
        samples = self.sampler(
            self, start, y=labels, seed=sampling.noise.fold_in(seed, 11),
            training=self.sample_in_training_mode,
        )
        self.buffer.write(indices, samples)
        return samples

    def _buffer_labels(self, labels):
        # A FIFO buffer is class-agnostic: a chain for any label starts from any sample.
        return None if self.buffer_type == "fifo" else labels

    # === Training ===

    def training_batch(self, x, y, sample_weight):
        """The `Batch` this method trains on (subclasses: streams, labels, their checks)."""
        raise NotImplementedError

    def draw_samples(self, batch):
        """The sampler's outputs for this step, a dict (subclasses)."""
        raise NotImplementedError

    def loss_passes(self, batch, samples):
        """The loss as a list of functions returning `(loss, values)` (subclasses)."""
        raise NotImplementedError

    def loss_terms(self, losses, values):
        """The total loss, the log terms and the logits (or None) from the passes' results.

        The default merges the passes' `values` dicts: every key but `logits` is a log term.
        """
        merged = {}
        for value in values:
            merged.update(value)
        logits = merged.pop("logits", None)
        total = tf.add_n([tf.convert_to_tensor(loss, tf.float32) for loss in losses])
        merged["loss"] = total
        return total, merged, logits

    def compute_gradients(self, batch, samples, variables):
        """Gradients of the loss-scaled per-replica loss, the log terms and the logits.

        With `sequential_passes`, one tape per pass; the next pass starts after the previous
        pass's backward step, so its activations are freed first. Otherwise one tape over
        every pass.
        """
        passes = self.loss_passes(batch, samples)
        groups = [[run] for run in passes] if self.sequential_passes else [passes]
        replica_scale = 1.0 / tf.distribute.get_strategy().num_replicas_in_sync
        gradients, losses, values = None, [], []
        for group in groups:
            after = [] if gradients is None else [g for g in gradients if g is not None]
            with tf.control_dependencies(after), tf.GradientTape() as tape:
                results = [run() for run in group]
                loss = tf.add_n([tf.convert_to_tensor(r[0], tf.float32) for r in results])
                scaled = self.optimizer.scale_loss(loss * replica_scale)
            group_gradients = tape.gradient(scaled, variables)
            if gradients is None:
                gradients = group_gradients
            else:
                gradients = [
                    a if b is None else b if a is None else a + b
                    for a, b in zip(gradients, group_gradients)
                ]
            losses.extend(r[0] for r in results)
            values.extend(r[1] for r in results)
        _, terms, logits = self.loss_terms(losses, values)
        return gradients, terms, logits

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batch = self.training_batch(x, y, sample_weight)
        if not self.built:
            self.build(batch.images.shape)
        samples = self.draw_samples(batch)
        variables = self.trainable_variables
        gradients, terms, logits = self.compute_gradients(batch, samples, variables)
        if self.sam is not None:
            gradients = gradient_steps.sharpness_aware_gradients(
                self.sam, variables, gradients,
                lambda: self.compute_gradients(batch, samples, variables)[0], self.backbone,
            )
        self.apply_gradients(gradients, variables)
        return distribute.replica_logs(self._update_metrics(terms, batch.labels, logits))

    def apply_gradients(self, gradients, variables):
        """Applies the optimizer, with coupled weight decay when `weight_decay > 0`."""
        gradients = gradient_steps.add_coupled_weight_decay(
            self.optimizer, gradients, variables, self.weight_decay)
        self.optimizer.apply(gradients, variables)

    def _diverged(self, terms):
        magnitude = tf.reduce_max(tf.abs(tf.stack([
            tf.cast(terms[k], tf.float32) for k in self.divergence_terms if k in terms
        ])))
        finite = tf.reduce_all(tf.math.is_finite(tf.stack(
            [tf.cast(v, tf.float32) for v in terms.values()])))
        return tf.cast(tf.logical_or(tf.logical_not(finite),
                                     magnitude > self.divergence_threshold), tf.float32)

    def _update_metrics(self, terms, labels, logits):
        logs = {}
        for name, tracker in self.loss_trackers.items():
            if name in terms:
                tracker.update_state(terms[name])
                logs[name] = tracker.result()
        if logits is not None:
            self.accuracy_tracker.update_state(labels, logits)
            logs["accuracy"] = self.accuracy_tracker.result()
        self.diverged_tracker.update_state(self._diverged(terms))
        logs["diverged"] = self.diverged_tracker.result()
        return logs

    def _evaluate_classifier(self, x, y, sample_weight, terms):
        """`test_step` of a classifier: updates `terms`' trackers and accuracy, returns logs.

        Args:
            terms: dict from tracker name to a function `(logits, labels) -> per-example
                values` (e.g. `energies.class_energy`).
        """
        logits = self(self._images(x), training=False)
        logs = {}
        for name, value in terms.items():
            self.loss_trackers[name].update_state(value(logits, y), sample_weight=sample_weight)
            logs[name] = self.loss_trackers[name].result()
        self.accuracy_tracker.update_state(y, logits, sample_weight=sample_weight)
        logs["accuracy"] = self.accuracy_tracker.result()
        return distribute.replica_logs(logs)

    @property
    def metrics(self):
        return list(self.loss_trackers.values()) + [self.accuracy_tracker,
                                                    self.diverged_tracker]

    # === Config ===

    def get_config(self):
        config = super().get_config()
        config["backbone"] = keras.saving.serialize_keras_object(self.backbone)
        for name in self.config_names:
            value = getattr(self, name)
            if name == "sampler":
                value = sampling.serialize(value)
            elif name == "sam" and value is not None:
                value = keras.saving.serialize_keras_object(value)
            config[name] = value
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # Configs saved before `buffer_type` existed describe the persistent buffer.
        config.setdefault("buffer_type", "persistent")
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        config["sampler"] = sampling.deserialize(config.get("sampler"))
        if "sam" in config:
            config["sam"] = sam_lib.deserialize(config["sam"])
        return cls(**config)
