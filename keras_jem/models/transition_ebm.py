"""An energy over state transitions, sampled by Langevin dynamics (IGEBM's trajectory model)."""

import keras
import numpy as np
import tensorflow as tf

from keras_jem import sampling
from keras_jem.sampling import noise


def default_energy_network(hidden_units=(256, 256), name="transition_energy"):
    """An MLP `(batch, 2 * state_dim) -> (batch, 1)` with swish activations."""
    layers = [keras.layers.Dense(units, activation="swish") for units in hidden_units]
    return keras.Sequential([*layers, keras.layers.Dense(1)], name=name)


PARAMETERIZATIONS = ("state", "step")


def _check_state_range(state_range, state_dim):
    """`None`, or `(low, high)` as two float32 arrays of `state_dim` values (inf: unbounded)."""
    if state_range is None:
        return None
    try:
        low, high = (np.broadcast_to(np.asarray(b, np.float32), (state_dim,)) for b in state_range)
    except (TypeError, ValueError) as error:
        raise ValueError(
            "`state_range` must be None or a pair (low, high) of scalars or of state_dim="
            f"{state_dim} values each (use inf for an unbounded feature). Received: "
            f"{state_range!r}"
        ) from error
    if np.any(np.isnan(low) | np.isnan(high)) or np.any(low > high):
        raise ValueError(
            f"`state_range` needs low <= high in every feature. Received: {state_range!r}"
        )
    return low.copy(), high.copy()


