"""TransitionEBM and `trainers.trajectories` against answers known in advance."""

import json
import os
import subprocess
import sys

import keras
import numpy as np

from keras_jem import sampling
from keras_jem.models.transition_ebm import TransitionEBM
from tests import testing
from trainers import trajectories


class ScaledSquaredStep(keras.layers.Layer):
    """E(z_t, z_next) = w * (||z_next - z_t||^2 + z_next[0]) with one trainable scalar w."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(), initializer=keras.initializers.Constant(0.5))

    def call(self, pair):
        z_t, z_next = keras.ops.split(pair, 2, axis=-1)
        gap = keras.ops.sum(keras.ops.square(z_next - z_t), axis=-1, keepdims=True)
        return self.w * (gap + z_next[:, :1])


class PullToHalf(keras.layers.Layer):
    """E(z_t, u) = ||u - 0.5||^2: the chain's minimum is u = 0.5 whatever the state."""

    def call(self, pair):
        _, u = keras.ops.split(pair, 2, axis=-1)
        return keras.ops.sum(keras.ops.square(u - 0.5), axis=-1, keepdims=True)


def _quadratic_model(sampler, init_noise=0.0, energy_l2_weight=1.0):
    network = keras.Sequential([ScaledSquaredStep()])
    model = TransitionEBM(state_dim=2, energy_network=network, sampler=sampler,
                          init_noise=init_noise, prediction_init_noise=init_noise,
                          energy_l2_weight=energy_l2_weight, parameterization="state", seed=3)
    model.adapt(np.array([[0.0, 10.0], [2.0, 14.0]], np.float32))  # mean (1, 12), std (1, 2)
    model.build()
    return model


class TransitionEBMTest(testing.TestCase):
    def test_langevin_prediction_lands_on_the_energy_minimum(self):
        # The minimum of w (||z_next - z_t||^2 + z_next[0]) is z_next = z_t - (0.5, 0), i.e.
        # s_next = s_t - (0.5 * std_0, 0) = s_t - (0.5, 0); chains start 1 std away.
        sampler = sampling.SGLD(num_steps=60, step_size=0.2, noise_scale=0.0)
        model = _quadratic_model(sampler, init_noise=1.0)
        states = np.array([[0.5, 11.0], [3.0, 9.0], [-1.0, 20.0]], np.float32)
        predicted = testing.to_numpy(model.predict_next(states))
        # Each step shrinks the gap by (1 - 0.2 * 2 * 0.5) = 0.8: 0.8^60 ~ 1.5e-6 stds remain.
        minimum = states - np.array([0.5, 0.0], np.float32)
        self.assertAllClose(predicted, minimum, atol=1e-4)
        start = model.rollout(states, num_steps=3)
        self.assertEqual(start.shape, (3, 4, 2))
        self.assertAllClose(start[:, 3], states - np.array([1.5, 0.0]), atol=1e-4)

    def test_one_training_step_matches_the_formula(self):
        # No sampler steps and no start noise: the negatives are s_t itself.
        model = _quadratic_model(sampling.SGLD(num_steps=0), energy_l2_weight=0.7)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
        s_t = np.array([[0.0, 12.0], [1.0, 10.0]], np.float32)
        s_next = np.array([[1.0, 12.0], [1.0, 16.0]], np.float32)
        # Standardised: z_t = (-1, 0), (0, -1); z_next = (0, 0), (0, 2). Positives: gaps 1 and 9,
        # z_next[0] = 0, 0 -> a = (1, 9). Negatives (z_next = z_t): gap 0, z_t[0] = -1, 0 -> b.
        a, b, w = np.array([1.0, 9.0]), np.array([-1.0, 0.0]), 0.5
        second = (a**2).mean() + (b**2).mean()
        loss = w * a.mean() - w * b.mean() + 0.7 * w**2 * second
        gradient = a.mean() - b.mean() + 0.7 * 2 * w * second
        logs = model.train_on_batch(s_t, s_next, return_dict=True)
        self.assertAllClose(logs["loss"], loss, rtol=1e-5)
        self.assertAllClose(logs["energy_samples"], w * b.mean(), atol=1e-6)
        new_w = testing.to_numpy(model.energy_network.layers[0].w)
        self.assertAllClose(new_w, w - 0.1 * gradient, rtol=1e-5)

    def test_step_statistics_are_robust(self):
        # Feature 0 steps 1, 2, 3, 100: median 2.5, median |dev| 1.0 (the 100, a "bounce",
        # does not inflate it; the standard deviation would be 42). Feature 1 always steps 5:
        # no spread at all, so the scale falls back to 1.
        s_t = np.zeros((4, 2), np.float32)
        s_next = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [100.0, 5.0]], np.float32)
        model = TransitionEBM(state_dim=2, energy_network=keras.Sequential([PullToHalf()]))
        model.adapt(s_t, s_next)
        self.assertAllClose(testing.to_numpy(model.step_center), [2.5, 5.0])
        self.assertAllClose(testing.to_numpy(model.step_scale), [1.4826, 1.0], rtol=1e-5)
        with self.assertRaisesRegex(ValueError, r"adapt\(states, next_states\)"):
            model.adapt(s_t)

    def test_step_prediction_is_state_plus_center_plus_scaled_minimum(self):
        # Under E = ||u - 0.5||^2 the chain, started at u = 0, ends at u = 0.5: the prediction
        # is s_t + center + 0.5 * scale = s_t + (2.5, 5) + (0.7413, 0.5), whatever s_t is.
        s_t = np.zeros((4, 2), np.float32)
        s_next = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [100.0, 5.0]], np.float32)
        sampler = sampling.SGLD(num_steps=60, step_size=0.2, noise_scale=0.0)
        model = TransitionEBM(state_dim=2, energy_network=keras.Sequential([PullToHalf()]),
                              sampler=sampler, seed=3)
        model.adapt(s_t, s_next)
        states = np.array([[0.0, 0.0], [-3.0, 10.0]], np.float32)
        predicted = testing.to_numpy(model.predict_next(states))
        self.assertAllClose(predicted, states + np.array([2.5 + 0.7413, 5.5]), atol=1e-3)
        # The chain's energy sees the step: E(s_t, s_t + center + 0.5 * scale) is the minimum 0.
        energy = model.energy(predicted, y=states)
        self.assertAllClose(testing.to_numpy(energy), [0.0, 0.0], atol=1e-5)
        # A roll-out moves by the same step each time; a state range clips it.
        paths = model.rollout(states[:1], num_steps=3)
        self.assertAllClose(paths[0, 3], 3 * np.array([3.2413, 5.5]), atol=1e-3)
        boxed = TransitionEBM(state_dim=2, energy_network=keras.Sequential([PullToHalf()]),
                              sampler=sampler, state_range=([-np.inf, 0.0], [np.inf, 12.0]))
        boxed.adapt(s_t, s_next)
        paths = boxed.rollout(states, num_steps=3)
        self.assertAllClose(paths[:, 1:, 1], [[5.5, 11.0, 12.0], [12.0, 12.0, 12.0]], atol=1e-3)

    def test_config_round_trip_and_errors(self):
        fine = sampling.SGLD(num_steps=5, step_size=0.01, noise_scale=0.0)
        model = TransitionEBM(state_dim=8, init_noise=0.2, prediction_sampler=[fine, fine],
                              prediction_init_noise=0.3, state_range=(0.0, [1.0] * 8), seed=4)
        restored = TransitionEBM.from_config(model.get_config())
        self.assertEqual((restored.state_dim, restored.init_noise, restored.seed), (8, 0.2, 4))
        self.assertEqual(restored.sampler.get_config(), model.sampler.get_config())
        self.assertEqual([s.get_config() for s in restored.prediction_sampler],
                         [fine.get_config()] * 2)
        self.assertEqual((restored.parameterization, restored.prediction_init_noise),
                         ("step", 0.3))
        self.assertAllClose(restored.state_range[1], np.ones(8))
        with self.assertRaisesRegex(ValueError, "needs the current state"):
            model.energy(np.zeros((1, 8), np.float32))
        with self.assertRaisesRegex(ValueError, "state_dim"):
            TransitionEBM(state_dim=0)
        with self.assertRaisesRegex(ValueError, "parameterization"):
            TransitionEBM(state_dim=2, parameterization="delta")
        with self.assertRaisesRegex(ValueError, "low <= high"):
            TransitionEBM(state_dim=2, state_range=(1.0, 0.0))
        with self.assertRaisesRegex(ValueError, "a pair"):
            TransitionEBM(state_dim=2, state_range=(0.0, [1.0, 1.0, 1.0]))


