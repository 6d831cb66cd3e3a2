"""Hyperparameter presets: keyword arguments handed straight to the constructors.

A preset is a dict of sections, each holding the keyword arguments of what it configures:

    "model":     the model class (`keras_jem.JEM`, `JEMPP`, `SADAJEM`, `GMMC`, `IGEBM`)
    "sampler":   the sampler class (`keras_jem.sampling.SGLD`, `ProximalSGLD`,
                 `LatentTargetSampler`), plus "name" ("sgld" or "proximal")
    "sam":       `keras_jem.optimizers.SAM` ("rho" 0 means no SAM)
    "backbone":  the backbone class (`SmallCNN`, `WideResNet`, `SNResNet`), plus "name"
                 ("small_cnn" or "wrn"; IGEBM always uses `SNResNet`) and IGEBM's "conditional"
    "optimizer": the Keras optimizer, plus "name" ("adam", "clipped_adam" or "sgd") and the
                 learning-rate schedule (`WarmupPiecewiseConstant`): "warmup_steps", "decay_epochs"
                 (comma-separated epochs), "decay_factor"
    "data":      `keras_jem.data.make_train_dataset` (batch sizes, augmentation, noise), plus
                 "test_noise_scale", "num_validation" and where the data is
    "run":       the trainer itself (epochs, seed, model_dir, strategy, ...)

`PRESETS[model]` maps keys to presets, merged in this order over the constructors' own defaults:
`COMMON` (the trainer's choices for every model), the model's `"*"`, its dataset family
(`DATASET_FAMILIES`: "digits", "cifar"), its dataset name, then for GMMC the training mode
(`"<family>:<mode>"`, `"<dataset>:<mode>"`), and last the user's flags. A default that a
class owns is read from that class, never repeated here (`defaults`): the model class's
signature, its `default_sampler_class` / `default_sampler_config` and `default_sam_config`,
the other constructors' signatures. No preset repeats the layer below it either.

To add a dataset: map it to a family in `DATASET_FAMILIES` (its own name starts a new family)
and give each model a preset under that key, e.g.

    PRESETS["jem"]["fashion_mnist"] = {
        "run": {"epochs": 10},
        "model": {"buffer_size": 5000},
        "sampler": {"num_steps": 20},
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 100},
    }

The flags themselves (`FLAGS`: section, keyword, type, help, whose default) are in
`trainers.flags`.

A preset written as flat flag names (`{"epochs": 10, "buffer_size": 5000, "clip_samples":
True}`, the older format) is read too: each flag goes to its section (`FLAGS`).

Every key of `FLAGS` is a command-line flag (`python -m trainers.fit --help` shows each one's
preset); `resolve` returns the flat flag values, `sections` turns them back into keyword
arguments.
"""

import inspect

from trainers.flags import FLAGS
from trainers.flags import MODE_ALIASES
from trainers.flags import MODEL_ARGUMENTS
from trainers.flags import MODEL_SETTINGS
from trainers.flags import SECTIONS

# The trainer's choices for every model, where no constructor has the default (or the trainer
# deliberately differs from one: Keras' Adam starts at 1e-3, the papers' JEM at 1e-4).
COMMON = {
    "run": {"model_dir": "runs/jem", "epochs": 20, "steps_per_epoch": None, "seed": 1,
            "jit_compile": "auto", "save_freq": "epoch", "keep_backups": 2,
            "mixed_precision": "none",
            "strategy": "default", "num_devices": None, "tpu": None, "sample_every": 1,
            "max_rollbacks": 3, "verbose": "auto",
            "reestimate_batch_norm": False},
    "data": {"data_dir": None, "manual_dir": None, "download": False, "num_validation": 0,
             "augment": None, "augment_px": True, "test_noise_scale": 0.0},
    "backbone": {"name": "small_cnn", "conditional": True},
    "optimizer": {"name": "adam", "learning_rate": 1e-4, "momentum": 0.9, "decay_epochs": "",
                  "decay_factor": 0.3},
    "sampler": {"name": "sgld"},
    "sam": {"rho": 0.0},
}

