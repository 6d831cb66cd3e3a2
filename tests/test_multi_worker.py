"""MultiWorkerMirroredStrategy with Keras 3 `fit`: two worker processes on 127.0.0.1.

Each test starts its workers as subprocesses with a `TF_CONFIG` on free local ports, waits with a
deadline and kills every worker still running when anything fails.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_workers(args, logs, num_workers=2):
    """Starts `python ARGS` once per worker with its TF_CONFIG; returns the processes."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(num_workers)]
    processes = []
    for index in range(num_workers):
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=REPO, TF_CONFIG=json.dumps({
                       "cluster": {"worker": workers},
                       "task": {"type": "worker", "index": index}}))
        with open(logs / f"worker_{index}.log", "w") as log:
            processes.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                                              stdout=log, stderr=subprocess.STDOUT, text=True))
    return processes


def kill_all(processes):
    """Kills and reaps every worker still running."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_all(processes, logs, timeout):
    """Waits for every worker; kills them all and fails with their logs on error or timeout."""
    deadline = time.time() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        kill_all(processes)
    codes = [p.returncode for p in processes]
    if any(codes):
        tails = "\n".join(f"--- worker {i} (exit {c}) ---\n"
                          + (logs / f"worker_{i}.log").read_text()[-3000:]
                          for i, c in enumerate(codes))
        raise AssertionError(f"workers failed or timed out: {codes}\n{tails}")


WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    import keras
    import keras_jem
    from keras_jem import checkpointing, distribute
    from keras_jem.backbones import SmallCNN

    out = sys.argv[1]
    strategy = distribute.create_strategy("multi_worker")
    worker, num_workers, _ = distribute.worker_info(strategy)

    class TagSampler(keras_jem.sampling.Sampler):
        # Keeps each chain's id (pixel 0) and counts its visits (pixel 1).
        def __call__(self, target, x, y=None, seed=None, training=False, num_steps=None):
            flat = tf.reshape(x, (-1, 64))
            return tf.reshape(flat + tf.one_hot(1, 64)[None], tf.shape(x))

    # Constructed outside the scope (keras-team/keras#20585), built and trained inside it.
    with distribute.construction_scope(strategy):
        model = keras_jem.JEM(SmallCNN(filters=(8, 16), feature_dim=32), 10, buffer_size=40,
                              reinit_probability=0.0, sampler=TagSampler(), seed=1)
    with strategy.scope():
        model.build((None, 8, 8, 1))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
        model.optimizer.build(model.trainable_variables)
        tags = np.zeros((40, 64), "float32")
        tags[:, 0] = np.arange(40)
        model.buffer.images.assign(tags.reshape(40, 8, 8, 1))
        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (64, 8, 8, 1)).astype("float32")
        y = rng.integers(0, 10, 64)
        ds = distribute.shard_by_data(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True).repeat())
        backup = checkpointing.StepBackup(os.path.join(out, "backup"), save_freq=2,
                                          steps_per_epoch=3)
        histories = checkpointing.fit_from_backup(model, ds, backup, epochs=2, verbose=0)
        restored = backup.restore_on_all_workers(model, strategy)
    flat = keras.ops.convert_to_numpy(model.buffer.images).reshape(40, -1)
    np.savez(os.path.join(out, f"worker_{worker}.npz"),
             *[keras.ops.convert_to_numpy(w) for w in model.get_weights()])
    json.dump({
        "replicas": strategy.num_replicas_in_sync, "workers": num_workers,
        "loss": [v for h in histories for v in h.history["loss"]],
        "ids": sorted(int(round(v)) for v in flat[:, 0]),
        "visits": int(round(float(flat[:, 1].sum()))),
        "restored_step": restored["global_step"],
        "seed": keras.ops.convert_to_numpy(model.seed_generator.state).tolist(),
    }, open(os.path.join(out, f"worker_{worker}.json"), "w"))
""")


def test_two_workers_train_to_identical_weights(tmp_path):
    processes = start_workers(["-c", WORKER, str(tmp_path)], tmp_path)
    wait_all(processes, tmp_path, timeout=420)
    reports = [json.loads((tmp_path / f"worker_{i}.json").read_text()) for i in range(2)]
    weights = [np.load(tmp_path / f"worker_{i}.npz") for i in range(2)]
    assert reports[0]["replicas"] == 2 and reports[0]["workers"] == 2
    assert len(weights[0].files) == len(weights[1].files) > 10
    for name in weights[0].files:  # model weights and the replay buffer, bit for bit
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
    # Logs are reduced over both workers, so both see the same (global) values.
    assert reports[0]["loss"] == reports[1]["loss"] and len(reports[0]["loss"]) == 2
    for report in reports:
        # 6 steps of 8 chains (4 per worker) on 40 chains: each held once, no write lost.
        assert report["ids"] == list(range(40))
        assert report["visits"] == 6 * 8
        assert report["restored_step"] == 6
    assert reports[0]["seed"] == reports[1]["seed"]
    # Each worker wrote its own backup (the chief in backup/, the other in backup/worker_1).
    assert (tmp_path / "backup" / "training_metadata.json").exists()
    assert (tmp_path / "backup" / "worker_1" / "training_metadata.json").exists()


CLI = ["-m", "trainers.fit", "--model", "jem", "--strategy", "multi_worker", "--epochs", "2",
       "--steps_per_epoch", "6", "--num_steps", "2", "--buffer_size", "200", "--batch_size",
       "16", "--sample_every", "0", "--verbose", "2", "--save_freq", "2"]


@pytest.mark.large
def test_cli_two_workers_killed_worker_then_same_commands_resume(tmp_path):
    """SIGKILL one worker mid-run; rerunning both commands resumes and ends identical.

    Large: two TensorFlow workers, run twice (about 3-4 minutes on 2 cores).
    """
    model_dir = tmp_path / "run"
    args = [*CLI, "--model_dir", str(model_dir)]
    metadata_path = model_dir / "workers" / "worker_1" / "backup" / "training_metadata.json"
    processes = start_workers(args, tmp_path)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and all(p.poll() is None for p in processes):
            try:
                metadata = json.loads(metadata_path.read_text())
            except (OSError, ValueError):
                metadata = None
            if metadata and metadata["global_step"] >= 2:
                break
            time.sleep(0.1)
        assert all(p.poll() is None for p in processes), "a worker ended early"
        os.kill(processes[1].pid, signal.SIGKILL)
        # The surviving worker fails once its collectives lose the peer; bound the wait.
        try:
            processes[0].wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
    finally:
        kill_all(processes)

    processes = start_workers(args, tmp_path)
    wait_all(processes, tmp_path, timeout=600)
    logs = [(tmp_path / f"worker_{i}.log").read_text() for i in range(2)]
    for log in logs:
        assert "resuming from the backup at epoch" in log
    import keras

    import keras_jem  # noqa: F401

    models = [keras.saving.load_model(str(model_dir / "model.keras")),
              keras.saving.load_model(str(model_dir / "workers" / "worker_1" / "model.keras"))]
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_array_equal(a, b)
    for path in (model_dir / "backup", model_dir / "workers" / "worker_1" / "backup"):
        final = json.loads((path / "training_metadata.json").read_text())
        assert (final["epoch"], final["step"], final["optimizer_iterations"]) == (2, 0, 12)
