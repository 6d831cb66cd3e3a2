"""The two steps every keras-jem `train_step` shares: SAM's second pass and coupled weight decay.

`keras_jem.models.EnergyModel` and `SharpnessAwareModel` both call these functions, so the
perturb/re-differentiate/restore sequence and the weight-decay scaling live in one place.
"""

import tensorflow as tf


def non_trainable_state(layer):
    """Non-trainable variables that a forward pass in training mode updates (BatchNorm moments)."""
    return [v for v in layer.non_trainable_variables if "moving" in v.path or "running" in v.path]


def sharpness_aware_gradients(sam, variables, gradients, compute_gradients, state_layer):
    """SAM's second pass: the gradients at the perturbed weights `w + e(w)`.

    Moves `variables` to `w + e(w)` (`sam.perturb`, from the first pass's `gradients`), calls
    `compute_gradients()` there, then restores the weights exactly and puts back the BatchNorm
    moving statistics of `state_layer`, so that only the first pass updates them (SADA-JEM).

    Args:
        sam: a `keras_jem.optimizers.SAM`.
        variables: the trainable variables.
        gradients: the first pass's gradients (loss-scaled and per replica, as the optimizer
            receives them: `SAM` normalises them, so the scale does not matter).
        compute_gradients: a function of no argument returning the gradients at the current
            weights, in the same order as `variables`.
        state_layer: the layer whose moving statistics the second pass must not change.

    Returns:
        The second pass's gradients.

    Example:

    >>> gradients = sharpness_aware_gradients(
    ...     SAM(rho=2.0, adaptive=True), variables, gradients, second_pass, model.backbone)
    """
    backup = sam.perturb(variables, gradients)
    moments = non_trainable_state(state_layer)
    saved_moments = [tf.identity(v) for v in moments]
    gradients = compute_gradients()
    sam.restore(variables, backup)
    for variable, value in zip(moments, saved_moments):
        variable.assign(value)
    return gradients


def add_coupled_weight_decay(optimizer, gradients, variables, weight_decay):
    """Adds the gradient of `weight_decay / 2 * ||w||^2` to loss-scaled per-replica gradients.

    This is PyTorch's `SGD(weight_decay=...)` (the papers' scripts): the decay goes through
    momentum and Adam's moments, unlike Keras' decoupled `weight_decay` optimizer argument.

    The gradients a `train_step` hands to the optimizer are those of
    `optimizer.scale_loss(loss / num_replicas)` on each replica; the optimizer sums them over the
    replicas and divides by the loss scale. The decay term is put in the same units
    (`weight_decay * w * loss_scale / num_replicas`), so that the optimizer applies exactly
    `weight_decay * w` once, whatever the replica count and the mixed-precision loss scale.

    Args:
        optimizer: the Keras optimizer (a `LossScaleOptimizer` under `mixed_float16`).
        gradients: list of gradients (None where a variable gets none).
        variables: the matching variables.
        weight_decay: the L2 coefficient (0: the gradients are returned unchanged).

    Returns:
        The list of gradients with the decay added.

    Example:

    >>> gradients = add_coupled_weight_decay(model.optimizer, gradients, variables, 5e-4)
    >>> model.optimizer.apply(gradients, variables)
    """
    if not weight_decay:
        return gradients
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    # `scale_loss` multiplies by the dynamic loss scale of a LossScaleOptimizer (or the
    # optimizer's `loss_scale_factor`) and is the identity otherwise.
    factor = optimizer.scale_loss(tf.constant(float(weight_decay), tf.float32))
    if replicas > 1:
        factor = factor / replicas
    return [
        g if g is None else g + tf.cast(factor, g.dtype) * tf.cast(v, g.dtype)
        for g, v in zip(gradients, variables)
    ]