def test_cli_tiny_run_and_bad_flag(tmp_path, monkeypatch):
    env = dict(os.environ, PYTHONPATH=testing.REPO)
    bad = subprocess.run(
        [sys.executable, "-m", "trainers.trajectories", "--horizons", "0,5"],
        check=False, capture_output=True, text=True, env=env, cwd=testing.REPO, timeout=60,
    )
    assert bad.returncode != 0 and "positive integers" in bad.stderr
    # The tiny run calls the same `main` in this process, which already imported TensorFlow
    # (a second `python -m trainers.trajectories` spent ~9 s of its ~15 s importing it); the
    # command above covers the module's command-line entry.
    # The tiny run's predictions stay in the box even unclipped, so the fraction below cannot
    # tell whether --clip_to_box arrived: record the state range the model is built with.
    built_with = {}
    build_model = TransitionEBM.__init__

    def recording_init(self, *args, **kwargs):
        built_with.update(kwargs)
        build_model(self, *args, **kwargs)

    monkeypatch.setattr(TransitionEBM, "__init__", recording_init)
    out = tmp_path / "run"
    trajectories.main(
        ["--model_dir", str(out),
         "--num_trajectories", "40", "--train_steps", "5", "--epochs", "1", "--num_eval", "30",
         "--horizons", "1,4", "--langevin_steps", "2", "--hidden_units", "16", "--clip_to_box"])
    report = json.loads((out / "trajectories.json").read_text())
    for name in ("energy_model", "regression"):
        assert set(report["frechet"][name]) == {"1", "4"}
        assert all(np.isfinite(v) and v >= 0 for v in report["frechet"][name].values())
    assert report["fraction_in_box"]["energy_model"] == 1.0  # --clip_to_box
    # Two particles of radius 0.05: centres in [0.05, 0.95], velocities unbounded.
    low, high = built_with["state_range"]
    np.testing.assert_allclose(low, [0.05, 0.05, -np.inf, -np.inf] * 2)
    np.testing.assert_allclose(high, [0.95, 0.95, np.inf, np.inf] * 2)
    assert (out / "rollout.png").stat().st_size > 1000