# WideResNet's own defaults are the papers' WRN-28-10 without normalisation.
_CIFAR_WRN = {"name": "wrn"}

PRESETS = {
    "softmax": {
        "*": {"model": {"px_weight": 0.0}},
        "digits": {"run": {"epochs": 40}, "data": {"noise_scale": 0.03},
                   "optimizer": {"learning_rate": 3e-3, "warmup_steps": 100}},
        "cifar": {"run": {"epochs": 200}, "backbone": {"name": "wrn", "norm": "batch"},
                  "model": {"weight_decay": 5e-4},
                  "optimizer": {"name": "sgd", "learning_rate": 0.1,
                                "decay_epochs": "60,120,160", "decay_factor": 0.2}},
    },
    # JEM: ALGORITHMS.md 1.5. The model and sampler settings are `JEM`'s and `SGLD`'s own
    # defaults (buffer 10000, restarts 0.05, 20 steps of size 1, noise 0.01), the optimizer
    # COMMON's Adam at 1e-4.
    "jem": {
        "*": {"data": {"noise_scale": 0.03, "test_noise_scale": 0.03}},
        "digits": {"run": {"epochs": 40}, "model": {"buffer_size": 2000},
                   "data": {"test_noise_scale": 0.0},
                   "optimizer": {"learning_rate": 3e-3, "warmup_steps": 100}},
        "cifar": {"run": {"epochs": 200}, "backbone": _CIFAR_WRN,
                  "data": {"num_validation": 5000},
                  "optimizer": {"warmup_steps": 1000, "decay_epochs": "160,180"}},
    },
    # JEM++: ALGORITHMS.md 2. The buffer init, BatchNorm mode and proximal sampler are
    # `JEMPP`'s own defaults.
    "jempp": {
        "*": {"backbone": {"norm": "batch"}, "data": {"noise_scale": 0.03}},
        # On 8x8 digits the clipped proximal steps overshoot and the data energy runs away
        # without an energy penalty (the JEM authors' remedy, JEM issue #4). GroupNorm and half
        # the restarts from noise: see _DENSITY below.
        "digits": {"run": {"epochs": 30}, "backbone": {"norm": "group"},
                   "model": {"buffer_size": 2000, "energy_l2_weight": 0.1,
                             "buffer_uniform_fraction": 0.5},
                   "optimizer": {"learning_rate": 1e-3, "warmup_steps": 100}},
        "cifar": {"run": {"epochs": 150}, "backbone": _CIFAR_WRN,
                  "model": {"weight_decay": 4e-4}, "data": {"num_validation": 5000},
                  "optimizer": {"name": "sgd", "learning_rate": 0.1, "warmup_steps": 1000,
                                "decay_epochs": "50,100,125", "decay_factor": 0.2}},
    },
    # SADA-JEM: ALGORITHMS.md 3.4. The buffer init, BatchNorm mode, divergence threshold,
    # sampler (5 clipped SGLD steps without noise) and ASAM (rho 2) are `SADAJEM`'s own
    # defaults; the data keeps make_train_dataset's noise 0.
    "sadajem": {
        "*": {"backbone": {"norm": "batch"}, "data": {"augment_px": False}},
        # Without an energy penalty log p(x) separates digits from noise poorly here
        # (AUROC 0.93; 0.99 with it, see README). GroupNorm and noise restarts: _DENSITY below.
        "digits": {"run": {"epochs": 30}, "backbone": {"norm": "group"},
                   "model": {"buffer_size": 2000, "energy_l2_weight": 0.1,
                             "buffer_uniform_fraction": 0.5},
                   "sam": {"rho": 0.5}, "data": {"px_batch_size": 64},
                   "optimizer": {"learning_rate": 1e-3, "warmup_steps": 100}},
        "cifar": {"run": {"epochs": 200}, "backbone": _CIFAR_WRN,
                  "model": {"weight_decay": 5e-4},
                  "data": {"batch_size": 128, "px_batch_size": 64},
                  "optimizer": {"name": "sgd", "learning_rate": 0.1, "warmup_steps": 1000,
                                "decay_epochs": "60,120,180", "decay_factor": 0.2}},
    },
    # GMMC: ALGORITHMS.md 4.5 (the authors' cifar10_gen.sh and cifar10_joint.sh). `GMMC`'s own
    # defaults hold the centre scale 10, beta 0.5 and the switch at epoch 50, and
    # `LatentTargetSampler`'s its 20 steps of size 1 with latent noise 0.001; the trainer trains
    # jointly (the class's default mode is discriminative). GMMC's sampler adds no image noise.
    "gmmc": {
        "*": {"model": {"mode": "joint"}, "sampler": {"noise_scale": 0.0},
              "data": {"noise_scale": 0.03}},
        # Digits: a small buffer and 40 steps give every chain enough updates to look like a
        # digit; joint turns the generative loss on after 5 discriminative epochs. beta 1.0
        # collapses to about 50% accuracy here.
        "digits": {"run": {"epochs": 50}, "model": {"buffer_size": 500, "start_generative": 5},
                   "sampler": {"num_steps": 40},
                   "optimizer": {"learning_rate": 1e-3, "warmup_steps": 100}},
        "cifar": {"backbone": _CIFAR_WRN, "data": {"num_validation": 5000},
                  "optimizer": {"warmup_steps": 1000}},
        "cifar:generative": {"run": {"epochs": 100},
                             "model": {"buffer_size": 100000, "reinit_probability": 0.025,
                                       "start_generative": 0},
                             "optimizer": {"decay_epochs": "30,50,80"}},
        "cifar:joint": {"run": {"epochs": 150}, "model": {"buffer_size": 50000},
                        "sampler": {"num_steps": 50},
                        "optimizer": {"decay_epochs": "30,50,80,100,120"}},
        # The authors' cifar10_dis.sh calls a script missing from their repository; these are
        # the defaults of their train_gmmc.py.
        "cifar:discriminative": {"run": {"epochs": 150}, "backbone": {"norm": "batch"},
                                 "model": {"buffer_size": 100}, "data": {"noise_scale": 0.0},
                                 "optimizer": {"name": "sgd", "learning_rate": 0.03,
                                               "warmup_steps": 0,
                                               "decay_epochs": "50,80,100,120"}},
    },
    # IGEBM: ALGORITHMS.md 5.2-5.3 and the official code (openai/ebm_code_release). On CIFAR the
    # conditional ResNet32 (128-256-256, 2 blocks per stage); the unconditional ResNet32Large is
    # --conditional false --sn_filters 128 --sn_num_blocks 3 --dropout_rate 0.5 --epochs 310
    # (its dropout then stays on in the Langevin steps: IGEBM's sample_in_training_mode None).
    # keras-jem works on [-1, 1]: the official step 10, gradient clip 0.01 and noise 0.005 on
    # [0, 1] are step 40, clip 0.005 and noise 0.01 here (u = 2x - 1, grad_u = grad_x / 2); the
    # chain adds its noise before each gradient step, as the official one.
    # The buffer is the official train.py's: a class-agnostic FIFO of the latest samples in
    # 8 bits (they continue under the batch's labels; its train.py holds 50000, the paper 10000);
    # the optimizer is the official clipped Adam.
    # The model, sampler and SNResNet settings above are `IGEBM`'s, `IGEBM.default_sampler_config`
    # and `SNResNet`'s own defaults; the trainer adds the conditional energy, the optimizer and
    # the data.
    "igebm": {
        "*": {"optimizer": {"name": "clipped_adam", "learning_rate": 3e-4, "beta_1": 0.0},
              "data": {"augment": "none", "augment_px": False}},
        "digits": {"run": {"epochs": 30}, "backbone": {"filters": 32},
                   "model": {"buffer_size": 1000}, "sampler": {"num_steps": 20},
                   "optimizer": {"learning_rate": 1e-3}},
        # 190 epochs: the released conditional CIFAR-10 checkpoint (cifar10_cond, iteration
        # 74700 at batch 128: 74700 * 128 / 50000 = 191 epochs), the model this preset builds.
        # The unconditional ResNet32Large checkpoint is at 121200 iterations (310 epochs).
        "cifar": {"run": {"epochs": 190}, "backbone": {"filters": (128, 256, 256),
                                                       "num_blocks": 2},
                  "data": {"batch_size": 128}},
    },
}

