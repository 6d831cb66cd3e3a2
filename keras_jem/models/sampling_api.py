"""`model.sample`, shared by every `EnergyModel` (kept apart to keep each module small)."""

import numpy as np
import tensorflow as tf

from keras_jem import sampling


class SamplingAPI:
    """`sample` and its compiled graph, for a model with `sampler`, `buffer`, `image_shape`,
    `num_classes`, `sample_in_training_mode` and `_next_seed()` (see `EnergyModel`).

    Example:

    >>> samples = model.sample(num_samples=64)         # from fresh starts
    >>> threes = model.sample(y=[3] * 16, seed=1)      # class-conditional, reproducible
    """

    #: Whether `sample` draws random labels when `y` is None (always class-conditional).
    samples_random_labels = False

    def _check_built(self):
        if not self.built:
            raise ValueError(
                "The model is not built yet: call it on a batch of images, train it, or load "
                "it before sampling."
            )

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
            when the sampler has a `clip_range`). With `training=True` (the default of JEM++ and
            SADA-JEM) the sampler's forward passes update BatchNorm moving statistics, as in the
            papers; pass `training=False` to leave them untouched.
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
        y = self._sample_labels(y, num_samples, seed)
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

    def _sample_labels(self, y, num_samples, seed):
        """Checked int32 labels for `sample`, random ones if `samples_random_labels`."""
        if y is not None:
            y = np.asarray(y).reshape(-1).astype(np.int32)
            if ((y < 0) | (y >= self.num_classes)).any():
                raise ValueError(
                    f"Labels `y` must be in [0, {self.num_classes}){self._label_note()}. "
                    f"Received min {y.min()}, max {y.max()}."
                )
        elif self.samples_random_labels:
            y = np.random.default_rng(seed).integers(0, self.num_classes, num_samples)
            y = y.astype(np.int32)
        return y

    def _label_note(self):
        return ""

    def _buffer_labels(self, labels):
        """The labels the replay buffer draws chains by (None: any chain, class-agnostic)."""
        return labels

    def _sample_graph(self, num_samples, labels, start, from_buffer, seed, num_steps, training):
        indices = None
        if start is None:
            if from_buffer:
                indices, start, _ = self.buffer.draw(
                    num_samples, labels=self._buffer_labels(labels), seed=seed)
            else:
                start = self.buffer.fresh_samples(num_samples, labels=labels, seed=seed)
        samples = self.sampler(
            self, start, y=labels, seed=sampling.noise.fold_in(seed, 3), training=training,
            num_steps=num_steps,
        )
        if indices is not None:
            self.buffer.write(indices, samples)
        return samples
