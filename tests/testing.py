"""Shared helpers for the keras-jem tests: a TestCase, tiny models, data and subprocesses.

Tests import it as `from tests import testing` (`pythonpath = ["."]` in pyproject.toml puts the
repository root on `sys.path`, for `pytest` as for `python -m pytest`); it holds no tests.
"""

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_jem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_SHAPE = (8, 8, 1)
NUM_CLASSES = 10


class TestCase(tf.test.TestCase, parameterized.TestCase):
    """Base test case: fresh Keras session and fixed seeds for every test."""

    # tf.test.TestCase's deprecated `test_session` context manager is not a test.
    test_session = None

    def setUp(self):
        super().setUp()
        keras.backend.clear_session(free_memory=False)  # gc.collect costs ~0.25 s per test
        keras.utils.set_random_seed(1337)

    def _GetNdArray(self, a):
        # Keras variables: read them directly (np.array(variable) warns under NumPy 2).
        if isinstance(a, keras.Variable):
            a = a.numpy()
        return super()._GetNdArray(a)

    def assertAllInRange(self, values, low, high):
        values = to_numpy(values)
        self.assertGreaterEqual(float(values.min()), low)
        self.assertLessEqual(float(values.max()), high)


def to_numpy(x):
    if isinstance(x, (keras.Variable, tf.Variable)):
        return np.asarray(x.numpy())
    return np.asarray(keras.ops.convert_to_numpy(x))


# === Tiny models ===


def small_cnn(filters=(8, 16), feature_dim=32, **kwargs):
    """A tiny `SmallCNN` (imported from its module until `keras_jem.backbones` re-exports it)."""
    cls = getattr(keras_jem.backbones, "SmallCNN", None)
    if cls is None:
        from keras_jem.backbones.small_cnn import SmallCNN as cls
    return cls(filters=filters, feature_dim=feature_dim, **kwargs)


def tiny_sgld(num_steps=3, step_size=1.0, noise_scale=0.01, **kwargs):
    return keras_jem.sampling.SGLD(
        num_steps=num_steps, step_size=step_size, noise_scale=noise_scale, **kwargs
    )


def tiny_proximal(num_steps=2, inner_steps=2, **kwargs):
    return keras_jem.sampling.ProximalSGLD(num_steps=num_steps, inner_steps=inner_steps, **kwargs)


def make_model(cls=None, image_shape=DIGITS_SHAPE, num_classes=NUM_CLASSES, backbone=None,
               buffer_size=100, seed=1, build=True, adapt=None, **kwargs):
    """A tiny JEM-family model on a tiny SmallCNN, built (and adapted) for `image_shape`.

    Args:
        cls: `keras_jem.JEM` (default), `JEMPP` or `SADAJEM`.
        adapt: optional `(images, labels)` passed to `adapt_buffer` (needed for the
            gaussian-mixture buffer of JEMPP/SADAJEM).
        **kwargs: model arguments; the sampler defaults to a 3-step SGLD for JEM/SADAJEM and a
            2x2-step ProximalSGLD for JEMPP.
    """
    cls = cls or keras_jem.models.JEM
    if "sampler" not in kwargs:
        if issubclass(cls, keras_jem.models.SADAJEM):  # before JEMPP, its parent
            kwargs["sampler"] = tiny_sgld(noise_scale=0.0, gradient_clip=1.0,
                                          clip_range=(-1.0, 1.0))
        elif issubclass(cls, keras_jem.models.JEMPP):
            kwargs["sampler"] = tiny_proximal()
        else:
            kwargs["sampler"] = tiny_sgld()
    model = cls(
        backbone=backbone if backbone is not None else small_cnn(),
        num_classes=num_classes,
        buffer_size=buffer_size,
        seed=seed,
        **kwargs,
    )
    if build:
        model(np.zeros((1,) + tuple(image_shape), "float32"))
    if adapt is not None:
        model.adapt_buffer(*adapt, seed=seed)
    return model