# _DENSITY: on the small datasets JEM++ and SADA-JEM use GroupNorm instead of the papers'
# BatchNorm and restart half their chains from uniform noise (`buffer_uniform_fraction` 0.5),
# so that log p(x) is a density of one image that does not depend on the seed. With BatchNorm in
# training mode everywhere the energy is learned for batch-standardised inputs only, and chains
# started only from the class Gaussians never show the model noise: on digits, seed 2, the papers'
# settings gave AUROC 0.448 against noise, GroupNorm + noise restarts 0.998 (JEM++) and 1.000
# (SADA-JEM). docs/batch_norm.md has the measurements; the CIFAR presets keep the papers' choice.

# === Fashion-MNIST (28x28x1, 60000 training images) ===
# Every model uses the same backbone, a Wide-ResNet-10-1 (77k parameters, 28 -> 28 -> 14 -> 7,
# 64 features), and the same budget of 1200 iterations of batch 64 (1.3 passes over the data),
# so the study compares methods, not networks or budgets. Measured on this 2-core machine while
# one other training run shared it: the softmax 175 s, JEM 3446 s (about 2.9 s per iteration;
# an earlier estimate of 20 minutes was far off). An "epoch" here is `steps_per_epoch`
# iterations, not a pass over the images.


def _fashion_mnist(**sections):
    preset = {
        "run": {"epochs": 6, "steps_per_epoch": 200},
        "backbone": {"name": "wrn", "depth": 10, "width": 1},
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 200, "decay_epochs": "5"},
    }
    for section, values in sections.items():
        preset[section] = {**preset.get(section, {}), **values}
    return preset


