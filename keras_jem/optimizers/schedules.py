"""Learning-rate schedules used by the papers' training scripts."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_jem")
class WarmupPiecewiseConstant(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0, then a constant rate multiplied by `factor` at each boundary.

    This is the schedule of the JEM-family scripts: e.g. JEM warms up over 1000 iterations and
    multiplies the rate by 0.3 at epochs 160 and 180 (boundaries are in optimizer steps; the
    training CLI converts epochs to steps).

    Args:
        learning_rate: the rate after warm-up.
        warmup_steps: number of warm-up steps (0 for none).
        boundaries: increasing list of steps at which the rate is multiplied by `factor`.
        factor: the multiplier per boundary.

    Example:

    >>> schedule = WarmupPiecewiseConstant(1e-4, warmup_steps=1000,
    ...                                    boundaries=[160 * 703, 180 * 703], factor=0.3)
    >>> optimizer = keras.optimizers.Adam(schedule)
    """

    def __init__(self, learning_rate, warmup_steps=0, boundaries=(), factor=0.1, name=None):
        if learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be positive. Received: {learning_rate}")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0. Received: {warmup_steps}")
        boundaries = [int(b) for b in boundaries]
        if boundaries != sorted(boundaries):
            raise ValueError(f"`boundaries` must be increasing. Received: {boundaries}")
        self.learning_rate = float(learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = boundaries
        self.factor = float(factor)
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        rate = ops.convert_to_tensor(self.learning_rate, "float32")
        for boundary in self.boundaries:
            rate = ops.where(step >= boundary, rate * self.factor, rate)
        if self.warmup_steps > 0:
            rate = rate * ops.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return rate

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "boundaries": self.boundaries,
            "factor": self.factor,
            "name": self.name,
        }
