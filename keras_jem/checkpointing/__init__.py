"""Fault-tolerant training: step-level backups that resume at the saved epoch *and* step.

`keras.callbacks.BackupAndRestore` restores the epoch only (a run killed mid-epoch repeats the
epoch from its first step) and does not save the state of `keras.random.SeedGenerator`s, so a
resumed JEM run would replay the sampler noise of its first steps. `StepBackup` writes
TensorFlow checkpoints (`tf.train.Checkpoint`, kept and committed by
`tf.train.CheckpointManager`) holding everything a JEM run needs:

- the model weights, the replay buffer and the optimizer state;
- the random state: every `SeedGenerator` of the model (the sampler's seed counter, dropout);
- the position (epoch, step within the epoch, global step: the data stream is resumed by
  skipping that many batches), the rollback count and seed of a diverged run, and the
  variable layout, to refuse an incompatible checkpoint before anything is loaded. These live
  *inside* the checkpoint (a `tf.train.experimental.PythonState`), so they can never disagree
  with the variables they describe.

TensorFlow writes a checkpoint's files under temporary names and the manager then replaces its
`checkpoint` state file atomically, so a SIGKILL at any moment leaves the previous or the new
checkpoint, never a broken one; `keep` checkpoints are kept, the older ones as fallbacks for a
damaged file. Non-finite weights are never saved. `training_metadata.json` mirrors the newest
checkpoint for people and scripts; restoring reads the checkpoints themselves.

Why the checkpoint holds flat variable lists rather than `tf.train.Checkpoint(model=model)`:
with Keras 3 on TF 2.21 the object graph of a model misses every layer kept in a Python list or
dict (Keras' `TrackedList`/`TrackedDict` are not TensorFlow trackables; a `SmallCNN` backbone
lost all 12 of its variables that way) and every `SeedGenerator` (not a trackable either). Keras
variables themselves are trackables, so `model.weights`, the seed-generator states and
`optimizer.variables` are saved as three ordered lists, the same order `model.save_weights`
relies on.

`fit_from_backup` resumes with public Keras APIs only: when the backup is mid-epoch it first fits
the remaining steps of that epoch (`initial_epoch=e`, `steps_per_epoch=steps - s`), then the
following epochs.

Example:

>>> backup = keras_jem.checkpointing.StepBackup("run/backup", save_freq=100,
...                                             steps_per_epoch=390)
>>> backup.restore(model)            # no-op on a fresh run; raises if incompatible
>>> keras_jem.checkpointing.fit_from_backup(model, train_ds, backup, epochs=200)

The package's modules:

- `step_backup`: the `StepBackup` callback (saving, restoring, rolling back).
- `variables`: what a checkpoint holds and how it is checked (`variable_signature`,
  `seed_generator_states`, `non_finite_variables`, `IncompatibleCheckpointError`).
- `resume`: `fit_from_backup`.
"""

from keras_jem.checkpointing.resume import fit_from_backup
from keras_jem.checkpointing.step_backup import CHECKPOINT_NAME
from keras_jem.checkpointing.step_backup import FORMAT_VERSION
from keras_jem.checkpointing.step_backup import METADATA_FILE
from keras_jem.checkpointing.step_backup import StepBackup
from keras_jem.checkpointing.variables import IncompatibleCheckpointError
from keras_jem.checkpointing.variables import non_finite_variables
from keras_jem.checkpointing.variables import seed_generator_states
from keras_jem.checkpointing.variables import variable_signature