PRESETS["softmax"]["fashion_mnist"] = _fashion_mnist(data={"noise_scale": 0.03})
# JEM: the energy penalty too. Without it, 36 iterations at the full rate (warm-up 5) ran the
# data energy to -23 and the cross-entropy up from 2.31 to 3.67; with 0.1 (warm-up 20, 60
# iterations) the energies stayed within +-3.5 and the cross-entropy went down, 2.30 -> 2.16.
PRESETS["jem"]["fashion_mnist"] = _fashion_mnist(
    model={"buffer_size": 5000, "energy_l2_weight": 0.1}, data={"test_noise_scale": 0.0})
# JEM++ and SADA-JEM: the energy penalty, GroupNorm and noise restarts of their digits presets
# (see there and _DENSITY; not yet measured on Fashion-MNIST).
PRESETS["jempp"]["fashion_mnist"] = _fashion_mnist(
    backbone={"norm": "group"},
    model={"buffer_size": 5000, "energy_l2_weight": 0.1, "buffer_uniform_fraction": 0.5})
PRESETS["sadajem"]["fashion_mnist"] = _fashion_mnist(
    backbone={"norm": "group"},
    model={"buffer_size": 5000, "energy_l2_weight": 0.1, "buffer_uniform_fraction": 0.5},
    sam={"rho": 0.5}, data={"px_batch_size": 64})
# GMMC joint: discriminative for the first 2 of 6 epochs, then generative (class blocks of 500).
# beta 0.1: after 200 discriminative iterations (test accuracy 40%), 100 generative ones with
# beta 0.5 ran the data's MMC energy from 40 to 208 and the test accuracy down to 20%; with 0.1
# the energy went to 50 and the accuracy up to 51%.
PRESETS["gmmc"]["fashion_mnist"] = _fashion_mnist(
    model={"buffer_size": 5000, "start_generative": 2, "beta": 0.1})
# IGEBM (its own spectral-norm ResNet, generation only): with the digits width 32 (32-64-128) an
# iteration cost about 6 JEM iterations here, so the width is 16 (1.3 s per iteration at load 3)
# and the budget 600 iterations.
PRESETS["igebm"]["fashion_mnist"] = {
    "run": {"epochs": 6, "steps_per_epoch": 100}, "optimizer": {"learning_rate": 1e-3},
    "model": {"buffer_size": 5000}, "sampler": {"num_steps": 20}, "backbone": {"filters": 16}}