# === Data ===


@functools.cache
def _digits(split):
    from keras_jem import data

    return data.load("digits", split)


def load_digits(split="train", num_examples=None):
    """scikit-learn digits in [-1, 1] (cached), optionally the first `num_examples` of them."""
    images, labels = _digits(split)
    if num_examples is not None:
        images, labels = images[:num_examples], labels[:num_examples]
    return images.copy(), labels.copy()


# === Subprocesses ===


def run_in_subprocess(code, timeout=240):
    """Runs `code` with `python -c` in a fresh interpreter (repo on the path); returns stdout.

    Raises an `AssertionError` with the child's stderr if it fails.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"Subprocess failed with code {result.returncode}.\n"
            f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
        )
    return result.stdout


# Seconds each checks script of `tests/two_device_checks.py` may take (they run in turn).
TWO_DEVICE_TIMEOUTS = {"distribute": 1200, "fifo": 600, "modes": 900}


class TwoDeviceChecks:
    """`tests/two_device_checks.py` running in the background on `names`, in that order.

    `tests/conftest.py` starts one as the session starts, for the checks that the selected tests
    read (its fixtures `two_replicas`, `fifo_two_replicas`, `mirrored`), and closes it at the end.
    Each script's results are the JSON it wrote, exactly as `python tests/NAME_checks.py OUT`
    writes them; only the time they are computed at changes.
    """

    def __init__(self, names, nice=10):
        self.names = list(names)
        self.dir = tempfile.mkdtemp(prefix="keras_jem_two_device_checks_")
        self.stderr_path = os.path.join(self.dir, "stderr.txt")
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("TF_CONFIG", None)
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(REPO, "tests", "two_device_checks.py"),
                 "--nice", str(nice), "--parent", str(os.getpid()), self.dir, *self.names],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr)
        self.started = time.monotonic()

    def results(self, name):
        """Waits for `name`'s checks (within its timeout, counted from the start) and returns
        the JSON they wrote; raises an `AssertionError` with the script's stderr if they wrote
        none or ran out of time."""
        position = self.names.index(name)
        deadline = self.started + sum(TWO_DEVICE_TIMEOUTS[n] for n in self.names[:position + 1])
        done = os.path.join(self.dir, f"{name}.done")
        out = os.path.join(self.dir, f"{name}.json")
        while not os.path.exists(done):
            if self.process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not os.path.exists(done) and self.process.poll() is None:
            self.close()
            raise AssertionError(f"{name}_checks.py did not finish in time:\n{self._stderr()}")
        if not os.path.exists(out):
            raise AssertionError(f"{name}_checks.py wrote no results:\n"
                                 f"{self._stderr()}")
        with open(out) as f:
            return json.load(f)

    def _stderr(self):
        with open(self.stderr_path) as f:
            return f.read()[-6000:]

    def close(self):
        """Stops the script if it still runs and removes its files."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


_two_device_checks = None


def start_two_device_checks(names):
    """Starts the background run of the checks `names` (see `TwoDeviceChecks`)."""
    global _two_device_checks
    stop_two_device_checks()
    _two_device_checks = TwoDeviceChecks(names)
    return _two_device_checks


def stop_two_device_checks():
    global _two_device_checks
    if _two_device_checks is not None:
        _two_device_checks.close()
        _two_device_checks = None


def two_device_results(name):
    """The results of `tests/NAME_checks.py`, from the background run when it has `name`, else
    from a run of that script alone started now."""
    run = _two_device_checks
    if run is None or name not in run.names:
        run = TwoDeviceChecks([name], nice=0)
        try:
            return run.results(name)
        finally:
            run.close()
    return run.results(name)


# === Known-answer helpers (tests/test_loss_terms.py, test_generation_known.py, ...) ===


