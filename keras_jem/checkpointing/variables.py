"""What a step backup holds, in order, and the checks of a checkpoint against a model.

The checkpoint holds flat variable lists (see `keras_jem.checkpointing`): `model.weights`, the
states of the model's `SeedGenerator`s and `optimizer.variables`, compared by shape, in order.
"""

import keras


class IncompatibleCheckpointError(ValueError):
    """A checkpoint that was written by a different model (or optimizer)."""


def variable_signature(model):
    """`[[name, shape], ...]` of the model's weights then its optimizer's variables, in order.

    Checkpoints are compared by shapes, in order; the names (which may carry per-session unique
    prefixes such as `jem_1`) only label messages.
    """
    return [[v.name, list(v.shape)] for v in model_weights(model) + optimizer_variables(model)]


def seed_generator_states(model):
    """The state variables of every `keras.random.SeedGenerator` of `model`.

    `model.variables` lists the weights and the seed generator states; `model.weights` only
    the former.
    """
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def model_weights(model):
    """The model's weights (trainable and not), in `model.weights` order."""
    return list(model.weights)


def optimizer_variables(model):
    """The optimizer's variables in order, or `[]` while it is missing or not built."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        return []
    return list(optimizer.variables)


def non_finite_variables(variables):
    """Names of the floating-point `variables` holding a NaN or an infinity.

    One reduction per variable on its device and a single transfer of the verdicts, so the
    check costs a read of the weights, not a copy of them to the host.
    """
    floats = [v for v in variables if "float" in str(v.dtype)]
    if not floats:
        return []
    finite = keras.ops.convert_to_numpy(keras.ops.stack(
        [keras.ops.all(keras.ops.isfinite(v)) for v in floats]))
    return [v.path if hasattr(v, "path") else v.name for v, ok in zip(floats, finite) if not ok]


def signature_differences(saved, current, limit=4):
    """Readable differences between two `variable_signature`s (the first `limit` of them).

    Args:
        saved: the signature stored in the checkpoint.
        current: the model's signature.
        limit: how many differences to name.
    """
    lines = []
    if len(saved) != len(current):
        lines.append(f"the checkpoint holds {len(saved)} variables, the model {len(current)}")
    for index, (old, new) in enumerate(zip(saved, current)):
        if old[1] != new[1]:
            lines.append(f"variable {index} is {old[0]} {tuple(old[1])} in the checkpoint, "
                         f"{new[0]} {tuple(new[1])} in the model")
    more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more