DATASET_FAMILIES = {
    "digits": "digits",
    "synthetic": "digits",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "svhn": "cifar",
    "fashion_mnist": "fashion_mnist",
}


# === Flag values <-> keyword arguments ===
# Four flags take another form on the command line than in the constructor.


def _filters_flag(value):
    return ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def _filters_argument(text):
    widths = [int(w) for w in str(text).split(",")]
    return widths[0] if len(widths) == 1 else tuple(widths)


def _num_blocks_flag(value):
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"--sn_num_blocks takes one count for every stage. Received: {value}")
        return int(value[0])
    return int(value)


# flag -> (keyword argument -> flag value, flag value -> keyword argument)
CONVERSIONS = {
    "norm": (lambda v: "none" if v is None else v, lambda v: None if v == "none" else v),
    "clip_samples": (lambda v: v is not None, lambda v: (-1.0, 1.0) if v else None),
    "sn_filters": (_filters_flag, _filters_argument),
    "sn_num_blocks": (_num_blocks_flag, int),
}
_BY_KEY = {(flag.section, flag.key): name for name, flag in FLAGS.items()}


def _signature_default(target, key):
    """`(True, default)` of argument `key` of class `target`, or `(False, None)`.

    A class may take the argument through **kwargs from a base class (JEM's `weight_decay`
    belongs to EnergyModel): the first class of the MRO that names it holds the default.
    """
    for owner in getattr(target, "__mro__", (target,)):
        try:
            parameters = inspect.signature(owner).parameters
        except (TypeError, ValueError):  # a builtin base without a signature
            continue
        if key in parameters:
            return True, parameters[key].default
    return False, None


def _source_default(flag):
    """The default of `flag` in the signature of the class that owns it."""
    import importlib

    module, name = flag.source.split(":")
    found, default = _signature_default(getattr(importlib.import_module(module), name), flag.key)
    if not found:
        raise KeyError(f"{flag.source} takes no argument {flag.key!r} (flag source of {flag})")
    return default


def _model_defaults(model):
    """The flag values that the class of `model` owns, e.g. JEM++'s buffer init and sampler.

    Read from the class itself: its constructor's signature ("model" flags), its
    `default_sampler_class` and `default_sampler_config` ("sampler" flags) and its
    `default_sam_config` ("sam" flags), so that a method's default lives in its model file only.
    """
    from trainers import factory

    cls = factory.model_class(model)
    sampler_class = cls.default_sampler_class
    names = {class_name: name for name, class_name in factory.SAMPLERS.items()}
    values = {}
    if sampler_class.__name__ in names:  # else (GMMC) the flag is unused: COMMON's
        values["sampler"] = names[sampler_class.__name__]
    if cls.default_sam_config is not None:
        values["sam_rho"] = cls.default_sam_config["rho"]
    for name, flag in FLAGS.items():
        if flag.section == "model":
            found, value = _signature_default(cls, flag.key)
        elif flag.section == "sampler" and flag.key in cls.default_sampler_config:
            found, value = True, cls.default_sampler_config[flag.key]
        elif flag.section == "sampler":
            found, value = _signature_default(sampler_class, flag.key)
        elif flag.section == "sam" and flag.key in (cls.default_sam_config or {}):
            found, value = True, cls.default_sam_config[flag.key]
        else:
            found = False
        if found:
            values[name] = value
    return values


def defaults(model=None):
    """Flag values before any preset: the constructors' defaults, and `COMMON` for the rest.

    Args:
        model: a key of `PRESETS`: the flags its class owns (`_model_defaults`) take that
            class's defaults. Every other flag (all of them with None) takes the default of its
            `Flag.source` class, or else `COMMON`'s.
    """
    owned = {} if model is None else _model_defaults(model)
    values = {name: _source_default(flag) for name, flag in FLAGS.items() if flag.source}
    values.update(owned)
    values = {name: CONVERSIONS[name][0](v) if name in CONVERSIONS else v
              for name, v in values.items()}
    values.update({name: v for name, v in _flatten(COMMON).items() if name not in owned})
    return {name: values[name] for name in FLAGS}


