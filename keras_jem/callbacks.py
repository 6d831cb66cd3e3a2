"""Training callbacks for the JEM family: divergence guard and sample grids.

The step-level backup that never saves a diverged state is
`keras_jem.checkpointing.StepBackup`.
"""

import os

import keras
import numpy as np


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training on the first step a JEM-family model reports `diverged`.

    EBM training can blow up (JEM issues #4 and #8); the papers' recipe is to restart from the
    last good checkpoint with a new seed. The models report `diverged` (non-finite loss, or loss or
    energies beyond the model's `divergence_threshold`) on every step; this callback stops `fit`
    and records where it happened in `diverged_at = (epoch, batch, logs)`, so a driver (e.g.
    `trainers.fit`) can restore the last checkpoint and go on with another seed. Pass it to
    `keras_jem.checkpointing.StepBackup(guard=...)` so the backup is not overwritten by the
    diverged state (`StepBackup.rollback` then restores and reseeds).

    Example:

    >>> guard = DivergenceGuard()
    >>> model.fit(ds, callbacks=[guard])
    >>> if guard.diverged_at: ...  # roll back
    """

    def __init__(self):
        super().__init__()
        self.diverged_at = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self.diverged_at = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        value = logs.get("diverged", 0.0)
        loss = logs.get("loss", 0.0)
        if self.diverged_at is None and (float(value) > 0 or not np.isfinite(float(loss))):
            self.diverged_at = (self._epoch, batch, {k: float(v) for k, v in logs.items()})
            self.model.stop_training = True

    @property
    def diverged(self):
        return self.diverged_at is not None


class SampleGrid(keras.callbacks.Callback):
    """Writes a PNG grid of the model's samples every `every` epochs.

    By default it shows the images of the replay buffer (`buffer.stored_images()`: the
    persistent chains, or the latest samples of a FIFO buffer), which is what the model has
    learned to generate (JEM's `cond_samples` protocol): a random subset of the buffer is
    classified and each row shows the most confident chains of one predicted class. Nothing is
    written back and no sampler step runs, so it costs one forward pass. With
    `from_buffer=False`, each row instead holds fresh class-conditional chains
    (`model.sample(y=...)`) of `num_steps` steps from noise. For an unconditional model (one
    class, e.g. `IGEBM` without labels) the grid has 8 rows of its lowest-energy chains.

    Args:
        directory: where `epoch_XXX.png` files go.
        num_per_class: images per class row.
        every: epoch frequency.
        from_buffer: show buffer chains (True) or fresh class-conditional chains (False).
        num_steps: sampler steps for fresh chains (default: the model's sampler).
        log_dir: optional TensorBoard log dir for the same images.
        seed: seed of the subset / the fresh chains.
    """

    def __init__(self, directory, num_per_class=8, every=1, from_buffer=True, num_steps=None,
                 log_dir=None, seed=0):
        super().__init__()
        self.directory = directory
        self.num_per_class = int(num_per_class)
        self.every = max(1, int(every))
        self.from_buffer = from_buffer
        self.num_steps = num_steps
        self.log_dir = log_dir
        self.seed = seed
        self.last_path = None

    def _buffer_rows(self, epoch):
        """Rows of buffer images and their labels, or None when the buffer holds none."""
        model = self.model
        rng = np.random.default_rng(self.seed + epoch)
        stored = keras.ops.convert_to_numpy(model.buffer.stored_images())
        if not len(stored):
            return None
        count = min(len(stored), 20 * model.num_classes * self.num_per_class)
        indices = np.sort(rng.choice(len(stored), count, replace=False))
        images = stored[indices]
        logits = keras.ops.convert_to_numpy(model.predict(images, batch_size=256, verbose=0))
        if model.num_classes == 1:
            # An unconditional model: the lowest-energy chains, row by row.
            order = np.argsort(-logits[:, 0], kind="stable")[: self._rows() * self.num_per_class]
            return images[order], np.arange(len(order)) // self.num_per_class
        probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
        order = np.argsort(-probabilities.max(axis=-1), kind="stable")
        return images[order], probabilities.argmax(axis=-1)[order]

    def _rows(self):
        return self.model.num_classes if self.model.num_classes > 1 else 8

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        from keras_jem.metrics import images as image_lib

        model = self.model
        rows = self._buffer_rows(epoch) if self.from_buffer else None
        if rows is not None:
            images, labels = rows
        else:  # fresh chains (also when a FIFO buffer is still empty)
            labels = np.repeat(np.arange(self._rows()), self.num_per_class)
            images = keras.ops.convert_to_numpy(model.sample(
                y=labels if model.num_classes > 1 else np.zeros_like(labels),
                num_steps=self.num_steps, seed=self.seed + epoch))
        os.makedirs(self.directory, exist_ok=True)
        self.last_path = os.path.join(self.directory, f"epoch_{epoch + 1:03d}.png")
        image_lib.save_class_grid(images, labels, self.last_path, num_classes=self._rows(),
                                  per_class=self.num_per_class)
        if self.log_dir:
            import tensorflow as tf

            grid = image_lib.make_grid(images[: 8 * self.num_per_class],
                                       num_cols=self.num_per_class)
            writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "samples"))
            with writer.as_default():
                tf.summary.image("samples", grid[None].astype("float32") / 255.0,
                                 step=epoch + 1)
            writer.flush()
