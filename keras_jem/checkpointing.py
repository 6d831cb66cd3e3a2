"""Fault-tolerant training: step-level backups that resume at the saved epoch *and* step.

`keras.callbacks.BackupAndRestore` restores the epoch only (a run killed mid-epoch repeats the
epoch from its first step), writes its files in place (a kill while writing leaves a corrupt
backup) and does not save the state of `keras.random.SeedGenerator`s, so a resumed JEM run would
replay the sampler noise of its first steps. `StepBackup` keeps everything a JEM run needs:

- the model weights, the replay buffer, the optimizer state (one `.weights.h5` file);
- the random state: every `SeedGenerator` of the model (the sampler's seed counter, dropout);
- the position: epoch, step within the epoch and global step (the data stream is resumed by
  skipping that many batches), plus the variable layout, to refuse an incompatible checkpoint
  before training starts.

Files are written to a temporary name and renamed, then `training_metadata.json` (the commit
record) is replaced atomically, so a SIGKILL at any moment leaves the previous or the new
checkpoint, never a broken one. The previous checkpoint is kept as a fallback.

`fit_from_backup` resumes with public Keras APIs only: when the backup is mid-epoch it first fits
the remaining steps of that epoch (`initial_epoch=e`, `steps_per_epoch=steps - s`), then the
following epochs.

Example:

>>> backup = keras_jem.checkpointing.StepBackup("run/backup", save_freq=100,
...                                             steps_per_epoch=390)
>>> backup.restore(model)            # no-op on a fresh run; raises if incompatible
>>> keras_jem.checkpointing.fit_from_backup(model, train_ds, backup, epochs=200)
"""

import json
import logging
import os
import time

import keras
import numpy as np

logger = logging.getLogger("keras_jem.checkpointing")

WEIGHTS_FILE = "latest.weights.h5"
METADATA_FILE = "training_metadata.json"
FORMAT_VERSION = 1


class IncompatibleCheckpointError(ValueError):
    """A checkpoint that was written by a different model (or optimizer)."""


def variable_signature(model):
    """`[[name, shape], ...]` of the variables a weights file holds, in order.

    Model weights then optimizer variables. Checkpoints are compared by shapes, in order; the
    names (which may carry per-session unique prefixes such as `jem_1`) only label messages.
    """
    variables = list(model.weights)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        variables += list(optimizer.variables)
    return [[v.name, list(v.shape)] for v in variables]


def seed_generator_states(model):
    """The state variables of every `keras.random.SeedGenerator` of `model`.

    `model.variables` lists the weights and the seed generator states; `save_weights` keeps only
    the former.
    """
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _atomic_write_json(path, payload):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _signature_differences(saved, current, limit=4):
    lines = []
    if len(saved) != len(current):
        lines.append(f"the checkpoint holds {len(saved)} variables, the model {len(current)}")
    for index, (old, new) in enumerate(zip(saved, current)):
        if old[1] != new[1]:
            lines.append(f"variable {index} is {old[0]} {tuple(old[1])} in the checkpoint, "
                         f"{new[0]} {tuple(new[1])} in the model")
    more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