def complete(config):
    """`config` (e.g. an older run's `config.json`) with every flag it lacks at its default.

    A flag added after a run was made has the default that keeps the old behaviour, so a
    setting missing from an older `config.json` is the one that run had; neither the presets
    nor the model classes' own defaults are used here (they may have changed since: IGEBM's
    `buffer_type` default became "fifo" after runs made with the persistent buffer).
    """
    return {**defaults(), **config}


def _flatten(preset):
    """A nested preset (or an older flat one, keyed by flag) as flag values."""
    flat = {}
    for key, value in preset.items():
        if key in SECTIONS:
            for argument, item in value.items():
                name = _BY_KEY.get((key, argument))
                if name is None:
                    raise ValueError(
                        f"Preset section {key!r} has no setting {argument!r}. Known: "
                        f"{sorted(a for s, a in _BY_KEY if s == key)}."
                    )
                flat[name] = CONVERSIONS[name][0](item) if name in CONVERSIONS else item
        elif key in FLAGS:
            flat[key] = value
        else:
            raise ValueError(
                f"Unknown preset key {key!r}: expected a section ({', '.join(SECTIONS)}) or a "
                "flag name."
            )
    return flat


def _presets_of(model, dataset, mode):
    presets = PRESETS[model]
    family = DATASET_FAMILIES[dataset]
    keys = ["*", family, dataset]
    if mode is not None:
        keys += [f"{family}:{mode}", f"{dataset}:{mode}"]
    return [presets[key] for key in dict.fromkeys(keys) if key in presets]


def resolve(model, dataset, overrides=None):
    """The flag values of a run: defaults < model < dataset < mode presets < overrides.

    Args:
        model: a key of `PRESETS`.
        dataset: a dataset name.
        overrides: dict of flag values given by the user (None values are ignored).

    Returns:
        A dict with every key of `FLAGS` plus "model" and "dataset". Flags of another model
        (e.g. GMMC's `mode` for JEM) hold that model's own preset, unused.
    """
    if model not in PRESETS:
        raise ValueError(f"Unknown model {model!r}. Expected one of: {', '.join(PRESETS)}.")
    if dataset not in DATASET_FAMILIES:
        raise ValueError(
            f"Unknown dataset {dataset!r}. Expected one of: {', '.join(DATASET_FAMILIES)}."
        )
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "mode" in overrides:
        overrides["mode"] = MODE_ALIASES.get(overrides["mode"], overrides["mode"])
    config = defaults(model)
    for owner, names in MODEL_SETTINGS.items():
        if owner != model:
            owned = _flatten(PRESETS[owner].get("*", {}))
            config.update({name: owned[name] for name in names if name in owned})
    for preset in _presets_of(model, dataset, None):
        config.update(_flatten(preset))
    mode = overrides.get("mode", config["mode"]) if model == "gmmc" else config["mode"]
    for preset in _presets_of(model, dataset, mode)[len(_presets_of(model, dataset, None)):]:
        config.update(_flatten(preset))
    config.update(overrides)
    config["model"] = model
    config["dataset"] = dataset
    return config


def sections(config):
    """The keyword arguments of a resolved config, by section (flags of other models left out).

    Example:

    >>> sections(resolve("jem", "digits"))["sampler"]["num_steps"]
    20
    """
    model = config["model"]
    foreign = {name for owner, names in MODEL_SETTINGS.items() if owner != model
               for name in names}
    nested = {section: {} for section in SECTIONS}
    for name, flag in FLAGS.items():
        if name in foreign:
            continue
        value = config[name]
        nested[flag.section][flag.key] = (CONVERSIONS[name][1](value) if name in CONVERSIONS
                                          else value)
    nested["model"] = {key: nested["model"][key] for key in MODEL_ARGUMENTS[model]}
    return nested
