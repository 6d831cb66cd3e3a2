"""The bouncing-particles system against motion worked out by hand."""

import numpy as np
import pytest

from keras_jem.data import particles


def test_a_bounce_worked_by_hand():
    system = particles.BouncingParticles(
        num_particles=1, radius=0.05, dt=0.05, gravity=0.0, velocity_noise=0.0
    )
    # x: 0.06 - 1.0 * 0.05 = 0.01 < 0.05, reflected to 0.09 with vx = +1; y moves freely.
    new = system.step([[0.06, 0.5, -1.0, 0.2]])
    np.testing.assert_allclose(new, [[0.09, 0.51, 1.0, 0.2]], atol=1e-12)
    # Top wall: y 0.94 + 0.4 * 0.05 = 0.96 > 0.95, reflected to 0.94 with vy = -0.4.
    new = system.step([[0.5, 0.94, 0.0, 0.4]])
    np.testing.assert_allclose(new, [[0.5, 0.94, 0.0, -0.4]], atol=1e-12)


def test_gravity_and_noise_move_velocity_as_stated():
    system = particles.BouncingParticles(num_particles=1, gravity=2.0, velocity_noise=0.3, dt=0.01)
    start = np.tile([[0.5, 0.5, 0.0, 0.0]], (20000, 1))
    new = system.step(start, np.random.default_rng(0))
    # vy' = -g dt + noise sqrt(dt) N(0, 1): mean -0.02, std 0.03.
    assert abs(new[:, 3].mean() - (-0.02)) < 1e-3
    assert abs(new[:, 3].std() - 0.03) < 1e-3
    assert abs(new[:, 2].std() - 0.03) < 1e-3


def test_speed_is_conserved_and_particles_stay_in_the_box():
    system = particles.BouncingParticles(num_particles=3, gravity=0.0, velocity_noise=0.0)
    paths = system.simulate(num_trajectories=50, num_steps=200, seed=3)
    assert paths.shape == (50, 201, 12)
    states = paths.reshape(50, 201, 3, 4)
    speed = np.linalg.norm(states[..., 2:], axis=-1)
    np.testing.assert_allclose(speed, np.broadcast_to(speed[:, :1], speed.shape), atol=1e-12)
    assert states[..., :2].min() >= system.radius - 1e-12
    assert states[..., :2].max() <= 1 - system.radius + 1e-12
    # The particles do move and bounce: some velocity component changes sign.
    assert np.any(np.sign(states[:, 1:, :, 2]) != np.sign(states[:, :-1, :, 2]))


def test_seeded_and_transitions_pair_consecutive_states():
    system = particles.BouncingParticles()
    a = system.simulate(8, 10, seed=1)
    b = system.simulate(8, 10, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, system.simulate(8, 10, seed=2))
    s_t, s_next = particles.transitions(a)
    assert s_t.shape == s_next.shape == (80, 8)
    np.testing.assert_allclose(s_t[11], a[1, 1], atol=1e-6)
    np.testing.assert_allclose(s_next[11], a[1, 2], atol=1e-6)


def test_bad_arguments_say_what_was_received():
    with pytest.raises(ValueError, match="num_particles"):
        particles.BouncingParticles(num_particles=0)
    with pytest.raises(ValueError, match="needs an `rng`"):
        particles.BouncingParticles().step([[0.5, 0.5, 0.1, 0.1, 0.5, 0.5, 0.1, 0.1]])
    with pytest.raises(ValueError, match=r"Received shape \(3, 8\)"):
        particles.transitions(np.zeros((3, 8)))
