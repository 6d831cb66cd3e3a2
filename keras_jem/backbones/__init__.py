"""Backbones: Keras layers mapping images (B, H, W, C) to features (B, feature_dim).

Any Keras layer or model with that output is a backbone (see `keras_jem.backbones.backbone`
for the contract and the optional `stem` / `call_from_stem` capability). keras-jem's own
backbones subclass `Backbone` and expose `feature_dim`, `stem(x)` (the first convolution's
output) and `call_from_stem(h, training=False)`, with `backbone(x) == backbone.call_from_stem(
backbone.stem(x))`.
"""

import keras

from keras_jem.backbones.backbone import Backbone
from keras_jem.backbones.layers import FanInUniform
from keras_jem.backbones.layers import SpectralConv2D
from keras_jem.backbones.layers import TorchConv2D
from keras_jem.backbones.layers import TorchDense
from keras_jem.backbones.resnet_energy import SNResBlock
from keras_jem.backbones.resnet_energy import SNResNet
from keras_jem.backbones.small_cnn import SmallCNN
from keras_jem.backbones.wide_resnet import WideResNet
from keras_jem.backbones.wide_resnet import WideResNetBlock

_PRESETS = {
    "wrn": (WideResNet, {}),
    "wrn-28-10": (WideResNet, {"depth": 28, "width": 10}),
    "wrn-16-2": (WideResNet, {"depth": 16, "width": 2}),
    "wrn-16-8": (WideResNet, {"depth": 16, "width": 8}),
    "small_cnn": (SmallCNN, {}),
    "sn_resnet": (SNResNet, {}),
}


def names():
    """The names accepted by `get`."""
    return tuple(_PRESETS)


def get(name, **kwargs):
    """Builds a backbone from a registry name.

    Args:
        name: one of "wrn" (pass `depth`/`width`), "wrn-28-10", "wrn-16-2", "wrn-16-8",
            "small_cnn", "sn_resnet" (case-insensitive). A `keras.layers.Layer` instance is
            returned unchanged (kwargs must then be empty).
        **kwargs: constructor arguments (e.g. `norm="batch"`). For the "wrn-D-K" names,
            `depth`/`width` are fixed by the name and may not be passed.

    Returns:
        A new backbone layer.

    Example:

    >>> backbone = get("wrn-16-2", norm="batch")
    >>> backbone = get("wrn", depth=10, width=1)
    """
    if isinstance(name, keras.layers.Layer):
        if kwargs:
            raise ValueError(
                "`get` received a layer instance together with keyword arguments "
                f"{sorted(kwargs)}; configure the layer when creating it instead."
            )
        return name
    key = name.lower() if isinstance(name, str) else name
    if key not in _PRESETS:
        raise ValueError(f"Unknown backbone name: {name!r}. Valid names: {', '.join(_PRESETS)}.")
    cls, preset = _PRESETS[key]
    clashes = sorted(set(preset) & set(kwargs))
    if clashes:
        raise ValueError(
            f"Backbone {name!r} fixes {', '.join(f'{k}={preset[k]}' for k in clashes)}; "
            f"received {', '.join(f'{k}={kwargs[k]!r}' for k in clashes)}. Use the name "
            "'wrn' with explicit `depth` and `width` instead."
        )
    return cls(**preset, **kwargs)


__all__ = [
    "Backbone",
    "FanInUniform",
    "SNResBlock",
    "SNResNet",
    "SmallCNN",
    "SpectralConv2D",
    "TorchConv2D",
    "TorchDense",
    "WideResNet",
    "WideResNetBlock",
    "get",
    "names",
]