@keras.saving.register_keras_serializable(package="keras_jem_tests")
class LinearBackbone(keras.layers.Layer):
    """`features = flatten(x) @ kernel + bias`: a backbone whose every gradient is known by hand.

    Its stem is the flattening (affine), so `ProximalSGLD` takes its one-gradient path.
    """

    stem_is_affine = True
    bias_initializer = "zeros"

    def __init__(self, feature_dim=3, **kwargs):
        super().__init__(**kwargs)
        self.feature_dim = int(feature_dim)

    def build(self, input_shape):
        dim = int(np.prod(input_shape[1:]))
        self.kernel = self.add_weight(name="kernel", shape=(dim, self.feature_dim),
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.feature_dim,),
                                    initializer=self.bias_initializer)

    def stem(self, x):
        return keras.ops.reshape(x, (keras.ops.shape(x)[0], -1))

    def call_from_stem(self, h, training=False):
        return keras.ops.matmul(h, self.kernel) + self.bias

    def call(self, x, training=None):
        return self.call_from_stem(self.stem(x), training=training)

    def get_config(self):
        config = super().get_config()
        config["feature_dim"] = self.feature_dim
        return config


@keras.saving.register_keras_serializable(package="keras_jem_tests")
class DenseBackbone(LinearBackbone):
    """`features = tanh(flatten(x) @ kernel + bias)`: a backbone simple enough to differentiate
    by hand, with the backbone contract (`feature_dim`, `stem`, `call_from_stem`)."""

    stem_is_affine = False
    bias_initializer = "random_normal"

    def __init__(self, feature_dim=4, **kwargs):
        super().__init__(feature_dim, **kwargs)

    def call_from_stem(self, h, training=False):
        return keras.ops.tanh(super().call_from_stem(h, training=training))


class RecordingSampler(keras_jem.sampling.Sampler):
    """Wraps a sampler and records every call's start, labels and samples (eager mode only).

    Compile the model with `run_eagerly=True`; each call appends a dict of numpy arrays
    (`start`, `y` or None, `samples`, `training`) to `calls`.
    """

    def __init__(self, sampler):
        super().__init__(num_steps=sampler.num_steps)
        self.sampler = sampler
        self.calls = []

    def __call__(self, target, x, y=None, seed=None, training=False, num_steps=None):
        samples = self.sampler(target, x, y=y, seed=seed, training=training,
                               num_steps=num_steps)
        if not tf.executing_eagerly():
            raise RuntimeError("RecordingSampler needs eager execution: compile the model with "
                               "run_eagerly=True.")
        self.calls.append({
            "start": to_numpy(x), "y": None if y is None else to_numpy(y),
            "samples": to_numpy(samples), "training": bool(training),
        })
        return samples

    def get_config(self):
        return self.sampler.get_config()


def stateless_seed(a, b=0):
    """A stateless seed `(2,)` int64, as the samplers and buffers take."""
    return tf.constant([a, b], tf.int64)


def built_buffer(cls, image_shape, **kwargs):
    """`cls(size=100, **kwargs)` (a replay buffer class) built for `image_shape`."""
    kwargs.setdefault("size", 100)
    buffer = cls(**kwargs)
    buffer.build(image_shape)
    return buffer


def set_buffer_images(model, images):
    """Overwrites every chain of `model`'s replay buffer with `images` `(buffer_size, h, w, c)`."""
    model.buffer.images.assign(np.asarray(images, np.float32))


def assign_by_shape(variables, values):
    """Assigns `values` (a dict shape -> array) to `variables`, each shape used exactly once.

    Lets a test hand-set a tiny model's weights without depending on variable names.
    """
    shapes = [tuple(v.shape) for v in variables]
    if sorted(shapes) != sorted(values) or len(set(shapes)) != len(shapes):
        raise ValueError(f"Variables of shapes {shapes} do not match the values' {list(values)}.")
    for variable in variables:
        variable.assign(np.asarray(values[tuple(variable.shape)], np.float32))


def values_by_shape(variables):
    """`{shape: numpy value}` of `variables` (shapes must be distinct)."""
    return {tuple(v.shape): to_numpy(v).copy() for v in variables}
