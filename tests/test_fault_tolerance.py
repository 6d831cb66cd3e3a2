"""Step-level backups: resume at the saved epoch and step, survive SIGKILL, refuse bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import keras
import numpy as np
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

    def test_interrupted_save_keeps_the_previous_checkpoint(self):
        root = self.get_temp_dir()
        model = tiny_model()
        backup = checkpointing.StepBackup(root, steps_per_epoch=4)
        backup.global_step = 4
        backup.save(model)
        good = state(model)
        # A kill while writing step 8: a partial temporary file and no new metadata.
        with open(os.path.join(root, "tmp-000000008.weights.h5"), "wb") as f:
            f.write(b"\x89HDF\r\n partial")
        model.buffer.images.assign(np.zeros(model.buffer.images.shape, "float32"))
        backup = checkpointing.StepBackup(root, steps_per_epoch=4)
        backup.restore(model)
        assert_same_state(state(model), good)
        self.assertEqual(backup.global_step, 4)
        # The next save cleans the leftover up.
        backup.global_step = 6
        backup.save(model)
        self.assertNotIn("tmp-000000008.weights.h5", os.listdir(root))

    def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(self):
        root = self.get_temp_dir()
        model = tiny_model()
        backup = checkpointing.StepBackup(root, steps_per_epoch=4)
        backup.global_step = 4
        backup.save(model)
        first = state(model)
        model.buffer.images.assign(np.zeros(model.buffer.images.shape, "float32"))
        backup.global_step = 8
        backup.save(model)
        with open(os.path.join(root, "ckpt-000000008.weights.h5"), "wb") as f:
            f.write(b"garbage")
        backup = checkpointing.StepBackup(root, steps_per_epoch=4)
        backup.restore(model)
        self.assertEqual(backup.global_step, 4)
        assert_same_state(state(model), first)

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


def h5_datasets(path):
    values = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: values.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return values


PROBE = textwrap.dedent("""
    import json, sys
    import keras
    from trainers import fit

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if getattr(self, "done", False):
                return
            self.done = True
            self.model.save_weights(sys.argv[1])
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
    killed_at = json.loads(metadata_path.read_text())
    assert killed_at["step"] > 0, killed_at
    checkpoint = h5_datasets(model_dir / "backup" / killed_at["weights"])

    # The same command again (with a probe callback recording the state fit starts from).
    probe_path = str(tmp_path / "probe.weights.h5")
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
    assert probe["seed"] == killed_at["checkpoints"][0]["seed_states"][0]
    started = h5_datasets(probe_path)
    assert sorted(started) == sorted(checkpoint)
    for name, value in checkpoint.items():
        np.testing.assert_array_equal(started[name], value, err_msg=name)
    # ... and finishes: 14 steps in all, none repeated.
    final = json.loads(metadata_path.read_text())
    assert (final["epoch"], final["step"], final["global_step"]) == (2, 0, 14)
    assert final["optimizer_iterations"] == 14
    assert (model_dir / "model.keras").exists()
    lines = (model_dir / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch") and len(lines) >= 3


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
