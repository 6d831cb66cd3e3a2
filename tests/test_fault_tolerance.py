"""Step-level backups: resume at the saved epoch and step, survive SIGKILL, refuse bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_jem import checkpointing
from tests import testing
from trainers import fit

REPO = testing.REPO


def tiny_model(buffer_size=64, **kwargs):
    model = testing.make_model(buffer_size=buffer_size, sampler=testing.tiny_sgld(num_steps=1),
                               **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    return model


def tiny_dataset(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (64,) + testing.DIGITS_SHAPE).astype("float32")
    y = rng.integers(0, 10, 64)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True).repeat()


def state(model):
    return {
        "weights": [testing.to_numpy(v).copy() for v in model.weights],
        "optimizer": [testing.to_numpy(v).copy() for v in model.optimizer.variables],
        "seed": testing.to_numpy(model.seed_generator.state).tolist(),
    }


def assert_same_state(a, b):
    for x, y in zip(a["weights"] + a["optimizer"], b["weights"] + b["optimizer"]):
        np.testing.assert_array_equal(x, y)
    assert a["seed"] == b["seed"]


class Positions(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_begin(self, batch, logs=None):
        self.seen.append((self._epoch, batch))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


class TestStepBackup(testing.TestCase):
    def assertRestores(self, root, model, expected_state, step):
        """A new `StepBackup` of `root` restores `expected_state` into `model`, at `step`.

        Returns:
            The restoring `StepBackup`.
        """
        backup = checkpointing.StepBackup(root, steps_per_epoch=4)
        backup.restore(model)
        self.assertEqual(backup.global_step, step)
        assert_same_state(state(model), expected_state)
        return backup

    def saved_at_step(self, step):
        """A tiny model and a backup holding one checkpoint of it at `step`."""
        root = self.get_temp_dir()
        model = tiny_model()
        backup = checkpointing.StepBackup(root, steps_per_epoch=4)
        backup.global_step = step
        backup.save(model)
        return root, model, backup

    def test_mid_epoch_backup_resumes_at_epoch_and_step(self):
        root = self.get_temp_dir()
        model = tiny_model()
        backup = checkpointing.StepBackup(root, save_freq=3, steps_per_epoch=5)
        probe = Positions()

        class Stop(keras.callbacks.Callback):  # "killed" right after the step-8 backup
            def on_train_batch_end(self, batch, logs=None):
                if backup.global_step == 8:
                    self.model.stop_training = True

        checkpointing.fit_from_backup(model, tiny_dataset(), backup, epochs=3,
                                      callbacks=[probe, backup, Stop()], verbose=0)
        saved = state(model)
        metadata = backup.read_metadata()
        self.assertEqual((metadata["epoch"], metadata["step"], metadata["global_step"]),
                         (1, 3, 8))  # saves at 3, 5 (epoch end), 8
        self.assertEqual(metadata["optimizer_iterations"], 8)
        self.assertEqual(len(metadata["checkpoints"]), 2)

        keras.backend.clear_session()
        resumed = tiny_model()
        self.assertFalse(all(np.array_equal(a, b)
                             for a, b in zip(state(resumed)["weights"], saved["weights"])))
        backup = checkpointing.StepBackup(root, save_freq=3, steps_per_epoch=5)
        backup.restore(resumed)
        assert_same_state(state(resumed), saved)
        self.assertEqual((backup.epoch, backup.step), (1, 3))

        probe = Positions()
        histories = checkpointing.fit_from_backup(resumed, tiny_dataset(), backup, epochs=3,
                                                  callbacks=[probe], verbose=0)
        # The rest of epoch 1 (steps 3, 4), then epoch 2: nothing repeated, nothing skipped.
        self.assertEqual(probe.seen, [(1, 0), (1, 1)] + [(2, b) for b in range(5)])
        self.assertEqual(len(histories), 2)
        self.assertEqual(int(testing.to_numpy(resumed.optimizer.iterations)), 15)
        self.assertEqual(backup.read_metadata()["global_step"], 15)

    def test_seed_state_is_part_of_the_backup(self):
        # keras' save_weights does not hold SeedGenerator states; the backup does.
        model = tiny_model()
        model.seed_generator.state.assign(np.array([7, 123], "int64"))
        backup = checkpointing.StepBackup(self.get_temp_dir(), steps_per_epoch=4)
        backup.save(model)
        model.seed_generator.state.assign(np.array([7, 0], "int64"))
        backup.restore(model)
        self.assertEqual(testing.to_numpy(model.seed_generator.state).tolist(), [7, 123])

    def test_checkpoint_holds_every_variable_and_restores_it_exactly(self):
        # tf.train.Checkpoint(model=model) would miss the backbone's layers (kept in a list)
        # and the SeedGenerator; the backup's checkpoint holds every weight, seed state and
        # optimizer variable, each restored bit for bit.
        model = tiny_model()
        model.fit(tiny_dataset(), steps_per_epoch=2, epochs=1, verbose=0)
        model.seed_generator.state.assign(np.array([5, 17], "int64"))
        saved = state(model)
        backup = checkpointing.StepBackup(self.get_temp_dir(), steps_per_epoch=4)
        backup.global_step = 2
        path = backup.save(model)
        keys = tf.train.load_checkpoint(path).get_variable_to_shape_map()
        expected = len(model.weights) + 1 + len(model.optimizer.variables)
        self.assertLen([k for k in keys if k.endswith("VARIABLE_VALUE")
                        and not k.startswith("save_counter")], expected)
        keras.backend.clear_session()
        fresh = tiny_model()
        self.assertFalse(all(np.array_equal(a, b) for a, b in
                             zip(state(fresh)["weights"], saved["weights"])))
        checkpointing.StepBackup(self.get_temp_dir(), steps_per_epoch=4).restore(fresh)
        assert_same_state(state(fresh), saved)
        self.assertLen(state(fresh)["weights"], len(saved["weights"]))
        self.assertEqual(int(testing.to_numpy(fresh.optimizer.iterations)), 2)

    def test_interrupted_save_keeps_the_previous_checkpoint(self):
        root, model, backup = self.saved_at_step(4)
        good = state(model)
        # A kill while writing the next checkpoint: partial files, and the manager's
        # `checkpoint` state file still names the previous one.
        for name in ("ckpt-2.index", "ckpt-2.data-00000-of-00001"):
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"partial")
        os.makedirs(os.path.join(root, "ckpt-2_temp"))
        model.buffer.images.assign(np.zeros(model.buffer.images.shape, "float32"))
        backup = self.assertRestores(root, model, good, step=4)
        # The next save writes over the leftovers.
        backup.global_step = 6
        backup.save(model)
        self.assertEqual([c["global_step"] for c in backup.checkpoints()], [6, 4])
        checkpointing.StepBackup(root, steps_per_epoch=4).restore(model)
        assert_same_state(state(model), good)

    def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(self):
        root, model, backup = self.saved_at_step(4)
        first = state(model)
        model.buffer.images.assign(np.zeros(model.buffer.images.shape, "float32"))
        backup.global_step = 8
        latest = backup.save(model)
        with open(latest + ".data-00000-of-00001", "wb") as f:
            f.write(b"garbage")
        self.assertRestores(root, model, first, step=4)

    def test_keep_bounds_the_number_of_checkpoints(self):
        root = self.get_temp_dir()
        model = tiny_model()
        backup = checkpointing.StepBackup(root, steps_per_epoch=4, keep=3)
        for step in range(1, 6):
            backup.global_step = step
            backup.save(model)
        self.assertEqual([c["global_step"] for c in backup.checkpoints()], [5, 4, 3])
        self.assertLen([f for f in os.listdir(root) if f.endswith(".index")], 3)
        metadata = backup.read_metadata()
        self.assertEqual(metadata["global_step"], 5)
        self.assertEqual([c["global_step"] for c in metadata["checkpoints"]], [5, 4, 3])

    def test_relative_backup_dir_keeps_readable_checkpoints(self):
        # `trainers.fit --model_dir runs/jem` (the README's first command) passes a relative
        # directory; TensorFlow records its checkpoints relative to the working directory.
        root = self.get_temp_dir()
        previous = os.getcwd()
        os.chdir(root)
        try:
            model = tiny_model()
            backup = checkpointing.StepBackup(os.path.join("runs", "jem", "backup"),
                                              steps_per_epoch=4)
            for step in (1, 2):
                backup.global_step = step
                backup.save(model)
            self.assertEqual([c["global_step"] for c in backup.checkpoints()], [2, 1])
            restored = tiny_model()
            again = checkpointing.StepBackup(os.path.join("runs", "jem", "backup"),
                                             steps_per_epoch=4)
            self.assertIsNotNone(again.restore(restored))
            self.assertEqual(again.global_step, 2)
            assert_same_state(state(model), state(restored))
        finally:
            os.chdir(previous)

    def test_incompatible_checkpoint_is_refused_before_loading(self):
        root = self.get_temp_dir()
        backup = checkpointing.StepBackup(root, steps_per_epoch=4)
        backup.save(tiny_model(buffer_size=64))
        other = tiny_model(buffer_size=128)
        before = state(other)
        with self.assertRaisesRegex(checkpointing.IncompatibleCheckpointError,
                                    r"different model.*\(64, 8, 8, 1\) in the checkpoint, "
                                    r"images \(128, 8, 8, 1\) in the model"):
            checkpointing.StepBackup(root, steps_per_epoch=4).restore(other)
        assert_same_state(state(other), before)

    def test_backup_of_the_old_h5_format_is_refused_with_instructions(self):
        root = self.get_temp_dir()
        with open(os.path.join(root, "training_metadata.json"), "w") as f:
            json.dump({"format": 1, "global_step": 8, "weights": "ckpt-000000008.weights.h5"}, f)
        model = tiny_model()
        before = state(model)
        with self.assertRaisesRegex(checkpointing.IncompatibleCheckpointError,
                                    "older keras-jem.*model.load_weights"):
            checkpointing.StepBackup(root, steps_per_epoch=4).restore(model)
        assert_same_state(state(model), before)

    def test_non_finite_state_is_never_saved(self):
        # A rollback to NaN weights would diverge again at once and burn every rollback.
        root, model, backup = self.saved_at_step(4)
        good = state(model)
        slot = next(v for v in model.optimizer.variables
                    if tuple(v.shape) == tuple(model.trainable_variables[0].shape))
        for variable, value in ((model.trainable_variables[0], np.nan),
                                (model.buffer.images, np.inf), (slot, -np.inf)):
            before = testing.to_numpy(variable).copy()
            planted = before.copy()
            planted.flat[3] = value
            variable.assign(planted)
            backup.global_step = 6
            self.assertIsNone(backup.save(model), variable.path)
            self.assertEqual(backup.refused_at, 6)
            self.assertEqual([c["global_step"] for c in backup.checkpoints()], [4])
            self.assertEqual(backup.read_metadata()["global_step"], 4)
            variable.assign(before)
        model.trainable_variables[0].assign(np.full(model.trainable_variables[0].shape, np.nan,
                                                    "float32"))
        self.assertRestores(root, model, good, step=4)

    def test_non_finite_state_during_fit_is_reported_as_a_divergence(self):
        # NaN in an optimizer slot after a step whose loss was finite: the guard has seen
        # nothing, the backup refuses to save, reports a divergence and stops training.
        from keras_jem import callbacks

        root = self.get_temp_dir()
        model = tiny_model()
        guard = callbacks.DivergenceGuard()
        backup = checkpointing.StepBackup(root, save_freq=1, steps_per_epoch=4, guard=guard)

        class Poison(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == 2:
                    slot = self.model.optimizer.variables[-1]
                    slot.assign(np.full(slot.shape, np.nan, "float32"))

        checkpointing.fit_from_backup(model, tiny_dataset(), backup, epochs=2, verbose=0,
                                      callbacks=[guard, Poison(), backup])
        self.assertTrue(guard.diverged)
        self.assertEqual(guard.diverged_at[:2], (0, 2))
        self.assertEqual(guard.diverged_at[2], {"non_finite_state": 1.0})
        self.assertEqual(backup.refused_at, 3)
        self.assertEqual(int(testing.to_numpy(model.optimizer.iterations)), 3)
        self.assertEqual([c["global_step"] for c in backup.checkpoints()], [2, 1])

    def test_rollback_seed_and_count_survive_a_restart(self):
        root, model, backup = self.saved_at_step(4)
        good = state(model)
        # The run goes on, then diverges at step 7.
        model.buffer.images.assign(np.zeros(model.buffer.images.shape, "float32"))
        model.seed_generator.state.assign(np.array([1, 99], "int64"))
        backup.global_step = 7
        backup.rollback(model, seed=1001)
        self.assertEqual((backup.global_step, backup.rollbacks, backup.seed), (4, 1, 1001))
        self.assertEqual(testing.to_numpy(model.seed_generator.state).tolist(), [1001, 0])
        good["seed"] = [1001, 0]
        assert_same_state(state(model), good)
        # Killed right after the rollback: a restarted run gets the new seed and the count.
        keras.backend.clear_session()
        fresh = tiny_model()
        restarted = checkpointing.StepBackup(root, steps_per_epoch=4)
        restarted.restore(fresh)
        self.assertEqual((restarted.global_step, restarted.rollbacks, restarted.seed),
                         (4, 1, 1001))
        assert_same_state(state(fresh), good)
        self.assertEqual(restarted.read_metadata()["rollbacks"], 1)

    def test_divergence_guard_blocks_saving(self):
        from keras_jem import callbacks

        root = self.get_temp_dir()
        model = tiny_model(divergence_threshold=1e-9)
        guard = callbacks.DivergenceGuard()
        backup = checkpointing.StepBackup(root, save_freq=1, steps_per_epoch=4, guard=guard)
        checkpointing.fit_from_backup(model, tiny_dataset(), backup, epochs=1,
                                      callbacks=[guard], verbose=0)
        self.assertTrue(guard.diverged)
        self.assertIsNone(backup.read_metadata())


# === The command line ===

TINY = ["--model", "jem", "--epochs", "2", "--steps_per_epoch", "7", "--num_steps", "5",
        "--buffer_size", "200", "--batch_size", "32", "--sample_every", "0", "--verbose", "2",
        "--save_freq", "2", "--jit_compile", "false"]


def cli(args, **kwargs):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=REPO)
    env.pop("TF_CONFIG", None)
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True, **kwargs)


def checkpoint_lists(path):
    """The `weights`, `seed_states` and `optimizer` lists of a backup checkpoint, read by TF."""
    reader = tf.train.load_checkpoint(path)
    lists = {"weights": [], "seed_states": [], "optimizer": []}
    for name, values in lists.items():
        while reader.has_tensor(key := f"{name}/{len(values)}/.ATTRIBUTES/VARIABLE_VALUE"):
            values.append(reader.get_tensor(key))
    return lists


PROBE = textwrap.dedent("""
    import json, sys
    import keras
    import numpy as np
    from trainers import fit

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if getattr(self, "done", False):
                return
            self.done = True
            np.savez(sys.argv[1], *[v.numpy() for v in self.model.weights],
                     *[v.numpy() for v in self.model.optimizer.variables])
            self.first = None

        def on_train_batch_begin(self, batch, logs=None):
            if self.first is None:
                self.first = [self.epoch, batch]
                json.dump({"first": self.first,
                           "iterations": int(self.model.optimizer.iterations.numpy()),
                           "seed": self.model.seed_generator.state.numpy().tolist()},
                          open(sys.argv[1] + ".json", "w"))

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

    probe = Probe()
    fit.EXTRA_CALLBACKS.append(lambda config, model: probe)
    sys.exit(fit.main(sys.argv[2:]))
