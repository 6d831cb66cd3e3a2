"""Checks of `FIFOReplayBuffer` under MirroredStrategy on 2 logical CPU devices.

Run as a script in a fresh interpreter (the CPU must be split before TensorFlow initialises):
`python tests/fifo_checks.py OUT.json`. `tests/test_fifo_buffer.py` runs it and asserts on the
JSON it writes.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np
import tensorflow as tf

import keras_jem
from keras_jem import distribute
from keras_jem.sampling import FIFOReplayBuffer
from tests.two_devices import MIRRORED  # splits the CPU: before any TensorFlow op
from tests.two_devices import SHAPE


def copies(variable):
    """The per-device copies of a (possibly mirrored) Keras variable, as numpy arrays."""
    value = variable.value
    return [v.numpy() for v in value.values] if hasattr(value, "values") else [value.numpy()]


def check_ring():
    """Two steps of 3 images per replica into a ring of 8; each replica then draws 6."""
    with MIRRORED.scope():
        buffer = FIFOReplayBuffer(size=8, reinit_probability=0.0)
        buffer.build((1, 1, 1))

    @tf.function
    def step(number):
        def replica_fn():
            replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group,
                              tf.float32)
            codes = 10.0 * tf.cast(number, tf.float32) + 3.0 * replica + tf.range(3.0)
            buffer.write(None, tf.reshape(-1.0 + 2.0 * (codes + 0.5) / 256.0, (3, 1, 1, 1)))
            return buffer.draw(6, seed=tf.constant([4, 5], tf.int64))[0]

        return MIRRORED.run(replica_fn)

    for number in range(2):
        draws = step(tf.constant(number))
    return {
        "copies": [c.ravel().tolist() for c in copies(buffer.images)],
        "num_written": [int(c) for c in copies(buffer.num_written)],
        "draws": [v.numpy().tolist() for v in MIRRORED.experimental_local_results(draws)],
    }


def check_model():
    """Two training steps of an unconditional IGEBM with its default FIFO buffer."""
    with distribute.construction_scope(MIRRORED):
        model = keras_jem.IGEBM(
            keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(4)]), buffer_size=24,
            sampler=keras_jem.sampling.SGLD(1, 40.0, 0.01, 0.005, (-1.0, 1.0), noise_first=True),
            seed=1)
    with MIRRORED.scope():
        model.build((None,) + SHAPE)
        model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=False)
    x = np.random.default_rng(0).uniform(-1, 1, (8,) + SHAPE).astype("float32")
    with MIRRORED.scope():
        model.fit(tf.data.Dataset.from_tensors(x).repeat(), epochs=1, steps_per_epoch=2,
                  verbose=0)
    images = copies(model.buffer.images)
    return {
        "buffer_type": model.buffer_type,
        "num_written": [int(c) for c in copies(model.buffer.num_written)],
        "copies_identical": bool(np.array_equal(images[0], images[1])),
    }


CHECKS = {"ring": check_ring, "model": check_model}


def main(argv):
    results = {"num_replicas": MIRRORED.num_replicas_in_sync}
    for name, check in CHECKS.items():
        keras.utils.set_random_seed(0)
        try:
            results[name] = check()
        except Exception as error:  # noqa: BLE001 (reported to the test, which fails)
            import traceback

            results[name] = {"error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc()[-4000:]}
        with open(argv[1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv)
