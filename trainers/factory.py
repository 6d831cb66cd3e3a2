"""The trainers' factory: model, backbone, sampler and optimizer objects from a resolved config.

Each builder hands the keyword arguments of its section (`presets.sections`) straight to the
constructor, so the constructors' own checks are the validation: a bad value stops here, before
any data is loaded. `python -m trainers.fit` and `python -m tools.bench` build through it.

Example:

>>> from trainers import factory, presets
>>> config = presets.resolve("jem", "digits", {"num_steps": 5})  # doctest: +SKIP
>>> model = factory.build_model(config, num_classes=10)  # doctest: +SKIP
"""

import inspect

from trainers import presets

#: The `--optimizer` choices.
OPTIMIZERS = ("adam", "clipped_adam", "sgd")
#: The `--sampler` choices: the `keras_jem.sampling` class each names (GMMC always uses its
#: `LatentTargetSampler`).
SAMPLERS = {"sgld": "SGLD", "proximal": "ProximalSGLD"}
#: The `--backbone` choices: the `keras_jem.backbones` class each names (IGEBM always builds an
#: `SNResNet`); `BACKBONE_FLAGS` lists the flags each reads.
BACKBONES = {"small_cnn": "SmallCNN", "wrn": "WideResNet"}


class ConfigError(ValueError):
    """A setting that cannot work; raised before any data is loaded."""


def _constructed(description, constructor, **kwargs):
    """`constructor(**kwargs)`, its ValueError/TypeError re-raised as a ConfigError."""
    try:
        return constructor(**kwargs)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{description}: {error}") from error


def sampler_class(config):
    """The `keras_jem.sampling` class `config` builds (GMMC: `LatentTargetSampler`)."""
    from keras_jem import sampling

    if config["model"] == "gmmc":
        return sampling.LatentTargetSampler
    return getattr(sampling, SAMPLERS.get(config["sampler"], "SGLD"))


def _backbone_key(config):
    """The `BACKBONE_FLAGS` key of `config`: "igebm" (always an SNResNet) or `--backbone`."""
    return "igebm" if config["model"] == "igebm" else config["backbone"]


def build_sampler(config):
    """The sampler of `config` (GMMC: the latent-target sampler)."""

    kwargs = presets.sections(config)["sampler"]
    name = kwargs.pop("name")
    if kwargs.get("noise_first") and (config["model"] == "gmmc" or name == "proximal"):
        used = "GMMC's latent-target sampler" if config["model"] == "gmmc" else "--sampler proximal"
        raise ConfigError(
            f"--noise_first applies to the SGLD sampler only; {used} has no such option. "
            "Drop --noise_first, or use --sampler sgld."
        )
    if config["model"] != "gmmc" and name not in SAMPLERS:
        raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}. Received: {name!r}")
    cls = sampler_class(config)
    # The section holds every sampler's settings; the class takes those its signature names.
    keys = [key for key in inspect.signature(cls).parameters if key in kwargs]
    return _constructed(f"--sampler {name} ({cls.__name__})", cls,
                        **{key: kwargs[key] for key in keys})


# The backbone flags each backbone reads (IGEBM always builds an SNResNet): `build_backbone`
# passes their settings, `unused_flags` refuses the others.
BACKBONE_FLAGS = {
    "small_cnn": ("backbone", "norm", "dropout_rate"),
    "wrn": ("backbone", "depth", "width", "norm", "dropout_rate"),
    "igebm": ("conditional", "sn_filters", "sn_num_blocks", "sn_pooling", "dropout_rate"),
}


def unused_flags(config, names):
    """The flags among `names` that the run of `config` would not read, each with why.

    A flag the chosen model, sampler or backbone takes no argument for would otherwise be
    ignored without a word (e.g. `--px_weight` for IGEBM, `--inner_steps` for SGLD).

    Args:
        config: a resolved config (`presets.resolve`).
        names: flag names, e.g. those the user gave.

    Returns:
        A list of messages, one per unused flag (empty when every flag is read).
    """
    model = config["model"]
    sampler = sampler_class(config)
    sampler_name = ("GMMC's latent-target sampler" if model == "gmmc"
                    else f"--sampler {config['sampler']} ({sampler.__name__})")
    backbone = _backbone_key(config)
    sampler_arguments = inspect.signature(sampler).parameters
    owners = {name: owner for owner, owned in presets.MODEL_SETTINGS.items() for name in owned}
    messages = []
    for name in names:
        flag = presets.FLAGS.get(name)
        if flag is None:
            continue
        if owners.get(name, model) != model:
            messages.append(f"--{name} only applies to --model {owners[name]}. Received: "
                            f"--model {model}.")
        elif flag.section == "model" and flag.key not in presets.MODEL_ARGUMENTS[model]:
            messages.append(f"--{name} does not apply to --model {model}.")
        elif flag.section == "sampler" and name == "sampler" and model == "gmmc":
            messages.append("--sampler does not apply to --model gmmc, which always uses its "
                            "latent-target sampler.")
        elif (flag.section == "sampler" and name != "sampler"
              and flag.key not in sampler_arguments):
            messages.append(f"--{name} does not apply to {sampler_name}, which takes no "
                            f"`{flag.key}`.")
        elif flag.section == "backbone" and name not in BACKBONE_FLAGS.get(backbone, (name,)):
            what = ("--model igebm (always an SNResNet)" if backbone == "igebm"
                    else f"--backbone {backbone}")
            messages.append(f"--{name} does not apply to {what}.")
        elif flag.section == "sam" and name != "sam_rho" and not config["sam_rho"]:
            messages.append(f"--{name} does not apply without SAM: give --sam_rho > 0 too.")
    return messages


