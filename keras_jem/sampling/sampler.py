"""The sampler interface shared by every method."""

import keras


class Sampler:
    """Base class of the MCMC samplers (SGLD and its variants).

    A sampler moves a batch of images toward low energy under a target. The target is any object
    with a method `energy(x, y=None, training=False)` returning one energy per example (every
    keras-jem model is one). Samplers run entirely in-graph (a `tf.while_loop`), never record a
    gradient with respect to the model weights, and return `tf.stop_gradient`-ed samples, so they
    can be called inside `train_step` without growing the training tape.

    Subclasses implement `__call__(target, x, y=None, seed=None, training=False)` and name
    their constructor arguments in `config_names` (each stored as the attribute of that name),
    from which `get_config()` is built.

    Args:
        num_steps: number of sampler steps per call.
    """

    config_names = ("num_steps",)

    def __init__(self, num_steps=20):
        if int(num_steps) != num_steps or num_steps < 0:
            raise ValueError(
                f"`num_steps` must be a non-negative integer. Received: num_steps={num_steps}"
            )
        self.num_steps = int(num_steps)

    def __call__(self, target, x, y=None, seed=None, training=False, num_steps=None):
        raise NotImplementedError

    def get_config(self):
        """The constructor arguments named in `config_names` (tuples as lists, for JSON)."""
        config = {}
        for name in self.config_names:
            value = getattr(self, name)
            config[name] = list(value) if isinstance(value, tuple) else value
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{self.__class__.__name__}({args})"


def _check_positive(name, value, allow_zero=True, allow_none=False):
    if value is None and allow_none:
        return value
    if value is None or value < 0 or (value == 0 and not allow_zero):
        expected = "a non-negative number" if allow_zero else "a positive number"
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={value}")
    return float(value)


def _check_range(clip_range):
    if clip_range is None:
        return None
    try:
        low, high = (float(v) for v in clip_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"`clip_range` must be None or a pair (low, high). Received: clip_range={clip_range}"
        )
    if not low < high:
        raise ValueError(
            f"`clip_range` must satisfy low < high. Received: clip_range={clip_range}"
        )
    return (low, high)


def serialize(sampler):
    return keras.saving.serialize_keras_object(sampler)


def deserialize(config):
    if config is None or isinstance(config, Sampler):
        return config
    return keras.saving.deserialize_keras_object(config)
