"""Checks of JEM-family training under MirroredStrategy on 2 logical CPU devices.

Run as a script in a fresh interpreter (the CPU must be split before TensorFlow initialises):
`python tests/distribute_checks.py OUT.json [check ...]`. `tests/test_distribute.py` runs it
once and asserts on the JSON it writes, so TensorFlow starts once for all the checks.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np
import tensorflow as tf

import keras_jem
from keras_jem import callbacks as jem_callbacks
from keras_jem import checkpointing
from keras_jem import distribute
from keras_jem.backbones import SmallCNN
from tests.two_devices import MIRRORED  # splits the CPU: before any TensorFlow op
from tests.two_devices import SHAPE
from tests.two_devices import SINGLE
from tests.two_devices import numpy


def replica_copies(variable):
    """The per-device copies of a (possibly mirrored) Keras variable."""
    value = variable.value
    if hasattr(value, "values"):
        return [v.numpy() for v in value.values]
    return [value.numpy()]


def make_model(strategy, cls=keras_jem.JEM, optimizer="sgd", **kwargs):
    """A tiny model built and compiled under `strategy` (SGD(0.1) or Adam(1e-3))."""
    kwargs.setdefault("buffer_size", 16)
    kwargs.setdefault("reinit_probability", 0.0)
    kwargs.setdefault("buffer_init", "uniform")
    kwargs.setdefault("seed", 1)
    with distribute.construction_scope(strategy):
        model = cls(backbone=SmallCNN(filters=(8, 16), feature_dim=32), num_classes=10,
                    **kwargs)
    with strategy.scope():
        model.build((None,) + SHAPE)
        optimizer = (keras.optimizers.SGD(0.1) if optimizer == "sgd"
                     else keras.optimizers.Adam(1e-3))
        model.compile(optimizer=optimizer, jit_compile=False)
        model.optimizer.build(model.trainable_variables)
    return model


def batch(size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (size,) + SHAPE).astype("float32")
    y = (np.arange(size) % 10).astype("int64")
    return x, y


def fit(model, strategy, data, steps, callbacks=()):
    ds = tf.data.Dataset.from_tensors(data).repeat()
    with strategy.scope():
        return model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0,
                         callbacks=list(callbacks))


# === Checks ===


def check_same_update(cls, sampler):
    """One step on 2 replicas == one step on 1 device, same global batch (SGD: scale-exact).

    The sampler is deterministic (noise 0, no reinit) and the buffer holds exactly one global
    batch of chains, so one device continues all 16 chains and each replica continues the 8
    of its shard: the same chains, whatever the draw order.
    """
    single = make_model(SINGLE, cls, sampler=sampler)
    mirrored = make_model(MIRRORED, cls, sampler=sampler)
    with MIRRORED.scope():
        mirrored.set_weights(single.get_weights())
    before = [numpy(v) for v in single.trainable_variables]
    initial_buffer = numpy(single.buffer.images).copy()
    data = batch()
    fit(single, SINGLE, data, 1)
    fit(mirrored, MIRRORED, data, 1)
    single_update = [numpy(v) - b for v, b in zip(single.trainable_variables, before)]
    mirrored_update = [numpy(v) - b for v, b in zip(mirrored.trainable_variables, before)]
    errors = [float(np.max(np.abs(s - m)) / (np.max(np.abs(s)) + 1e-12))
              for s, m in zip(single_update, mirrored_update)]
    copies = replica_copies(mirrored.buffer.images)
    return {
        "max_relative_error": max(errors),
        "update_norm": float(np.sqrt(sum(np.sum(u ** 2) for u in single_update))),
        "buffer_max_difference": float(np.max(np.abs(numpy(single.buffer.images) - copies[0]))),
        "buffer_copies_identical": bool(np.array_equal(copies[0], copies[1])),
        "buffer_change": float(np.max(np.abs(copies[0] - initial_buffer))),
    }


def check_jem_same_update():
    return check_same_update(keras_jem.JEM, keras_jem.sampling.SGLD(2, 1.0, 0.0))


def check_sadajem_same_update():
    sampler = keras_jem.sampling.SGLD(2, 1.0, 0.0, gradient_clip=1.0, clip_range=(-1.0, 1.0))
    result = check_same_update(keras_jem.SADAJEM, sampler)
    # Control: perturbing each replica with its own (not all-reduced) gradient must be caught.
    from keras_jem.optimizers import sam

    all_reduce = sam._all_reduce_mean
    sam._all_reduce_mean = lambda gradients: gradients
    try:
        result["local_perturbation"] = check_same_update(keras_jem.SADAJEM, sampler)
    finally:
        sam._all_reduce_mean = all_reduce
    return result


def check_replica_noise():
    """SGLD noise and buffer draws differ across replicas (seeds fold in the replica id)."""
    model = make_model(MIRRORED, buffer_size=40, sampler=keras_jem.sampling.SGLD(1, 0.0, 1.0))

    @tf.function
    def step():
        def replica_fn():
            seed = keras_jem.sampling.next_seed(model.seed_generator)
            noise = model.sampler.run(lambda x: tf.reduce_sum(0.0 * x, axis=[1, 2, 3]),
                                      tf.zeros((4,) + SHAPE), seed=seed)
            indices, _, _ = model.buffer.draw(4, seed=seed)
            return noise, indices

        return MIRRORED.run(replica_fn)

    noise, indices = step()
    noise = [v.numpy() for v in MIRRORED.experimental_local_results(noise)]
    indices = [v.numpy().tolist() for v in MIRRORED.experimental_local_results(indices)]
    return {
        "noise_std": [float(n.std()) for n in noise],
        "noise_max_abs_difference": float(np.max(np.abs(noise[0] - noise[1]))),
        "indices": indices,
    }


class TagSampler(keras_jem.sampling.Sampler):
    """Keeps each chain's id (pixel 0) and counts its visits (pixel 1)."""

    def __call__(self, target, x, y=None, seed=None, training=False, num_steps=None):
        flat = tf.reshape(x, (-1, int(np.prod(SHAPE))))
        flat = flat + tf.one_hot(1, flat.shape[1], dtype=flat.dtype)[None]
        return tf.reshape(flat, tf.shape(x))


