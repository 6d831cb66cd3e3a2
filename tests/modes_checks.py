"""One training step on 2 replicas (MirroredStrategy, 2 logical CPUs) against one device.

Run as a script in a fresh interpreter (the CPU is split before TensorFlow initialises):
`python tests/modes_checks.py OUT.json`; `tests/test_modes.py` runs it and asserts on the JSON.

The step has everything on that a real SADA-JEM run has: BatchNorm (training mode in every
pass and in the sampler), ASAM's two passes, coupled weight decay, the two data streams.
BatchNorm normalises with per-replica batch statistics, so each replica's shard is made a copy
of the other's (global batch `[A; A]`, buffer `[B; B]`): the per-replica statistics then equal
the global ones, and the reference single-device step on the same global batch is the exact
answer. Each configuration also runs with `weight_decay=0`, so the decay part of the update
(`update(wd) - update(0)`, which must be `-lr * wd * w`) is reported separately.
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
from keras_jem.backbones import SmallCNN
from keras_jem.optimizers import SAM
from tests.two_devices import MIRRORED  # splits the CPU: before any TensorFlow op
from tests.two_devices import SHAPE
from tests.two_devices import SINGLE
from tests.two_devices import numpy

LEARNING_RATE = 0.1
WEIGHT_DECAY = 0.05
HALF = 8  # images per replica


def make_model(strategy, weight_decay):
    with distribute.construction_scope(strategy):
        model = keras_jem.SADAJEM(
            backbone=SmallCNN(filters=(8,), feature_dim=16, norm="batch"), num_classes=10,
            sampler=keras_jem.sampling.SGLD(2, 1.0, 0.0, gradient_clip=1.0,
                                            clip_range=(-1.0, 1.0)),
            sam=SAM(rho=0.5, adaptive=True), buffer_init="uniform", buffer_size=2 * HALF,
            reinit_probability=0.0, weight_decay=weight_decay, seed=1)
    with strategy.scope():
        model.build((None,) + SHAPE)
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), jit_compile=False)
        model.optimizer.build(model.trainable_variables)
    return model


def run_step(strategy, weight_decay, weights, data):
    model = make_model(strategy, weight_decay)
    with strategy.scope():
        model.set_weights(weights)
    before = [numpy(v) for v in model.trainable_variables]
    ds = tf.data.Dataset.from_tensors(data)
    with strategy.scope():
        history = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    update = [numpy(v) - b for v, b in zip(model.trainable_variables, before)]
    moving = [numpy(v) for v in model.non_trainable_variables if "moving" in v.path]
    return {"update": update, "before": before, "moving": moving,
            "loss": float(history.history["loss"][-1])}


def relative(a, b):
    """max |a - b| / max |b| over all variables."""
    num = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    den = max(float(np.max(np.abs(y))) for y in b)
    return num / max(den, 1e-30)


def main(argv):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    half = rng.uniform(-1, 1, (HALF,) + SHAPE).astype("float32")
    half_px = rng.uniform(-1, 1, (HALF,) + SHAPE).astype("float32") * 0.5
    labels = (np.arange(HALF) % 10).astype("int64")
    data = ({"images": np.concatenate([half, half]), "px_images": np.concatenate(
        [half_px, half_px])}, np.concatenate([labels, labels]))
    reference = make_model(SINGLE, 0.0)
    chains = rng.uniform(-1, 1, (HALF,) + SHAPE).astype("float32")
    reference.buffer.images.assign(np.concatenate([chains, chains]))
    weights = reference.get_weights()

    results = {"num_replicas": MIRRORED.num_replicas_in_sync, "weight_decay": WEIGHT_DECAY,
               "learning_rate": LEARNING_RATE}
    runs = {}
    for name, strategy in (("single", SINGLE), ("mirrored", MIRRORED)):
        for decay in (WEIGHT_DECAY, 0.0):
            runs[(name, decay)] = run_step(strategy, decay, weights, data)
    single, mirrored = runs[("single", WEIGHT_DECAY)], runs[("mirrored", WEIGHT_DECAY)]
    expected_decay = [-LEARNING_RATE * WEIGHT_DECAY * w for w in single["before"]]
    decay = {}
    for name in ("single", "mirrored"):
        with_decay, without = runs[(name, WEIGHT_DECAY)], runs[(name, 0.0)]
        part = [a - b for a, b in zip(with_decay["update"], without["update"])]
        norm = np.sqrt(sum(float(np.sum(p ** 2)) for p in part))
        expected_norm = np.sqrt(sum(float(np.sum(e ** 2)) for e in expected_decay))
        decay[name] = {"relative_error": relative(part, expected_decay),
                       "norm_ratio": float(norm / expected_norm)}
    results.update({
        "update_norm": float(np.sqrt(sum(np.sum(u ** 2) for u in single["update"]))),
        "update_relative_error": relative(mirrored["update"], single["update"]),
        "update_relative_error_without_decay": relative(
            runs[("mirrored", 0.0)]["update"], runs[("single", 0.0)]["update"]),
        "moving_statistics_relative_error": relative(mirrored["moving"], single["moving"]),
        "moving_statistics_changed": relative(single["moving"], [
            np.asarray(w) for w, v in zip(weights, reference.weights) if "moving" in v.path]),
        "loss_single": single["loss"], "loss_mirrored": mirrored["loss"],
        "decay": decay,
    })
    with open(argv[1], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv)
