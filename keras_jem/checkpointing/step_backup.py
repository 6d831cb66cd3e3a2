"""`StepBackup`: step-level TensorFlow checkpoints of a JEM run (see `keras_jem.checkpointing`)."""

import json
import logging
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf

from keras_jem.checkpointing.variables import IncompatibleCheckpointError
from keras_jem.checkpointing.variables import model_weights
from keras_jem.checkpointing.variables import non_finite_variables
from keras_jem.checkpointing.variables import optimizer_variables
from keras_jem.checkpointing.variables import seed_generator_states
from keras_jem.checkpointing.variables import signature_differences
from keras_jem.checkpointing.variables import variable_signature

logger = logging.getLogger("keras_jem.checkpointing")

METADATA_FILE = "training_metadata.json"
CHECKPOINT_NAME = "ckpt"
FORMAT_VERSION = 2
_RUN_STATE_KEY = "run/.ATTRIBUTES/py_state"
# What TensorFlow's checkpoint reader raises on a truncated or damaged file: an OpError
# (DataLossError, NotFoundError...), or IndexError/ValueError from its Python wrapper.
_READ_ERRORS = (tf.errors.OpError, IndexError, ValueError)


def _atomic_write_json(path, payload):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _RunState(tf.train.experimental.PythonState):
    """The run's position and counters as JSON, saved inside the checkpoint with the variables.

    A `PythonState` rather than `tf.Variable`s: creating variables under a
    `MultiWorkerMirroredStrategy` scope is a collective operation, a string is not.
    """

    def __init__(self):
        self.values = {}

    def serialize(self):
        return json.dumps(self.values)

    def deserialize(self, string_value):
        self.values = json.loads(string_value)