@keras.saving.register_keras_serializable(package="keras_jem")
class TransitionEBM(keras.Model):
    """`E(s_t, s_{t+1})`: an IGEBM energy over transitions of a dynamical system.

    The IGEBM paper (Du & Mordatch, 2019, section 4.6) models trajectories with an energy over
    consecutive states and predicts by sampling: given `s_t`, Langevin dynamics on
    `s_{t+1} -> E(s_t, s_{t+1})` started near `s_t` draws the next state, and a roll-out feeds
    each prediction back in. Training is IGEBM's contrastive divergence on the transitions,

    ```
    mean E(s_t, s+) - mean E(s_t, s-) + energy_l2_weight * (mean E(s_t, s+)^2 + mean E(s_t, s-)^2)
    ```

    with positives `s+ = s_{t+1}` from the data and negatives `s-` drawn by `sampler` (short-run
    chains started where the prediction chains start, spread by `init_noise`; no replay buffer).

    The chain's coordinates `u` (what the energy network sees next to the standardised `s_t`,
    and what the sampler's step and noise are measured in) depend on `parameterization`:

    - "step" (default): the standardised change of state, `u = (s_{t+1} - s_t - c) / r` with
      `c` the median training step and `r` its robust spread per feature (`adapt`). A chain at
      `u = 0` predicts `s_t + c`, and one unit is a typical step, not a typical state: the
      energy resolves one physical step, and roll-out errors do not grow by a fraction of the
      state's spread each step.
    - "state": the standardised next state, `u = (s_{t+1} - mean) / std`, chains started at
      `s_t`. One physical step is a small fraction of a unit, so the start noise and the
      sampler's resolution can exceed the step itself (the roll-outs turn into random walks).

    Args:
        state_dim: size of a state vector.
        energy_network: a Keras model `(batch, 2 * state_dim) -> (batch, 1)` (default: an MLP
            with two hidden layers of 256 swish units).
        sampler: the training chains' `keras_jem.sampling.Sampler` (default `SGLD(num_steps=20,
            step_size=0.2, noise_scale=0.01, gradient_clip=1.0)`, in chain units).
        init_noise: standard deviation (chain units) of the training chains' start (1.0: the
            negatives cover about a typical step around the start, so the energy is shaped
            over the region the prediction chains cross).
        energy_l2_weight: weight of the energy magnitude penalty (IGEBM: 1.0).
        parameterization: "step" or "state" (above).
        prediction_sampler: the prediction chains' sampler, or a list of samplers run one after
            another (e.g. a coarse chain, then a fine noise-free one); default: `sampler`.
        prediction_init_noise: standard deviation (chain units) of the prediction chains'
            start (0.0: every prediction starts at `s_t` plus the median step).
        state_range: optional `(low, high)`, each a scalar or `state_dim` values (`inf` for an
            unbounded feature): predicted states are clipped into it, e.g. positions to a box
            (`BouncingParticles.state_range()`).
        seed: seed of the sampler's noise.

    Example:

    >>> system = keras_jem.data.particles.BouncingParticles()
    >>> s_t, s_next = keras_jem.data.particles.transitions(system.simulate(2000, 50))
    >>> model = keras_jem.models.TransitionEBM(state_dim=s_t.shape[1])
    >>> model.adapt(s_t, s_next)
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> model.fit(s_t, s_next, batch_size=128, epochs=5)
    >>> paths = model.rollout(s_t[:100], num_steps=100)      # (100, 101, state_dim)
    """

    def __init__(
        self,
        state_dim,
        energy_network=None,
        sampler=None,
        init_noise=1.0,
        energy_l2_weight=1.0,
        parameterization="step",
        prediction_sampler=None,
        prediction_init_noise=0.0,
        state_range=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(state_dim) != state_dim or state_dim < 1:
            raise ValueError(f"`state_dim` must be a positive integer. Received: {state_dim}")
        if init_noise < 0 or prediction_init_noise < 0 or energy_l2_weight < 0:
            raise ValueError(
                "`init_noise`, `prediction_init_noise` and `energy_l2_weight` must be "
                f"non-negative. Received: init_noise={init_noise}, "
                f"prediction_init_noise={prediction_init_noise}, "
                f"energy_l2_weight={energy_l2_weight}"
            )
        self.state_dim = int(state_dim)
        if isinstance(energy_network, dict):
            energy_network = keras.saving.deserialize_keras_object(energy_network)
        self.energy_network = energy_network or default_energy_network()
        sampler = sampling.deserialize(sampler)
        self.sampler = sampler or sampling.SGLD(
            num_steps=20, step_size=0.2, noise_scale=0.01, gradient_clip=1.0
        )
        if not isinstance(self.sampler, sampling.Sampler):
            raise ValueError(  # noqa: TRY004 (ValueError is the keras-jem API's error here)
                f"`sampler` must be a keras_jem.sampling.Sampler. Received: {sampler!r}"
            )
        self.init_noise = float(init_noise)
        self.energy_l2_weight = float(energy_l2_weight)
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"`parameterization` must be one of {PARAMETERIZATIONS}. "
                f"Received: parameterization={parameterization!r}"
            )
        self.parameterization = parameterization
        if prediction_sampler is None:
            prediction_sampler = []
        elif isinstance(prediction_sampler, (list, tuple)):
            prediction_sampler = [sampling.deserialize(s) for s in prediction_sampler]
        else:
            prediction_sampler = [sampling.deserialize(prediction_sampler)]
        if not all(isinstance(s, sampling.Sampler) for s in prediction_sampler):
            raise ValueError(
                "`prediction_sampler` must be None (predict with `sampler`), a "
                "keras_jem.sampling.Sampler, or a list of them run one after another (e.g. a "
                f"coarse chain, then a fine noise-free one). Received: {prediction_sampler!r}"
            )
        self.prediction_sampler = prediction_sampler or [self.sampler]
        self.prediction_init_noise = float(prediction_init_noise)
        self.state_range = _check_state_range(state_range, self.state_dim)
        self.seed = seed
        self.normalizer = keras.layers.Normalization(axis=-1, name="state_normalizer")
        self.step_center = self.add_weight(
            shape=(self.state_dim,), initializer="zeros", trainable=False, name="step_center"
        )
        self.step_scale = self.add_weight(
            shape=(self.state_dim,), initializer="ones", trainable=False, name="step_scale"
        )
        self.seed_generator = keras.random.SeedGenerator(seed, name="sampler_seed")
        self.trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("loss", "energy_data", "energy_samples", "sample_error")
        }

    def adapt(self, states, next_states=None):
        """Sets the standardisations from training transitions.

        Args:
            states: the states `s_t`, `(N, state_dim)`: fit the state standardisation.
            next_states: the next states `s_{t+1}`, `(N, state_dim)`: fit the step
                standardisation, which the "step" parameterization needs: the median of
                `s_{t+1} - s_t` per feature and its robust spread `1.4826 * median |step -
                median|` (rare large steps such as wall bounces do not inflate it; a feature
                whose spread is 0 falls back to its standard deviation, then to 1).
        """
        self.normalizer.adapt(tf.convert_to_tensor(states, tf.float32))
        if next_states is not None:
            steps = np.asarray(next_states, np.float64) - np.asarray(states, np.float64)
            center = np.median(steps, axis=0)
            scale = 1.4826 * np.median(np.abs(steps - center), axis=0)
            scale = np.where(scale > 1e-12, scale, steps.std(axis=0))
            self.step_center.assign(center.astype(np.float32))
            self.step_scale.assign(np.where(scale > 1e-12, scale, 1.0).astype(np.float32))
        elif self.parameterization == "step":
            raise ValueError(
                'A parameterization="step" TransitionEBM standardises the change of state: call '
                "adapt(states, next_states) with the training transitions."
            )

    def build(self, input_shape=None):
        if not self.normalizer.built:
            self.normalizer.build((None, self.state_dim))
        self.energy_network.build((None, 2 * self.state_dim))
        super().build(input_shape)

    def _standard(self, states):
        return (tf.cast(states, tf.float32) - self.normalizer.mean) / tf.sqrt(
            self.normalizer.variance + 1e-12
        )

    def _raw(self, standard):
        return standard * tf.sqrt(self.normalizer.variance + 1e-12) + self.normalizer.mean

    def _to_chain(self, s_next, s_t):
        """Raw next states -> the chain's coordinates (standardised state or step)."""
        if self.parameterization == "state":
            return self._standard(s_next)
        step = tf.cast(s_next, tf.float32) - tf.cast(s_t, tf.float32)
        return (step - self.step_center) / self.step_scale

    def _from_chain(self, u, s_t):
        """The chain's coordinates -> raw next states, kept in `state_range` if set."""
        if self.parameterization == "state":
            s_next = self._raw(u)
        else:
            step = u * self.step_scale + self.step_center
            s_next = tf.cast(s_t, tf.float32) + step
        if self.state_range is not None:
            s_next = tf.clip_by_value(s_next, *self.state_range)
        return s_next

    def _chain_start(self, z_t):
        """Where chains start: at `s_t` ("state") or at `s_t` plus the median step ("step")."""
        return z_t if self.parameterization == "state" else tf.zeros_like(z_t)

    def _energy_standard(self, u, z_t, training=False):
        pair = tf.concat([z_t, u], axis=-1)
        return tf.cast(self.energy_network(pair, training=training)[:, 0], tf.float32)

    def energy(self, x, y=None, training=False):
        """`E(s_t = y, s_{t+1} = x)` for raw states (the sampler's target interface)."""
        if y is None:
            raise ValueError("TransitionEBM.energy needs the current state: energy(x, y=s_t).")
        return self._energy_standard(
            self._to_chain(x, y), self._standard(y), training=training
        )

    def call(self, states, training=False):
        """The predicted next states (one Langevin draw each)."""
        return self.predict_next(states)

    def _draw(self, z_t, seed, samplers, init_noise, training=False):
        """Runs `samplers` one after another on `u -> E(z_t, u)`; returns the chain's u."""
        u = self._chain_start(z_t)
        if init_noise > 0:
            u = u + init_noise * tf.random.stateless_normal(tf.shape(z_t), seed)
        for i, sampler in enumerate(samplers):
            u = sampler.run(
                lambda v: self._energy_standard(v, z_t, training=training),
                u,
                seed=noise.fold_in(seed, i + 1),
            )
        return u

    def predict_next(self, states, seed=None):
        """Draws `s_{t+1}` for each state in `states` `(N, state_dim)` by Langevin dynamics.

        The chain is `prediction_sampler`'s (default: the training `sampler`'s); predicted
        states are clipped to `state_range` when it is set.
        """
        if seed is None:
            seed = noise.next_seed(self.seed_generator)
        states = tf.convert_to_tensor(states, tf.float32)
        u = self._draw(self._standard(states), seed, self.prediction_sampler,
                       self.prediction_init_noise)
        return self._from_chain(u, states)

    def rollout(self, states, num_steps, seed=0):
        """Feeds each prediction back in: trajectories `(N, num_steps + 1, state_dim)`."""
        path = [tf.convert_to_tensor(states, tf.float32)]
        base = tf.constant([int(seed), 0], tf.int64)
        predict = tf.function(self.predict_next)  # one trace for the whole roll-out
        for t in range(int(num_steps)):
            path.append(predict(path[-1], seed=noise.fold_in(base, t)))
        return tf.stack(path, axis=1).numpy()

    def train_step(self, data):
        s_t, s_next = data[0], data[1]
        z_t, u_pos = self._standard(s_t), self._to_chain(s_next, s_t)
        u_neg = self._draw(z_t, noise.next_seed(self.seed_generator), [self.sampler],
                           self.init_noise, training=False)
        with tf.GradientTape() as tape:
            e_pos = self._energy_standard(u_pos, z_t, training=True)
            e_neg = self._energy_standard(u_neg, z_t, training=True)
            loss = (
                tf.reduce_mean(e_pos)
                - tf.reduce_mean(e_neg)
                + self.energy_l2_weight * (tf.reduce_mean(e_pos**2) + tf.reduce_mean(e_neg**2))
            )
        variables = self.energy_network.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        z_neg = self._standard(self._from_chain(u_neg, s_t))
        error = tf.reduce_mean(tf.reduce_sum(tf.square(z_neg - self._standard(s_next)), axis=-1))
        for name, value in (("loss", loss), ("energy_data", tf.reduce_mean(e_pos)),
                            ("energy_samples", tf.reduce_mean(e_neg)), ("sample_error", error)):
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def get_config(self):
        config = super().get_config()
        config.update({
            "state_dim": self.state_dim,
            "energy_network": keras.saving.serialize_keras_object(self.energy_network),
            "sampler": sampling.serialize(self.sampler),
            "init_noise": self.init_noise,
            "energy_l2_weight": self.energy_l2_weight,
            "parameterization": self.parameterization,
            "prediction_sampler": [sampling.serialize(s) for s in self.prediction_sampler],
            "prediction_init_noise": self.prediction_init_noise,
            "state_range": (
                None if self.state_range is None
                else [[float(v) for v in bound] for bound in self.state_range]
            ),
            "seed": self.seed,
        })
        return config
