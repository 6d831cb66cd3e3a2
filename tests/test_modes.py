"""Training modes against the reference mode (one float32 device), with everything on.

- MirroredStrategy on 2 logical CPUs (`tests/modes_checks.py`, in a fresh interpreter): one
  SADA-JEM step with BatchNorm, ASAM and coupled weight decay equals the single-device step on
  the same global batch.
- Mixed precision (`mixed_bfloat16`, `mixed_float16`): a few JEM steps with BatchNorm and weight
  decay stay within a stated tolerance of float32 (losses and weight change), and the weight
  decay part of one update is exactly `-lr * weight_decay * w`.

At the time of writing the weight-decay tests FAIL, on purpose (issue 18, the real-use weight
decay bug): the coupled decay is added to each replica's gradient before the optimizer sums the
replicas (R times too much decay with R replicas), and to the loss-scaled gradient under
mixed_float16 (2^15 times too little). The controls without weight decay pass.
"""

import keras
import numpy as np
import pytest

import keras_jem
from keras_jem.backbones import SmallCNN
from tests import testing

# === MirroredStrategy ===

# The fixture `mirrored` (`tests/conftest.py`) holds `tests/modes_checks.py`'s results; the
# session starts computing them in the background.


def test_mirrored_control_without_weight_decay(mirrored):
    # BatchNorm, ASAM's two passes, the sampler and both streams: same step on 2 replicas.
    assert mirrored["num_replicas"] == 2
    assert mirrored["update_norm"] > 1e-3
    assert mirrored["update_relative_error_without_decay"] < 1e-4, mirrored
    assert mirrored["loss_mirrored"] == pytest.approx(mirrored["loss_single"], rel=1e-5)
    # BatchNorm statistics moved, identically (the second SAM pass left them alone on both).
    assert mirrored["moving_statistics_changed"] > 0.1
    assert mirrored["moving_statistics_relative_error"] < 1e-4, mirrored


def test_mirrored_step_equals_single_device_step_with_weight_decay(mirrored):
    # Known bug at the time of writing: 0.42 relative error (the decay counted twice).
    assert mirrored["update_relative_error"] < 1e-4, mirrored


def test_mirrored_weight_decay_part_is_lr_times_decay_times_weights(mirrored):
    # The single device is the reference: its decay part is exactly -lr * wd * w.
    assert mirrored["decay"]["single"]["relative_error"] < 1e-3, mirrored["decay"]
    # Known bug at the time of writing: norm_ratio 2.0 on 2 replicas.
    assert mirrored["decay"]["mirrored"]["norm_ratio"] == pytest.approx(1.0, abs=1e-3), (
        mirrored["decay"])
    assert mirrored["decay"]["mirrored"]["relative_error"] < 1e-3, mirrored["decay"]


# === Mixed precision ===

LEARNING_RATE = 0.1
WEIGHT_DECAY = 0.05
STEPS = 3
# Stated tolerances against float32 after STEPS steps: relative error of each logged loss and
# of the total weight change (max |difference| / max |float32 change|). bfloat16 keeps 8
# mantissa bits (~4e-3 relative per rounding), float16 11 bits (~5e-4).
TOLERANCE = {"mixed_bfloat16": 5e-2, "mixed_float16": 1e-2}


def _model(policy, weight_decay):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = keras_jem.JEM(
            SmallCNN(filters=(8,), feature_dim=16, norm="batch"), 10,
            sampler=keras_jem.sampling.SGLD(2, 1.0, 0.0), buffer_size=16,
            reinit_probability=0.0, weight_decay=weight_decay, seed=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.build((None, 8, 8, 1))
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), jit_compile=False)
    return model


def _relative(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b)) / max(
        float(np.max(np.abs(v))) for v in b)


class MixedPrecisionTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(3)
        cls.weights = _model("float32", 0.0).get_weights()
        cls.runs = {}

    def _steps(self, policy, weight_decay):
        """STEPS steps under `policy`: (losses, change after 1 step, after STEPS, weights)."""
        key = (policy, weight_decay)
        if key not in self.runs:
            model = _model(policy, weight_decay)
            model.set_weights(self.weights)
            before = [testing.to_numpy(v).copy() for v in model.trainable_variables]
            x, y = testing.load_digits(num_examples=16 * STEPS)
            losses, changes = [], []
            for i in range(STEPS):
                logs = model.train_on_batch(x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)],
                                            return_dict=True)
                losses.append(float(logs["loss"]))
                changes.append([testing.to_numpy(v) - b
                                for v, b in zip(model.trainable_variables, before)])
            self.runs[key] = (losses, changes[0], changes[-1], before)
        return self.runs[key]

    def _check_close_to_float32(self, policy, weight_decay):
        losses, _, change, _ = self._steps(policy, weight_decay)
        ref_losses, _, ref_change, _ = self._steps("float32", weight_decay)
        tolerance = TOLERANCE[policy]
        print(policy, weight_decay, "losses", losses, "float32", ref_losses,
              "weight change relative error", _relative(change, ref_change))
        self.assertAllClose(losses, ref_losses, rtol=tolerance, atol=0)
        self.assertLess(_relative(change, ref_change), tolerance)

    def _check_decay_part(self, policy):
        # After one step both runs computed the same gradient at the same weights: their
        # difference is the decay part alone.
        _, with_decay, _, before = self._steps(policy, WEIGHT_DECAY)
        _, without, _, _ = self._steps(policy, 0.0)
        part = [a - b for a, b in zip(with_decay, without)]
        expected = [-LEARNING_RATE * WEIGHT_DECAY * w for w in before]
        ratio = np.sqrt(sum(np.sum(p ** 2) for p in part)) / np.sqrt(
            sum(np.sum(e ** 2) for e in expected))
        print(policy, "decay part / (-lr wd w):", ratio)
        self.assertAllClose(ratio, 1.0, atol=1e-3, msg=f"{policy}: decay part / (-lr wd w)")
        self.assertLess(_relative(part, expected), 1e-3)

    def test_float32_decay_part_reference(self):
        self._check_decay_part("float32")

    def test_bfloat16_close_to_float32(self):
        self._check_close_to_float32("mixed_bfloat16", WEIGHT_DECAY)

    def test_float16_close_to_float32_control_without_weight_decay(self):
        self._check_close_to_float32("mixed_float16", 0.0)

    def test_float16_close_to_float32(self):
        # Known bug at the time of writing: the decay is 2^15 times too small.
        self._check_close_to_float32("mixed_float16", WEIGHT_DECAY)

    def test_bfloat16_decay_part(self):
        self._check_decay_part("mixed_bfloat16")

    def test_float16_decay_part(self):
        # Known bug at the time of writing: the decay is 2^15 times too small.
        self._check_decay_part("mixed_float16")


# === Longer runs (--run_large) ===

LARGE_STEPS = 20
# Measured with the weight-decay fix applied: 0.0091 (bfloat16) and 0.0050 (float16).
LARGE_TOLERANCE = {"mixed_bfloat16": 0.05, "mixed_float16": 0.02}


@pytest.mark.large
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_sadajem_twenty_steps_close_to_float32(policy):
    """SADA-JEM (BatchNorm in the sampler, ASAM, weight decay) over 20 steps vs float32."""
    keras.utils.set_random_seed(5)
    x, y = testing.load_digits(num_examples=16 * LARGE_STEPS)

    def run(name, weights=None):
        keras.mixed_precision.set_global_policy(name)
        try:
            model = keras_jem.SADAJEM(
                SmallCNN(filters=(8,), feature_dim=16, norm="batch"), 10,
                sampler=keras_jem.sampling.SGLD(2, 1.0, 0.0, gradient_clip=1.0,
                                                clip_range=(-1.0, 1.0)),
                buffer_init="uniform", buffer_size=32, reinit_probability=0.0,
                weight_decay=WEIGHT_DECAY, seed=0)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        model.build((None, 8, 8, 1))
        model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), jit_compile=False)
        if weights is not None:
            model.set_weights(weights)
        start = model.get_weights()
        before = [testing.to_numpy(v).copy() for v in model.trainable_variables]
        losses = [float(model.train_on_batch(x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)],
                                             return_dict=True)["loss"])
                  for i in range(LARGE_STEPS)]
        change = [testing.to_numpy(v) - b for v, b in zip(model.trainable_variables, before)]
        return start, losses, change

    weights, ref_losses, ref_change = run("float32")
    _, losses, change = run(policy, weights)
    tolerance = LARGE_TOLERANCE[policy]
    print(policy, "max loss relative error",
          float(np.max(np.abs(np.subtract(losses, ref_losses)) / np.abs(ref_losses))),
          "weight change relative error", _relative(change, ref_change))
    np.testing.assert_allclose(losses, ref_losses, rtol=tolerance)
    assert _relative(change, ref_change) < tolerance, _relative(change, ref_change)