class StepBackup(keras.callbacks.Callback):
    """Backs up the whole training state every `save_freq` steps and at every epoch end.

    Use the same instance for `restore` (before `fit`) and as a callback; `fit_from_backup` does
    both. In a multi-worker run every worker keeps its own backup (the chief in `backup_dir`,
    worker i in `backup_dir/worker_i`), and `restore_on_all_workers` picks the newest step they
    all hold. A state with a NaN or an infinity in any weight, buffer or optimizer variable is
    never saved: the backup stays at the last good state and the attached `guard` (if any)
    records a divergence, so the driver rolls back.

    Args:
        backup_dir: directory of the backup (created on the first save).
        save_freq: `"epoch"` or a number of steps between saves (a save also happens at every
            epoch end).
        steps_per_epoch: steps of one epoch; converts the global step to `(epoch, step)`.
        guard: optional `keras_jem.callbacks.DivergenceGuard`: nothing is saved once it has
            seen a divergence, so the backup stays at the last good state.
        keep: number of checkpoints kept (>= 1; 2 keeps a fallback for a damaged file), the
            `max_to_keep` of the `tf.train.CheckpointManager`.
        worker_index: index of this worker (default: from `TF_CONFIG`); workers other than the
            chief (0) write to `backup_dir/worker_<i>`.

    Attributes:
        global_step: steps trained so far (restored, then counted).
        epoch, step: the position `divmod(global_step, steps_per_epoch)`.
        rollbacks: divergences rolled back so far in this run (restored with the backup).
        seed: the seed the last rollback continued with (None before any rollback).

    Example:

    >>> backup = StepBackup("run/backup", save_freq=100, steps_per_epoch=390)
    >>> backup.restore(model)
    >>> fit_from_backup(model, train_ds, backup, epochs=200)
    """

    def __init__(self, backup_dir, save_freq="epoch", steps_per_epoch=None, guard=None, keep=2,
                 worker_index=None):
        super().__init__()
        if save_freq != "epoch" and (int(save_freq) != save_freq or save_freq < 1):
            raise ValueError(f"`save_freq` must be 'epoch' or a positive number of steps. "
                             f"Received: save_freq={save_freq!r}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"`steps_per_epoch` must be positive. Received: {steps_per_epoch}")
        if keep < 1:
            raise ValueError(f"`keep` must be at least 1. Received: keep={keep}")
        if worker_index is None:
            from keras_jem import distribute

            worker_index = distribute.worker_info()[0]
        self.worker_index = int(worker_index)
        # Absolute: TensorFlow's checkpoint state records a relative directory's checkpoints
        # relative to the working directory, not to the directory (the README's first command
        # uses `--model_dir runs/jem`).
        backup_dir = os.path.abspath(os.path.expanduser(backup_dir))
        self.root_dir = backup_dir
        self.backup_dir = (backup_dir if self.worker_index == 0
                           else os.path.join(backup_dir, f"worker_{self.worker_index}"))
        self.save_freq = save_freq
        self.steps_per_epoch = steps_per_epoch
        self.guard = guard
        self.keep = int(keep)
        self.global_step = 0
        self.rollbacks = 0
        self.seed = None
        self.last_saved_step = None
        self.refused_at = None
        self._epoch_start_step = 0
        self._since_save = 0
        self._tracked = None  # (variable ids, tf.train.Checkpoint, run state, manager)

    # === Position ===

    @property
    def epoch(self):
        return self.global_step // self.steps_per_epoch if self.steps_per_epoch else 0

    @property
    def step(self):
        return self.global_step % self.steps_per_epoch if self.steps_per_epoch else 0

    def _blocked(self):
        return self.guard is not None and self.guard.diverged

    # === Files ===

    @property
    def metadata_path(self):
        return os.path.join(self.backup_dir, METADATA_FILE)

    def read_metadata(self):
        """The contents of `training_metadata.json` (the newest checkpoint), or None."""
        try:
            with open(self.metadata_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as error:
            raise IncompatibleCheckpointError(
                f"The backup metadata {self.metadata_path} is not valid JSON ({error}). Delete "
                f"{self.backup_dir} to start over."
            ) from error

    def checkpoint_paths(self):
        """Prefixes of the checkpoints the manager keeps, newest first."""
        state = tf.train.get_checkpoint_state(self.backup_dir)
        if state is None:
            return []
        paths = [p if os.path.isabs(p) else os.path.join(self.backup_dir, p)
                 for p in state.all_model_checkpoint_paths]
        return paths[::-1]

    def checkpoints(self):
        """What each kept checkpoint holds, newest first: its run state plus `path`.

        Read from the checkpoints themselves (their index and run-state string, not the
        variables). A checkpoint whose index cannot be read is left out with a warning.
        """
        entries = []
        for path in self.checkpoint_paths():
            try:
                reader = tf.train.load_checkpoint(path)
                values = json.loads(reader.get_tensor(_RUN_STATE_KEY))
            except _READ_ERRORS as error:
                logger.warning("checkpoint %s is unreadable (%s); it is skipped", path, error)
                continue
            entries.append(dict(values, path=path, weights=os.path.basename(path)))
        return entries

    def exists(self):
        return bool(self.checkpoint_paths())

    def _checkpoint(self, model):
        """The `tf.train.Checkpoint` over `model`'s variables (rebuilt when they change)."""
        weights, seeds = model_weights(model), seed_generator_states(model)
        optimizer = optimizer_variables(model)
        key = tuple(id(v) for v in weights + seeds + optimizer)
        if self._tracked is None or self._tracked[0] != key:
            run = _RunState()
            checkpoint = tf.train.Checkpoint(weights=weights, seed_states=seeds,
                                             optimizer=optimizer, run=run)
            manager = tf.train.CheckpointManager(checkpoint, self.backup_dir,
                                                 max_to_keep=self.keep,
                                                 checkpoint_name=CHECKPOINT_NAME)
            self._tracked = (key, checkpoint, run, manager)
        return self._tracked[1:]

    def save(self, model=None):
        """Writes a checkpoint of `model` (default: the callback's model) at `global_step`.

        Returns:
            The checkpoint's path prefix, or None when the state holds a NaN or an infinity
            (then nothing is written and the previous checkpoint stays the newest).
        """
        model = model or self.model
        bad = non_finite_variables(model_weights(model) + optimizer_variables(model))
        if bad:
            self.refused_at = self.global_step
            logger.warning(
                "not backing up step %d: %d variable(s) hold NaN or infinity (%s); the backup "
                "stays at step %s", self.global_step, len(bad), ", ".join(bad[:3]),
                self.last_saved_step)
            return None
        start = time.time()
        _, run, manager = self._checkpoint(model)
        from keras_jem import distribute

        run.values = {
            "format": FORMAT_VERSION,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "rollbacks": self.rollbacks,
            "seed": self.seed,
            "num_replicas": distribute.num_replicas(),
            "model_class": model.__class__.__name__,
            "signature": variable_signature(model),
        }
        numbers = [int(m.group(1)) for m in (re.search(r"-(\d+)$", p)
                                             for p in manager.checkpoints) if m]
        path = manager.save(checkpoint_number=max(numbers, default=0) + 1)
        self.last_saved_step = self.global_step
        self._since_save = 0
        self._write_metadata(model, path)
        logger.info("backup at step %d (epoch %d, step %d) in %.1f s", self.global_step,
                    self.epoch, self.step, time.time() - start)
        return path

    def _write_metadata(self, model, path):
        optimizer = getattr(model, "optimizer", None)
        kept = []
        for entry in self.checkpoints():
            reader = tf.train.load_checkpoint(entry["path"])
            seeds = sorted(k for k in reader.get_variable_to_shape_map()
                           if k.startswith("seed_states/"))
            kept.append({"weights": entry["weights"], "global_step": entry["global_step"],
                         "seed_states": [reader.get_tensor(k).tolist() for k in seeds]})
        _, run, _ = self._checkpoint(model)
        _atomic_write_json(self.metadata_path, dict(
            run.values,
            # `epoch`/`batch` as keras.callbacks.BackupAndRestore writes them.
            epoch=self.epoch, batch=self.step, step=self.step,
            weights=os.path.basename(path),
            optimizer_iterations=(int(keras.ops.convert_to_numpy(optimizer.iterations))
                                  if optimizer is not None else None),
            checkpoints=kept, time=time.time(),
        ))

    def restore(self, model, global_step=None):
        """Loads the newest checkpoint (or the newest at `global_step`) into a built `model`.

        Falls back to an older checkpoint when the newest is damaged.

        Returns:
            The restored checkpoint's metadata, or None when there is no checkpoint (then
            nothing changes).

        Raises:
            IncompatibleCheckpointError: when the checkpoint was written by a model or optimizer
                with other variables (nothing is loaded then), or no kept checkpoint is
                readable.
        """
        entries = self.checkpoints()
        if not entries:
            metadata = self.read_metadata()
            if metadata is not None and metadata.get("format", 1) < FORMAT_VERSION:
                raise IncompatibleCheckpointError(
                    f"The backup in {self.backup_dir} was written by an older keras-jem "
                    "(Keras .weights.h5 files, format 1) and cannot be resumed by this one. "
                    f"Load its weights with model.load_weights, or delete {self.backup_dir}.")
            if self.checkpoint_paths():
                raise IncompatibleCheckpointError(
                    f"No checkpoint in {self.backup_dir} is readable. Delete it to start over.")
            return None
        if not model.built:
            raise ValueError("Build the model (and its optimizer) before restoring a backup.")
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)
        if global_step is not None:
            matching = [e for e in entries if e["global_step"] == int(global_step)]
            if not matching:
                raise IncompatibleCheckpointError(
                    f"The backup in {self.backup_dir} holds no checkpoint at step {global_step} "
                    f"(it holds steps {', '.join(str(e['global_step']) for e in entries)}).")
            entries = matching + [e for e in entries if e["global_step"] < int(global_step)]
        current = variable_signature(model)
        for index, entry in enumerate(entries):
            saved = entry["signature"]
            if [s for _, s in saved] != [s for _, s in current]:
                raise IncompatibleCheckpointError(
                    f"The backup in {self.backup_dir} was written by a different model or "
                    f"optimizer ({entry.get('model_class')}): "
                    f"{signature_differences(saved, current)}. Restore it into the model it "
                    "was written by, or start this configuration in another directory (or "
                    "delete the backup).")
            checkpoint = self._checkpoint(model)[0]
            try:
                # Every model variable must be loaded; values only the checkpoint holds (the
                # manager's save_counter) are expected to stay unread.
                checkpoint.read(entry["path"]).assert_existing_objects_matched().expect_partial()
                break
            except (*_READ_ERRORS, AssertionError) as error:
                if index + 1 == len(entries):
                    raise IncompatibleCheckpointError(
                        f"Could not restore {entry['path']}: {error}. Use another --model_dir "
                        f"or delete {self.backup_dir}.") from error
                logger.warning("checkpoint %s is unreadable (%s); falling back to step %d",
                               entry["path"], error, entries[index + 1]["global_step"])
        self.global_step = int(entry["global_step"])
        self.rollbacks = int(entry.get("rollbacks", 0))
        self.seed = entry.get("seed")
        self.last_saved_step = self.global_step
        metadata = dict(entry, epoch=self.epoch, step=self.step, batch=self.step)
        if entry.get("steps_per_epoch") and self.steps_per_epoch and (
            entry["steps_per_epoch"] != self.steps_per_epoch
        ):
            logger.warning("the backup was written with %d steps per epoch, this run uses %d: "
                           "global step %d is now epoch %d, step %d",
                           entry["steps_per_epoch"], self.steps_per_epoch, self.global_step,
                           self.epoch, self.step)
        from keras_jem import distribute

        replicas = distribute.num_replicas()
        if entry.get("num_replicas") and entry["num_replicas"] != replicas:
            logger.warning("the backup was written with %d replicas and is restored onto %d: "
                           "the replay buffer is re-split into %d shards",
                           entry["num_replicas"], replicas, replicas)
        return metadata

    def restore_on_all_workers(self, model, strategy):
        """`restore` for a multi-worker run: every worker loads the newest step all hold.

        Workers save at the same steps, but a worker killed while saving may be one checkpoint
        behind the others; they then all go back to the newest common one.
        """
        from keras_jem import distribute

        if not distribute.is_multi_worker(strategy):
            return self.restore(model)
        held = [e["global_step"] for e in self.checkpoints()]
        held = (held + [-1] * self.keep)[: self.keep]
        gathered = distribute.gather_from_replicas(strategy, held)
        per_replica = [set(gathered[i:i + self.keep]) - {-1}
                       for i in range(0, len(gathered), self.keep)]
        if not any(per_replica):
            return None
        common = set.intersection(*per_replica)
        if not common:
            raise IncompatibleCheckpointError(
                "The workers hold no common checkpoint (steps per replica: "
                f"{[sorted(s) for s in per_replica]}): restart every worker from scratch with a "
                "new --model_dir, or copy the chief's backup to the other workers."
            )
        return self.restore(model, global_step=max(common))

    def rollback(self, model, seed, strategy=None):
        """Rolls a diverged run back to the last checkpoint and continues it with `seed`.

        Restores the newest checkpoint (on every worker, the newest step all hold), sets the
        model's random state to the new seed (`SeedGenerator` i gets `[seed + i, 0]`), counts
        the rollback and saves at once, so a run killed right after still continues with the
        new seed and the right rollback count instead of replaying the seed that diverged.

        Returns:
            The metadata of the checkpoint rolled back to.
        """
        restored = (self.restore_on_all_workers(model, strategy) if strategy is not None
                    else self.restore(model))
        if restored is None:
            raise IncompatibleCheckpointError(
                f"Cannot roll back: the backup in {self.backup_dir} holds no checkpoint.")
        for index, state in enumerate(seed_generator_states(model)):
            state.assign(np.array([int(seed) + index, 0], dtype=state.dtype))
        self.rollbacks += 1
        self.seed = int(seed)
        self.save(model)
        return restored

    # === Callback ===

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start_step = self.global_step

    def _save_from_callback(self, epoch):
        if self.save() is None and self.guard is not None and not self.guard.diverged:
            # A non-finite state the guard has not seen (e.g. in an optimizer slot or the
            # buffer): report it as a divergence and stop, so the driver rolls back.
            batch = (self.global_step - self._epoch_start_step) - 1
            self.guard.diverged_at = (epoch, batch, {"non_finite_state": 1.0})
            self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        self.global_step = self._epoch_start_step + batch + 1
        if self.save_freq == "epoch" or self._blocked():
            return
        self._since_save += 1
        if self._since_save >= self.save_freq and self.global_step != self.last_saved_step:
            self._save_from_callback(self.epoch)

    def on_epoch_end(self, epoch, logs=None):
        if not self._blocked() and self.global_step != self.last_saved_step:
            self._save_from_callback(epoch)
