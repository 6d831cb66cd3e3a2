"""Adam whose gradient elements are clipped to a few running standard deviations (IGEBM)."""

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="keras_jem")
class ClippedAdam(keras.optimizers.Adam):
    """Adam that first clips each gradient element to `+-(clip_std * sqrt(v_hat) + clip_offset)`.

    The IGEBM paper's code (Du & Mordatch, 2019: `custom_adam.py` in `openai/ebm_code_release`)
    trains its energy network with this rule: before the usual Adam update, each element of the
    gradient is clipped by the running estimate of its own standard deviation,

    ```
    t = iterations + 1
    bound = clip_std * sqrt(v_{t-1} / (1 - beta_2^t)) + clip_offset
    g = clip(g, -bound, bound)
    m_t = beta_1 m_{t-1} + (1 - beta_1) g
    v_t = beta_2 v_{t-1} + (1 - beta_2) g^2
    w = w - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) * m_t / (sqrt(v_t) + epsilon)
    ```

    `v_{t-1}` is the second moment before this step's update and the bias correction uses this
    step's `t`, exactly as the original (so on the first step, where `v = 0`, every element is
    clipped to `+-clip_offset`). A single gradient spike from a bad batch of negatives then moves
    the weights by at most a few of their usual steps. The update after clipping is Keras' Adam,
    which already uses the same "epsilon hat" form as TF 1's `AdamOptimizer`.

    No maintained optimizer implements this rule (Keras' `clipvalue` clips by a constant and
    `clipnorm` by a norm), hence this small subclass.

    Args:
        learning_rate: as `keras.optimizers.Adam` (IGEBM: 3e-4 on CIFAR-10).
        beta_1: IGEBM uses 0.0 (no momentum).
        beta_2: 0.999.
        epsilon: 1e-8, the original's.
        clip_std: how many running standard deviations an element may reach (3.0).
        clip_offset: added to the bound, so that elements with tiny history can still move (0.1).
        **kwargs: any other `keras.optimizers.Adam` / `Optimizer` argument (`amsgrad` excepted).

    Example:

    >>> optimizer = keras_jem.optimizers.ClippedAdam(3e-4, beta_1=0.0, beta_2=0.999)
    >>> model.compile(optimizer=optimizer)
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.0,
        beta_2=0.999,
        epsilon=1e-8,
        clip_std=3.0,
        clip_offset=0.1,
        name="clipped_adam",
        **kwargs,
    ):
        if kwargs.get("amsgrad"):
            raise ValueError(
                "ClippedAdam does not support amsgrad=True (the IGEBM rule clips with the plain "
                "second moment). Use keras.optimizers.Adam(amsgrad=True) instead."
            )
        kwargs.pop("amsgrad", None)
        if not clip_std >= 0:
            raise ValueError(f"`clip_std` must be non-negative. Received: clip_std={clip_std}")
        if not clip_offset > 0:
            raise ValueError(
                f"`clip_offset` must be positive (a zero bound would freeze the first step). "
                f"Received: clip_offset={clip_offset}"
            )
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            name=name,
            **kwargs,
        )
        self.clip_std = float(clip_std)
        self.clip_offset = float(clip_offset)

    def update_step(self, gradient, variable, learning_rate):
        if isinstance(gradient, tf.IndexedSlices):
            # A gather's (embedding, per-class table) sparse gradient: the bound is per
            # element of the whole variable, so clip the dense gradient (duplicates summed).
            gradient = tf.convert_to_tensor(gradient)
        gradient = ops.cast(gradient, variable.dtype)
        local_step = ops.cast(self.iterations + 1, variable.dtype)
        beta_2_power = ops.power(ops.cast(self.beta_2, variable.dtype), local_step)
        v = self._velocities[self._get_variable_index(variable)]
        bound = self.clip_std * ops.sqrt(ops.divide(v, 1 - beta_2_power)) + self.clip_offset
        gradient = ops.clip(gradient, -bound, bound)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config.pop("amsgrad", None)
        config.update({"clip_std": self.clip_std, "clip_offset": self.clip_offset})
        return config
