"""A seeded physical system for trajectory modelling: particles bouncing in a box.

The IGEBM paper models robot-hand trajectories with an energy over transitions (s_t, s_{t+1})
and rolls it out far beyond the training horizon. That data cannot be had offline, so this module
simulates a system whose true state distribution at any horizon is known by simulation:
`num_particles` balls of radius `radius` moving in the unit box with elastic wall bounces, a
constant gravity and a little velocity noise. A state is the flat vector
`(x_1, y_1, vx_1, vy_1, ..., x_k, y_k, vx_k, vy_k)`.
"""

import dataclasses

import numpy as np

STATE_FEATURES = ("x", "y", "vx", "vy")


@dataclasses.dataclass
class BouncingParticles:
    """Particles in the unit box `[0, 1]^2` with elastic walls, gravity and velocity noise.

    One step of length `dt`: `v <- v + gravity * dt + velocity_noise * sqrt(dt) * N(0, I)`, then
    `p <- p + v * dt`, and a particle that crosses a wall is reflected back into
    `[radius, 1 - radius]` with the normal velocity component negated (elastic bounce).
    Particles do not collide with each other. With `velocity_noise=0` and `gravity=0` the speed
    of every particle is conserved exactly.

    Args:
        num_particles: number of balls (2).
        radius: ball radius; centres stay in `[radius, 1 - radius]` (0.05).
        dt: time step (0.05).
        gravity: downward acceleration along `y` (0.5; 0 disables it).
        velocity_noise: standard deviation of the velocity's Brownian kick per unit time (0.05).
        max_speed: initial speeds are drawn uniformly in `[0.2, max_speed]` (1.0).

    Example:

    >>> system = BouncingParticles(num_particles=2)
    >>> trajectories = system.simulate(num_trajectories=1000, num_steps=100, seed=0)
    >>> trajectories.shape                 # (trajectories, steps + 1, 4 * particles)
    (1000, 101, 8)
    >>> s_t, s_next = transitions(trajectories)
    """

    num_particles: int = 2
    radius: float = 0.05
    dt: float = 0.05
    gravity: float = 0.5
    velocity_noise: float = 0.05
    max_speed: float = 1.0

    def __post_init__(self):
        num_particles, radius, dt = self.num_particles, self.radius, self.dt
        velocity_noise, max_speed = self.velocity_noise, self.max_speed
        if int(num_particles) != num_particles or num_particles < 1:
            raise ValueError(f"`num_particles` must be a positive integer. Received: {num_particles}")
        if not 0 <= radius < 0.5:
            raise ValueError(f"`radius` must be in [0, 0.5). Received: {radius}")
        if not dt > 0:
            raise ValueError(f"`dt` must be positive. Received: {dt}")
        if velocity_noise < 0:
            raise ValueError(f"`velocity_noise` must be non-negative. Received: {velocity_noise}")
        if not max_speed > 0.2:
            raise ValueError(f"`max_speed` must exceed 0.2. Received: {max_speed}")
        for field in dataclasses.fields(self):  # 2.0 -> 2, numpy scalars -> Python numbers
            setattr(self, field.name, field.type(getattr(self, field.name)))

    @property
    def state_dim(self):
        return 4 * self.num_particles

    def get_config(self):
        return dataclasses.asdict(self)

    def state_range(self):
        """`(low, high)` per state feature: centres in `[radius, 1 - radius]`, any velocity."""
        low = np.tile([self.radius, self.radius, -np.inf, -np.inf], self.num_particles)
        high = np.tile([1 - self.radius, 1 - self.radius, np.inf, np.inf], self.num_particles)
        return low, high

    def initial_states(self, num, rng):
        """`num` random states: positions uniform in the box, speeds in `[0.2, max_speed]`."""
        low, high = self.radius, 1.0 - self.radius
        positions = rng.uniform(low, high, size=(num, self.num_particles, 2))
        angle = rng.uniform(0.0, 2 * np.pi, size=(num, self.num_particles))
        speed = rng.uniform(0.2, self.max_speed, size=(num, self.num_particles))
        velocities = np.stack([speed * np.cos(angle), speed * np.sin(angle)], axis=-1)
        return np.concatenate([positions, velocities], axis=-1).reshape(num, self.state_dim)

    def step(self, states, rng=None):
        """Advances a batch of states `(N, 4 * k)` by one time step (noise needs `rng`)."""
        states = np.asarray(states, np.float64).reshape(-1, self.num_particles, 4)
        position, velocity = states[..., :2].copy(), states[..., 2:].copy()
        velocity[..., 1] -= self.gravity * self.dt
        if self.velocity_noise > 0:
            if rng is None:
                raise ValueError("A noisy system (velocity_noise > 0) needs an `rng` to step.")
            velocity += self.velocity_noise * np.sqrt(self.dt) * rng.standard_normal(
                velocity.shape
            )
        position += velocity * self.dt
        low, high = self.radius, 1.0 - self.radius
        # A step is far shorter than the box, so one reflection per wall and step suffices.
        below, above = position < low, position > high
        position = np.where(below, 2 * low - position, position)
        position = np.where(above, 2 * high - position, position)
        velocity = np.where(below | above, -velocity, velocity)
        return np.concatenate([position, velocity], axis=-1).reshape(-1, self.state_dim)

    def rollout(self, states, num_steps, seed=None):
        """The true trajectories `(N, num_steps + 1, 4 * k)` from `states`."""
        rng = np.random.default_rng(seed)
        path = [np.asarray(states, np.float64).reshape(-1, self.state_dim)]
        for _ in range(int(num_steps)):
            path.append(self.step(path[-1], rng))
        return np.stack(path, axis=1)

    def simulate(self, num_trajectories, num_steps, seed=0):
        """`num_trajectories` trajectories of `num_steps` steps from random initial states."""
        rng = np.random.default_rng(seed)
        start = self.initial_states(int(num_trajectories), rng)
        return self.rollout(start, num_steps, seed=rng.integers(2**31))


def transitions(trajectories):
    """Flattens trajectories `(N, T + 1, D)` into pairs `(s_t, s_{t+1})`, each `(N * T, D)`."""
    trajectories = np.asarray(trajectories)
    if trajectories.ndim != 3 or trajectories.shape[1] < 2:
        raise ValueError(
            "Expected trajectories of shape (num_trajectories, num_steps + 1, state_dim) with at "
            f"least one step. Received shape {trajectories.shape}."
        )
    dim = trajectories.shape[-1]
    return (
        trajectories[:, :-1].reshape(-1, dim).astype(np.float32),
        trajectories[:, 1:].reshape(-1, dim).astype(np.float32),
    )
