"""An energy over state transitions, sampled by Langevin dynamics (IGEBM's trajectory model)."""

import keras
import tensorflow as tf

from keras_jem import sampling
from keras_jem.sampling import noise


def default_energy_network(hidden_units=(256, 256), name="transition_energy"):
    """An MLP `(batch, 2 * state_dim) -> (batch, 1)` with swish activations."""
    layers = [keras.layers.Dense(units, activation="swish") for units in hidden_units]
    return keras.Sequential([*layers, keras.layers.Dense(1)], name=name)


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

    with positives `s+ = s_{t+1}` from the data and negatives `s-` drawn by the sampler from
    `s_t + init_noise * N(0, I)` (short-run chains; states need no replay buffer). The states are
    standardised inside the model (`adapt` on training states first), so the sampler's step and
    noise are in units of each feature's standard deviation.

    Args:
        state_dim: size of a state vector.
        energy_network: a Keras model `(batch, 2 * state_dim) -> (batch, 1)` (default: an MLP
            with two hidden layers of 256 swish units).
        sampler: a `keras_jem.sampling.Sampler` (default `SGLD(num_steps=20, step_size=0.05,
            noise_scale=0.01, gradient_clip=1.0)`, in standardised units).
        init_noise: standard deviation (standardised units) of the chains' start around `s_t`.
        energy_l2_weight: weight of the energy magnitude penalty (IGEBM: 1.0).
        seed: seed of the sampler's noise.

    Example:

    >>> system = keras_jem.data.particles.BouncingParticles()
    >>> s_t, s_next = keras_jem.data.particles.transitions(system.simulate(2000, 50))
    >>> model = keras_jem.models.TransitionEBM(state_dim=s_t.shape[1])
    >>> model.adapt(s_t)
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> model.fit(s_t, s_next, batch_size=128, epochs=5)
    >>> paths = model.rollout(s_t[:100], num_steps=100)      # (100, 101, state_dim)
    """

    def __init__(
        self,
        state_dim,
        energy_network=None,
        sampler=None,
        init_noise=0.1,
        energy_l2_weight=1.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(state_dim) != state_dim or state_dim < 1:
            raise ValueError(f"`state_dim` must be a positive integer. Received: {state_dim}")
        if init_noise < 0 or energy_l2_weight < 0:
            raise ValueError(
                "`init_noise` and `energy_l2_weight` must be non-negative. Received: "
                f"init_noise={init_noise}, energy_l2_weight={energy_l2_weight}"
            )
        self.state_dim = int(state_dim)
        if isinstance(energy_network, dict):
            energy_network = keras.saving.deserialize_keras_object(energy_network)
        self.energy_network = energy_network or default_energy_network()
        sampler = sampling.deserialize(sampler)
        self.sampler = sampler or sampling.SGLD(
            num_steps=20, step_size=0.05, noise_scale=0.01, gradient_clip=1.0
        )
        if not isinstance(self.sampler, sampling.Sampler):
            raise ValueError(  # noqa: TRY004 (ValueError is the keras-jem API's error here)
                f"`sampler` must be a keras_jem.sampling.Sampler. Received: {sampler!r}"
            )
        self.init_noise = float(init_noise)
        self.energy_l2_weight = float(energy_l2_weight)
        self.seed = seed
        self.normalizer = keras.layers.Normalization(axis=-1, name="state_normalizer")
        self.seed_generator = keras.random.SeedGenerator(seed, name="sampler_seed")
        self.trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("loss", "energy_data", "energy_samples", "sample_error")
        }

    def adapt(self, states):
        """Sets the standardisation from training states `(N, state_dim)`."""
        self.normalizer.adapt(tf.convert_to_tensor(states, tf.float32))

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

    def _energy_standard(self, z_next, z_t, training=False):
        pair = tf.concat([z_t, z_next], axis=-1)
        return tf.cast(self.energy_network(pair, training=training)[:, 0], tf.float32)

    def energy(self, x, y=None, training=False):
        """`E(s_t = y, s_{t+1} = x)` for raw states (the sampler's target interface)."""
        if y is None:
            raise ValueError("TransitionEBM.energy needs the current state: energy(x, y=s_t).")
        return self._energy_standard(self._standard(x), self._standard(y), training=training)

    def call(self, states, training=False):
        """The predicted next states (one Langevin draw each)."""
        return self.predict_next(states)

    def _draw(self, z_t, seed, training=False):
        start = z_t + self.init_noise * tf.random.stateless_normal(tf.shape(z_t), seed)
        return self.sampler.run(
            lambda z: self._energy_standard(z, z_t, training=training),
            start,
            seed=noise.fold_in(seed, 1),
        )

    def predict_next(self, states, seed=None):
        """Draws `s_{t+1}` for each state in `states` `(N, state_dim)` by Langevin dynamics."""
        if seed is None:
            seed = noise.next_seed(self.seed_generator)
        z_t = self._standard(tf.convert_to_tensor(states, tf.float32))
        return self._raw(self._draw(z_t, seed))

    def rollout(self, states, num_steps, seed=0):
        """Feeds each prediction back in: trajectories `(N, num_steps + 1, state_dim)`."""
        path = [tf.convert_to_tensor(states, tf.float32)]
        base = tf.constant([int(seed), 0], tf.int64)
        for t in range(int(num_steps)):
            path.append(self.predict_next(path[-1], seed=noise.fold_in(base, t)))
        return tf.stack(path, axis=1).numpy()

    def train_step(self, data):
        s_t, s_next = data[0], data[1]
        z_t, z_next = self._standard(s_t), self._standard(s_next)
        z_neg = self._draw(z_t, noise.next_seed(self.seed_generator))
        with tf.GradientTape() as tape:
            e_pos = self._energy_standard(z_next, z_t, training=True)
            e_neg = self._energy_standard(z_neg, z_t, training=True)
            loss = (
                tf.reduce_mean(e_pos)
                - tf.reduce_mean(e_neg)
                + self.energy_l2_weight * (tf.reduce_mean(e_pos**2) + tf.reduce_mean(e_neg**2))
            )
        variables = self.energy_network.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        error = tf.reduce_mean(tf.reduce_sum(tf.square(z_neg - z_next), axis=-1))
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
            "seed": self.seed,
        })
        return config