""")


def test_sigkill_mid_epoch_then_same_command_resumes_at_epoch_and_step(tmp_path):
    model_dir = tmp_path / "run"
    args = ["--model_dir", str(model_dir), *TINY]
    metadata_path = model_dir / "backup" / "training_metadata.json"
    process = cli(["-m", "trainers.fit", *args], stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and process.poll() is None:
            try:
                metadata = json.loads(metadata_path.read_text())
            except (OSError, ValueError):
                metadata = None
            if metadata and metadata["global_step"] > 0 and metadata["step"] > 0:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before a mid-epoch backup:\n" + (
            process.stdout.read()[-3000:])
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    # The newest committed checkpoint, read from the checkpoints (training_metadata.json is
    # written after the commit and may lag it by one checkpoint after a kill).
    killed_at = checkpointing.StepBackup(str(model_dir / "backup"), steps_per_epoch=7,
                                         worker_index=0).checkpoints()[0]
    killed_at.update(zip(("epoch", "step"), divmod(killed_at["global_step"], 7)))
    assert killed_at["step"] > 0, killed_at
    checkpoint = checkpoint_lists(killed_at["path"])

    # The same command again (with a probe callback recording the state fit starts from).
    probe_path = str(tmp_path / "probe.npz")
    resumed = cli(["-c", PROBE, probe_path, *args], stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT)
    try:
        output, _ = resumed.communicate(timeout=400)
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.wait()
    assert resumed.returncode == 0, output[-4000:]
    epoch, step = killed_at["epoch"], killed_at["step"]
    assert (f"resuming from the backup at epoch {epoch + 1}, step {step} of 7 "
            f"(global step {killed_at['global_step']}") in output
    with open(probe_path + ".json") as f:
        probe = json.load(f)
    # Fit starts in the saved epoch at the saved step, from the saved weights, buffer,
    # optimizer state and seeds.
    assert probe["first"] == [epoch, 0]  # first batch of the remaining-steps fit
    assert probe["iterations"] == killed_at["global_step"]
    assert probe["seed"] == checkpoint["seed_states"][0].tolist()
    started = list(np.load(probe_path).values())
    saved = checkpoint["weights"] + checkpoint["optimizer"]
    assert len(started) == len(saved) and len(checkpoint["weights"]) > 10
    for index, (value, expected) in enumerate(zip(started, saved)):
        np.testing.assert_array_equal(value, expected, err_msg=f"variable {index}")
    # ... and finishes: 14 steps in all, none repeated.
    final = json.loads(metadata_path.read_text())
    assert (final["epoch"], final["step"], final["global_step"]) == (2, 0, 14)
    assert final["optimizer_iterations"] == 14
    assert (model_dir / "model.keras").exists()
    lines = (model_dir / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch") and len(lines) >= 3

    # Resume equivalence: the same command never interrupted ends with the same weights,
    # buffer, optimizer state and seeds, so the resumed run trained on the same batches.
    straight_dir = tmp_path / "straight"
    assert fit.main(["--model_dir", str(straight_dir), *TINY]) == 0
    ends = [checkpointing.StepBackup(str(d / "backup"), steps_per_epoch=7,
                                     worker_index=0).checkpoints()[0]
            for d in (model_dir, straight_dir)]
    assert [e["global_step"] for e in ends] == [14, 14]
    resumed_end, straight_end = (checkpoint_lists(e["path"]) for e in ends)
    for name in ("weights", "seed_states", "optimizer"):
        assert len(resumed_end[name]) == len(straight_end[name]) > 0
        for index, (value, expected) in enumerate(zip(resumed_end[name], straight_end[name])):
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} {index}")


def test_backup_of_another_model_stops_before_training(tmp_path, capsys):
    model_dir = str(tmp_path / "run")
    config, _ = fit.resolve_config([
        "--model_dir", model_dir, "--model", "jem", "--epochs", "1", "--steps_per_epoch", "1",
        "--num_steps", "1", "--buffer_size", "200", "--batch_size", "16", "--sample_every",
        "0", "--verbose", "0", "--jit_compile", "false"])
    fit.run(config)
    with open(os.path.join(model_dir, "history.csv")) as f:
        history = f.read()
    code = fit.main(["--model_dir", model_dir, "--model", "jem", "--epochs", "2",
                     "--buffer_size", "300", "--batch_size", "16", "--num_steps", "1",
                     "--sample_every", "0", "--verbose", "0", "--jit_compile", "false"])
    assert code == 2
    error = capsys.readouterr().err
    assert "was written by a different model or optimizer" in error
    assert "(200, 8, 8, 1) in the checkpoint" in error and "(300, 8, 8, 1) in the model" in error
    with open(os.path.join(model_dir, "history.csv")) as f:
        assert f.read() == history


def test_restarted_run_keeps_the_rollback_count_and_does_not_replay_the_seed(tmp_path, capsys):
    # Every step diverges. The first run rolls back once (seed 1001) and gives up; the same
    # command with one more allowed rollback must count on from 1 and use seed 2001: replaying
    # seed 1001 would repeat the run that diverged.
    args = ["--model_dir", str(tmp_path / "run"), *TINY, "--epochs", "1",
            "--divergence_threshold", "1e-6"]
    config, _ = fit.resolve_config([*args, "--max_rollbacks", "1"])
    with pytest.raises(RuntimeError, match="after 1 rollbacks"):
        fit.run(config)
    first = capsys.readouterr().out
    assert "continuing with seed 1001 (rollback 1 of at most 1)" in first
    backup = checkpointing.StepBackup(str(tmp_path / "run" / "backup"), steps_per_epoch=7,
                                      worker_index=0)
    newest = backup.checkpoints()[0]
    assert (newest["rollbacks"], newest["seed"], newest["global_step"]) == (1, 1001, 0)
    assert checkpoint_lists(newest["path"])["seed_states"][0].tolist() == [1001, 0]

    config, _ = fit.resolve_config([*args, "--max_rollbacks", "2"])
    with pytest.raises(RuntimeError, match="after 2 rollbacks"):
        fit.run(config)
    second = capsys.readouterr().out
    assert "continuing with seed 2001 (rollback 2 of at most 2)" in second
    assert "seed 1001" not in second
    newest = backup.checkpoints()[0]
    assert (newest["rollbacks"], newest["seed"]) == (2, 2001)