def tagged_buffer(size):
    images = np.zeros((size,) + SHAPE, "float32")
    images.reshape(size, -1)[:, 0] = np.arange(size)
    return images


def chain_census(images):
    flat = images.reshape(len(images), -1)
    return {
        "ids": sorted(round(float(v)) for v in flat[:, 0]),
        "visits": round(float(flat[:, 1].sum())),
    }


def check_chains_and_checkpoints():
    """Every chain held once after N steps; checkpoints move between 2 and 1 replicas."""
    results = {}
    size, steps, global_batch = 40, 5, 8
    two = make_model(MIRRORED, buffer_size=size, sampler=TagSampler(), optimizer="adam")
    with MIRRORED.scope():
        two.buffer.images.assign(tagged_buffer(size))
    fit(two, MIRRORED, batch(global_batch), steps)
    copies = replica_copies(two.buffer.images)
    results["census"] = chain_census(copies[0])
    results["copies_identical"] = bool(np.array_equal(copies[0], copies[1]))
    results["expected_visits"] = steps * global_batch

    root = tempfile.mkdtemp()
    backup = checkpointing.StepBackup(os.path.join(root, "two"), steps_per_epoch=steps,
                                      worker_index=0)
    backup.global_step = steps
    with MIRRORED.scope():
        backup.save(two)
    saved = {
        "weights": [numpy(v) for v in two.trainable_variables],
        "buffer": copies[0],
        "seed": numpy(two.seed_generator.state).tolist(),
    }

    def restored_matches(model, strategy, backup_dir, step):
        restore = checkpointing.StepBackup(backup_dir, steps_per_epoch=steps, worker_index=0)
        with strategy.scope():
            metadata = restore.restore(model)
        model_copies = replica_copies(model.buffer.images)
        return {
            "global_step": restore.global_step,
            "metadata_replicas": metadata["num_replicas"],
            "iterations": int(numpy(model.optimizer.iterations)),
            "weights_equal": all(np.array_equal(numpy(v), w) for v, w in zip(
                model.trainable_variables, saved["weights"])),
            "buffer_equal": all(np.array_equal(c, saved["buffer"]) for c in model_copies),
            "seed_equal": numpy(model.seed_generator.state).tolist() == saved["seed"],
        }

    # 2 replicas -> 1 device, then one more step there.
    one = make_model(SINGLE, buffer_size=size, sampler=TagSampler(),
                     optimizer="adam")
    results["two_to_one"] = restored_matches(one, SINGLE, os.path.join(root, "two"), steps)
    fit(one, SINGLE, batch(global_batch), 1)
    results["two_to_one"]["after_step"] = chain_census(numpy(one.buffer.images))
    # 2 replicas -> 2 replicas.
    again = make_model(MIRRORED, buffer_size=size, sampler=TagSampler(),
                       optimizer="adam")
    results["two_to_two"] = restored_matches(again, MIRRORED, os.path.join(root, "two"), steps)
    # 1 device -> 2 replicas, then one more step on 2 replicas.
    backup_one = checkpointing.StepBackup(os.path.join(root, "one"), steps_per_epoch=steps,
                                          worker_index=0)
    backup_one.global_step = steps + 1
    backup_one.save(one)
    saved = {
        "weights": [numpy(v) for v in one.trainable_variables],
        "buffer": numpy(one.buffer.images),
        "seed": numpy(one.seed_generator.state).tolist(),
    }
    results["one_to_two"] = restored_matches(again, MIRRORED, os.path.join(root, "one"),
                                             steps + 1)
    fit(again, MIRRORED, batch(global_batch), 1)
    results["one_to_two"]["after_step"] = chain_census(replica_copies(again.buffer.images)[1])
    return results


