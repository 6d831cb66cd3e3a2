"""Training callbacks for the JEM family: divergence guard, sample grids, reseeding."""

import os

import keras
import numpy as np


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training on the first step a JEM-family model reports `diverged`.

    EBM training can blow up (JEM issues #4 and #8); the papers' recipe is to restart from the
    last good checkpoint with a new seed. The models report `diverged` (non-finite loss, or loss or
    energies beyond the model's `divergence_threshold`) on every step; this callback stops `fit`
    and records where it happened in `diverged_at = (epoch, batch, logs)`, so a driver (e.g.
    `trainers.fit`) can restore the last checkpoint and go on with another seed. Pass it the
    `GuardedBackupAndRestore` so the backup is not overwritten by the diverged state.

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


class GuardedBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that never saves after a divergence.

    When training stops on divergence, Keras still ends the epoch, and the plain callback would
    back up the diverged weights. This one skips saving once `guard.diverged` is set, so the
    backup stays at the last good state.

    Args:
        backup_dir: as in `BackupAndRestore`.
        guard: the run's `DivergenceGuard`.
        **kwargs: `save_freq`, `double_checkpoint`, `delete_checkpoint`.
    """

    def __init__(self, backup_dir, guard, **kwargs):
        super().__init__(backup_dir, **kwargs)
        self.guard = guard

    def on_epoch_end(self, epoch, logs=None):
        if not self.guard.diverged:
            super().on_epoch_end(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if not self.guard.diverged:
            super().on_train_batch_end(batch, logs)


class Reseed(keras.callbacks.Callback):
    """Sets the sampler's seed state at the start of training (place it after a restore).

    Args:
        seed: the new seed.
    """

    def __init__(self, seed):
        super().__init__()
        self.seed = int(seed)

    def on_train_begin(self, logs=None):
        state = self.model.seed_generator.state
        state.assign(np.array([self.seed, 0], dtype=state.dtype))


class SampleGrid(keras.callbacks.Callback):
    """Writes a PNG grid of model samples at the end of every `every` epochs.

    Class-conditional rows (one per class) are drawn with `model.sample(y=...)`; the images are
    also logged to TensorBoard when `log_dir` is given.

    Args:
        directory: where `epoch_XXX.png` files go.
        num_per_class: samples per class row.
        num_steps: sampler steps (default: the model's sampler).
        every: epoch frequency.
        from_buffer: show persistent chains from the replay buffer (True) or fresh chains.
        log_dir: optional TensorBoard log dir.
    """

    def __init__(self, directory, num_per_class=8, num_steps=None, every=1, from_buffer=True,
                 log_dir=None, seed=0):
        super().__init__()
        self.directory = directory
        self.num_per_class = int(num_per_class)
        self.num_steps = num_steps
        self.every = max(1, int(every))
        self.from_buffer = from_buffer
        self.log_dir = log_dir
        self.seed = seed
        self.last_path = None

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        from keras_jem.metrics import images as image_lib

        model = self.model
        labels = np.repeat(np.arange(model.num_classes), self.num_per_class)
        samples = model.sample(
            y=labels, num_steps=self.num_steps, from_buffer=self.from_buffer,
            seed=self.seed + epoch,
        )
        samples = keras.ops.convert_to_numpy(samples)
        os.makedirs(self.directory, exist_ok=True)
        self.last_path = os.path.join(self.directory, f"epoch_{epoch + 1:03d}.png")
        image_lib.save_image_grid(samples, self.last_path, num_cols=self.num_per_class)
        if self.log_dir:
            import tensorflow as tf

            writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "samples"))
            with writer.as_default():
                tf.summary.image(
                    "samples", (samples[: 3 * self.num_per_class] + 1.0) / 2.0, step=epoch + 1,
                    max_outputs=3 * self.num_per_class,
                )
            writer.flush()
