"""Sharpness-aware minimisation (SAM) and its adaptive variant (ASAM)."""

import keras
import tensorflow as tf


def _all_reduce_mean(gradients):
    """Gradients of the global batch under `tf.distribute` (identity on one replica).

    Each replica's loss is already divided by the replica count, so the sum over replicas is the
    gradient of the mean loss over the global batch.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return gradients
    return context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)


@keras.saving.register_keras_serializable(package="keras_jem")
class SAM:
    """The weight perturbation of SAM (Foret et al., 2021) and ASAM (Kwon et al., 2021).

    SAM minimises the loss at the worst nearby weights `w + e(w)`. One training step is two
    forward/backward passes: gradients `g` at `w`, perturb `w <- w + e(w)`, gradients at the
    perturbed point, restore `w` exactly, and let the optimizer apply the second gradients.

    - SAM: `e(w) = rho * g / ||g||`, with the global L2 norm over all variables;
    - ASAM (`adaptive=True`): `e(w) = rho * w^2 * g / || |w| * g ||`.

    SADA-JEM runs ASAM with `rho=2.0` (its code turns `adaptive` on for `rho >= 0.5`). Under
    `tf.distribute` the perturbation is computed from the all-reduced (global-batch) gradient, so
    every replica perturbs identically.

    This object holds no variables; models call `perturb` and `restore` inside `train_step`
    (see `JEM(sam=...)` and `SharpnessAwareModel`).

    Args:
        rho: radius of the neighbourhood (SAM: 0.05; ASAM typically 0.5-2.0).
        adaptive: use ASAM's scale-invariant neighbourhood.
        epsilon: added to the norm to avoid division by zero.

    Example:

    >>> sam = SAM(rho=2.0, adaptive=True)
    >>> backup = sam.perturb(model.trainable_variables, gradients)
    >>> # ... second forward/backward at the perturbed weights ...
    >>> sam.restore(model.trainable_variables, backup)
    """

    def __init__(self, rho=0.05, adaptive=False, epsilon=1e-12):
        if not rho > 0:
            raise ValueError(f"`rho` must be positive. Received: rho={rho}")
        if not epsilon > 0:
            raise ValueError(f"`epsilon` must be positive. Received: epsilon={epsilon}")
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        self.epsilon = float(epsilon)

    def perturbations(self, variables, gradients):
        """The perturbation `e(w)` of each variable (zeros where a gradient is None)."""
        gradients = _all_reduce_mean(
            [tf.zeros_like(v) if g is None else tf.cast(g, v.dtype)
             for v, g in zip(variables, gradients)]
        )
        values = [tf.convert_to_tensor(v) for v in variables]
        if self.adaptive:
            scaled = [tf.abs(w) * g for w, g in zip(values, gradients)]
        else:
            scaled = gradients
        norm = tf.linalg.global_norm(scaled)
        scale = self.rho / (norm + self.epsilon)
        if self.adaptive:
            return [tf.square(w) * g * scale for w, g in zip(values, gradients)]
        return [g * scale for g in gradients]

    def perturb(self, variables, gradients):
        """Moves `variables` to `w + e(w)`; returns a backup for `restore`."""
        backup = [tf.identity(v) for v in variables]
        for variable, value, delta in zip(
            variables, backup, self.perturbations(variables, gradients)
        ):
            variable.assign(value + delta)
        return backup

    def restore(self, variables, backup):
        """Puts the variables back to their exact values before `perturb`."""
        for variable, value in zip(variables, backup):
            variable.assign(value)

    def get_config(self):
        return {"rho": self.rho, "adaptive": self.adaptive, "epsilon": self.epsilon}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"SAM(rho={self.rho}, adaptive={self.adaptive})"


def deserialize(sam):
    if sam is None or isinstance(sam, SAM):
        return sam
    if isinstance(sam, dict) and "class_name" not in sam:
        return SAM(**sam)
    return keras.saving.deserialize_keras_object(sam)