def check_rollback():
    """A divergence under MirroredStrategy rolls back to the last backup on every replica."""
    root = tempfile.mkdtemp()
    model = make_model(MIRRORED, buffer_size=40, sampler=keras_jem.sampling.SGLD(2, 1.0, 0.01),
                       optimizer="adam")
    guard = jem_callbacks.DivergenceGuard()
    backup = checkpointing.StepBackup(root, save_freq=2, steps_per_epoch=4, guard=guard,
                                      worker_index=0)
    ds = tf.data.Dataset.from_tensors(batch(8)).repeat()
    with MIRRORED.scope():
        checkpointing.fit_from_backup(model, ds, backup, epochs=1, callbacks=[guard],
                                      verbose=0)
    good = {"weights": [numpy(v) for v in model.trainable_variables],
            "buffer": replica_copies(model.buffer.images)[0], "step": backup.global_step}

    def fit_to_epoch_two(divergence_threshold):
        """Continues the run with a fresh guard at `divergence_threshold`; returns the guard."""
        model.divergence_threshold = divergence_threshold
        model.make_train_function(force=True)
        guard = jem_callbacks.DivergenceGuard()
        backup.guard = guard
        with MIRRORED.scope():
            checkpointing.fit_from_backup(model, ds, backup, epochs=2, callbacks=[guard],
                                          verbose=0)
        return guard

    # Everything diverges now: the next steps must not reach the backup.
    guard = fit_to_epoch_two(1e-9)
    moved = not all(np.array_equal(numpy(v), w)
                    for v, w in zip(model.trainable_variables, good["weights"]))
    with MIRRORED.scope():
        backup.restore_on_all_workers(model, MIRRORED)
    copies = replica_copies(model.buffer.images)
    result = {
        "diverged": guard.diverged,
        "weights_moved_before_rollback": moved,
        "restored_step": backup.global_step,
        "good_step": good["step"],
        "weights_restored": all(np.array_equal(numpy(v), w)
                                for v, w in zip(model.trainable_variables, good["weights"])),
        "buffer_restored": all(np.array_equal(c, good["buffer"]) for c in copies),
    }
    fit_to_epoch_two(1e8)
    result["continued_to_step"] = backup.global_step
    return result


CHECKS = {
    "jem_same_update": check_jem_same_update,
    "sadajem_same_update": check_sadajem_same_update,
    "replica_noise": check_replica_noise,
    "chains_and_checkpoints": check_chains_and_checkpoints,
    "rollback": check_rollback,
}


def main(argv):
    out = argv[1]
    names = argv[2:] or list(CHECKS)
    results = {"num_replicas": MIRRORED.num_replicas_in_sync}
    for name in names:
        keras.utils.set_random_seed(0)
        try:
            results[name] = CHECKS[name]()
        except Exception as error:  # noqa: BLE001 (reported to the test, which fails)
            import traceback

            results[name] = {"error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc()[-4000:]}
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv)