def build_sam(config):
    """`keras_jem.optimizers.SAM` of the "sam" section, or None when its radius is 0."""
    from keras_jem.optimizers import SAM

    kwargs = presets.sections(config)["sam"]
    if not kwargs["rho"]:
        return None
    return _constructed("SAM (--sam_rho, --sam_adaptive)", SAM, **kwargs)


def build_backbone(config, num_classes=None):
    """The backbone of `config`: IGEBM's SNResNet, or SmallCNN / WideResNet by name.

    Each class gets the settings of its `BACKBONE_FLAGS` (the flags `unused_flags` accepts).
    """
    from keras_jem import backbones

    kwargs = presets.sections(config)["backbone"]
    backbone = _backbone_key(config)
    if backbone not in BACKBONE_FLAGS:
        raise ConfigError(
            f"--backbone must be one of {', '.join(BACKBONES)}. Received: {backbone!r}")
    arguments = {presets.FLAGS[flag].key: kwargs[presets.FLAGS[flag].key]
                 for flag in BACKBONE_FLAGS[backbone] if flag not in ("backbone", "conditional")}
    if backbone == "igebm":
        if kwargs["conditional"] and num_classes is None:
            raise ValueError("A conditional IGEBM backbone needs the number of classes.")
        return _constructed("the IGEBM backbone (SNResNet)", backbones.SNResNet,
                            num_classes=num_classes if kwargs["conditional"] else None,
                            **arguments)
    cls = getattr(backbones, BACKBONES[backbone])
    return _constructed(f"--backbone {backbone} ({cls.__name__})", cls, **arguments)


def model_class(name):
    import keras_jem

    return {"softmax": keras_jem.JEM, "jem": keras_jem.JEM, "jempp": keras_jem.JEMPP,
            "sadajem": keras_jem.SADAJEM, "gmmc": keras_jem.GMMC, "igebm": keras_jem.IGEBM}[name]


def build_model(config, num_classes, backbone=None):
    """The (unbuilt) model of `config`: the "model" section plus backbone, sampler and SAM.

    Args:
        config: a resolved config (`presets.resolve`).
        num_classes: int.
        backbone: optional backbone to use instead of the one `config` describes (e.g. the
            WRN variants `tools.bench` times).
    """
    name = config["model"]
    cls = model_class(name)
    kwargs = presets.sections(config)["model"]
    if backbone is None:
        backbone = build_backbone(config, num_classes)
    sampler = build_sampler(config)
    if name == "igebm":
        return _constructed("--model igebm", cls, backbone=backbone, sampler=sampler,
                            seed=config["seed"], **kwargs)
    return _constructed(f"--model {name}", cls, backbone=backbone, num_classes=num_classes,
                        sampler=sampler, sam=build_sam(config), seed=config["seed"], **kwargs)


def parse_epochs(text):
    """`"60,120"` -> `[60, 120]`; `""` -> `[]`."""
    if text is None or str(text).strip() == "":
        return []
    try:
        return sorted(int(e) for e in str(text).split(","))
    except ValueError:
        raise ConfigError(
            f"--decay_epochs must be comma-separated integers, e.g. '160,180'. Received: {text!r}"
        ) from None


def build_optimizer(config, steps_per_epoch):
    """The Keras optimizer of the "optimizer" section with its warm-up/step schedule.

    "name" picks `keras.optimizers.Adam` ("adam"), `keras_jem.optimizers.ClippedAdam`
    ("clipped_adam", IGEBM's) or `keras.optimizers.SGD` ("sgd").
    """
    import keras

    from keras_jem.optimizers import ClippedAdam
    from keras_jem.optimizers import WarmupPiecewiseConstant

    kwargs = presets.sections(config)["optimizer"]
    boundaries = [e * steps_per_epoch for e in parse_epochs(kwargs["decay_epochs"])]
    schedule = WarmupPiecewiseConstant(
        kwargs["learning_rate"], warmup_steps=kwargs["warmup_steps"], boundaries=boundaries,
        factor=kwargs["decay_factor"],
    )
    extra = {"clipnorm": kwargs["clipnorm"]} if kwargs["clipnorm"] else {}
    name = kwargs["name"]
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"Unknown --optimizer {name!r}. Expected one of: {', '.join(OPTIMIZERS)}.")
    if name == "sgd":
        return keras.optimizers.SGD(schedule, momentum=kwargs["momentum"], **extra)
    if name == "clipped_adam":
        # IGEBM's Adam (official custom_adam.py): each gradient element clipped to
        # +-(3 sqrt(v_hat) + 0.1) before the update.
        return ClippedAdam(schedule, beta_1=kwargs["beta_1"], beta_2=kwargs["beta_2"], **extra)
    return keras.optimizers.Adam(schedule, beta_1=kwargs["beta_1"], beta_2=kwargs["beta_2"],
                                 **extra)