class StepBackup(keras.callbacks.Callback):
    """Backs up the whole training state every `save_freq` steps and at every epoch end.

    Use the same instance for `restore` (before `fit`) and as a callback; `fit_from_backup` does
    both. In a multi-worker run every worker keeps its own backup (the chief in `backup_dir`,
    worker i in `backup_dir/worker_i`), and `restore` on all workers picks the newest step they
    all hold.

    Args:
        backup_dir: directory of the backup (created on the first save).
        save_freq: `"epoch"` or a number of steps between saves (a save also happens at every
            epoch end).
        steps_per_epoch: steps of one epoch; converts the global step to `(epoch, step)`.
        guard: optional `keras_jem.callbacks.DivergenceGuard`: nothing is saved once it has
            seen a divergence, so the backup stays at the last good state.
        keep: number of checkpoints kept (>= 1; 2 keeps a fallback for a damaged file).
        worker_index: index of this worker (default: from `TF_CONFIG`); workers other than the
            chief (0) write to `backup_dir/worker_<i>`.

    Attributes:
        global_step: steps trained so far (restored, then counted).
        epoch, step: the position `divmod(global_step, steps_per_epoch)`.
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
        self.root_dir = backup_dir
        self.backup_dir = (backup_dir if self.worker_index == 0
                           else os.path.join(backup_dir, f"worker_{self.worker_index}"))
        self.save_freq = save_freq
        self.steps_per_epoch = steps_per_epoch
        self.guard = guard
        self.keep = int(keep)
        self.global_step = 0
        self.last_saved_step = None
        self._epoch_start_step = 0
        self._since_save = 0

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
        """The metadata of the latest checkpoint, or None when there is none."""
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

    def exists(self):
        return self.read_metadata() is not None

    def save(self, model=None):
        """Writes a checkpoint of `model` (default: the callback's model) at `global_step`."""
        model = model or self.model
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"ckpt-{self.global_step:09d}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        tmp = os.path.join(self.backup_dir, f"tmp-{self.global_step:09d}.weights.h5")
        start = time.time()
        model.save_weights(tmp, overwrite=True)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        optimizer = getattr(model, "optimizer", None)
        from keras_jem import distribute

        entry = {
            "weights": name,
            "global_step": self.global_step,
            "optimizer_iterations": (int(keras.ops.convert_to_numpy(optimizer.iterations))
                                     if optimizer is not None else None),
            # keras.random.SeedGenerator states: save_weights does not hold them.
            "seed_states": [np.asarray(keras.ops.convert_to_numpy(v)).tolist()
                            for v in seed_generator_states(model)],
        }
        previous = self.read_metadata()
        kept = [entry]
        if previous is not None:
            kept += [c for c in previous.get("checkpoints", [])
                     if c["weights"] != name][: self.keep - 1]
        metadata = {
            "format": FORMAT_VERSION,
            # `epoch`/`batch` as keras.callbacks.BackupAndRestore writes them.
            "epoch": self.epoch,
            "batch": self.step,
            "step": self.step,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "weights": name,
            "optimizer_iterations": entry["optimizer_iterations"],
            "checkpoints": kept,
            "num_replicas": distribute.num_replicas(),
            "model_class": model.__class__.__name__,
            "signature": variable_signature(model),
            "time": time.time(),
        }
        _atomic_write_json(self.metadata_path, metadata)
        # Convenience copy under the name keras.callbacks.BackupAndRestore uses.
        latest = os.path.join(self.backup_dir, WEIGHTS_FILE)
        try:
            os.link(path, latest + ".tmp")
        except OSError:
            import shutil

            shutil.copyfile(path, latest + ".tmp")
        os.replace(latest + ".tmp", latest)
        for stale in os.listdir(self.backup_dir):
            if stale.startswith(("ckpt-", "tmp-")) and stale not in {
                c["weights"] for c in kept
            }:
                try:
                    os.remove(os.path.join(self.backup_dir, stale))
                except OSError:
                    pass
        self.last_saved_step = self.global_step
        self._since_save = 0
        logger.info("backup at step %d (epoch %d, step %d) in %.1f s", self.global_step,
                    self.epoch, self.step, time.time() - start)
        return path

    def restore(self, model, global_step=None):
        """Loads the latest checkpoint (or the one at `global_step`) into a built `model`.

        Returns:
            The checkpoint's metadata, or None when there is no checkpoint (then nothing
            changes).

        Raises:
            IncompatibleCheckpointError: when the checkpoint was written by a model or optimizer
                with other variables; nothing is loaded then.
        """
        metadata = self.read_metadata()
        if metadata is None:
            return None
        if not model.built:
            raise ValueError("Build the model (and its optimizer) before restoring a backup.")
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            optimizer.build(model.trainable_variables)
        checkpoints = metadata.get("checkpoints") or [
            {"weights": metadata["weights"], "global_step": metadata["global_step"],
             "seed_states": metadata.get("seed_states", [])}]
        if global_step is None:
            global_step = checkpoints[0]["global_step"]
        matching = [c for c in checkpoints if c["global_step"] == int(global_step)]
        if not matching:
            raise IncompatibleCheckpointError(
                f"The backup in {self.backup_dir} holds no checkpoint at step {global_step} "
                f"(it holds steps {', '.join(str(c['global_step']) for c in checkpoints)})."
            )
        entry = matching[0]
        saved = metadata.get("signature")
        current = variable_signature(model)
        if saved is not None and [s for _, s in saved] != [s for _, s in current]:
            raise IncompatibleCheckpointError(
                f"The backup in {self.backup_dir} was written by a different model or optimizer "
                f"({metadata.get('model_class')}): {_signature_differences(saved, current)}. "
                "Restore it into the model it was written by, or start this configuration in "
                "another directory (or delete the backup)."
            )
        path = os.path.join(self.backup_dir, entry["weights"])
        try:
            model.load_weights(path)
        except (OSError, ValueError) as error:
            older = [c for c in checkpoints if c["global_step"] < entry["global_step"]]
            if isinstance(error, ValueError) or not older:
                raise IncompatibleCheckpointError(
                    f"Could not restore {path}: {error}. Use another --model_dir or delete "
                    f"{self.backup_dir}."
                ) from error
            logger.warning("checkpoint %s is unreadable (%s); falling back to step %d", path,
                           error, older[0]["global_step"])
            return self.restore(model, global_step=older[0]["global_step"])
        states = seed_generator_states(model)
        saved_states = entry.get("seed_states") or []
        if len(saved_states) == len(states):
            for variable, value in zip(states, saved_states):
                variable.assign(np.asarray(value, dtype=variable.dtype))
        elif saved_states:
            logger.warning("the backup holds %d random-seed states, the model %d: seeds are "
                           "not restored", len(saved_states), len(states))
        metadata = dict(metadata, global_step=entry["global_step"], weights=entry["weights"])
        self.global_step = int(metadata["global_step"])
        self.last_saved_step = self.global_step
        metadata.update(epoch=self.epoch, step=self.step, batch=self.step)
        if metadata.get("steps_per_epoch") and self.steps_per_epoch and (
            metadata["steps_per_epoch"] != self.steps_per_epoch
        ):
            logger.warning("the backup was written with %d steps per epoch, this run uses %d: "
                           "global step %d is now epoch %d, step %d",
                           metadata["steps_per_epoch"], self.steps_per_epoch, self.global_step,
                           self.epoch, self.step)
        from keras_jem import distribute

        replicas = distribute.num_replicas()
        if metadata.get("num_replicas") and metadata["num_replicas"] != replicas:
            logger.warning("the backup was written with %d replicas and is restored onto %d: "
                           "the replay buffer is re-split into %d shards",
                           metadata["num_replicas"], replicas, replicas)
        return metadata

    def restore_on_all_workers(self, model, strategy):
        """`restore` for a multi-worker run: every worker loads the newest step all hold.

        Workers save at the same steps, but a worker killed while saving may be one checkpoint
        behind the others; they then all go back to the newest common one.
        """
        from keras_jem import distribute

        if not distribute.is_multi_worker(strategy):
            return self.restore(model)
        metadata = self.read_metadata()
        held = [c["global_step"] for c in (metadata or {}).get("checkpoints", [])]
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

    # === Callback ===

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start_step = self.global_step

    def on_train_batch_end(self, batch, logs=None):
        self.global_step = self._epoch_start_step + batch + 1
        if self.save_freq == "epoch" or self._blocked():
            return
        self._since_save += 1
        if self._since_save >= self.save_freq and self.global_step != self.last_saved_step:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if not self._blocked() and self.global_step != self.last_saved_step:
            self.save()


def fit_from_backup(model, dataset, backup, epochs, callbacks=(), **kwargs):
    """Runs `model.fit` from the backup's position up to `epochs`; returns the `History`s.

    A backup mid-epoch `e` at step `s` is continued by one `fit` over the remaining
    `steps_per_epoch - s` steps of epoch `e` (`initial_epoch=e`), then one over the following
    epochs. The data stream is resumed by skipping the `global_step` batches already trained on
    (`dataset` must be an infinite, deterministic `tf.data.Dataset`, as
    `keras_jem.data.make_train_dataset` makes). Stops early when a callback stops training.

    Args:
        model: a compiled model whose state matches `backup` (call `backup.restore(model)`).
        dataset: the training dataset (global batches).
        backup: the run's `StepBackup` (its `steps_per_epoch` is required); it is added to the
            callbacks unless already there.
        epochs: total number of epochs of the run.
        callbacks: other callbacks.
        **kwargs: other `fit` arguments (`validation_data`, `verbose`, ...).
    """
    steps = backup.steps_per_epoch
    if not steps:
        raise ValueError("`fit_from_backup` needs a backup with `steps_per_epoch`.")
    callbacks = list(callbacks)
    if backup not in callbacks:
        callbacks.append(backup)
    histories = []
    model.stop_training = False
    while backup.epoch < epochs:
        epoch, step = backup.epoch, backup.step
        data = dataset.skip(backup.global_step) if backup.global_step else dataset
        if step:
            logger.info("resuming epoch %d at step %d", epoch + 1, step + 1)
        history = model.fit(
            data, initial_epoch=epoch, epochs=epoch + 1 if step else epochs,
            steps_per_epoch=steps - step, callbacks=callbacks, **kwargs,
        )
        histories.append(history)
        if model.stop_training or backup.global_step == (epoch * steps + step):
            break
    return histories
