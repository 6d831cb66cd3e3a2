"""The command line of `python -m trainers.fit`: its parser, the resolved config and the checks.

Every hyperparameter flag comes from `trainers/flags.py`; unset flags take the preset of the
model and dataset (`trainers/presets.py`). `resolve_config` parses, resolves and validates;
`validate` checks only what no constructor checks (the trainer's own settings and how they
combine), so a bad flag stops the CLI before any work.

Example:

>>> config, print_only = resolve_config(["--model", "jempp", "--epochs", "2"])
>>> config["epochs"], config["norm"]     # the flag, and the digits preset of JEM++
(2, 'group')
"""

import argparse

from trainers import presets
from trainers import runtime
from trainers.factory import BACKBONES
from trainers.factory import OPTIMIZERS
from trainers.factory import SAMPLERS
from trainers.factory import ConfigError
from trainers.factory import parse_epochs
from trainers.factory import unused_flags

# The trainer's own choices; the constructors check their arguments themselves.
CHOICES = {
    "backbone": tuple(BACKBONES),
    "optimizer": OPTIMIZERS,
    "sampler": tuple(SAMPLERS),
    "jit_compile": ("auto", "true", "false"),
    "strategy": ("default", "mirrored", "multi_worker", "tpu"),
    "mixed_precision": ("none", "mixed_bfloat16", "mixed_float16"),
    "verbose": ("auto", "0", "1", "2"),
}
AUGMENTS = ("crop_flip", "crop", "none")


def parse_widths(text):
    try:
        widths = [int(w) for w in str(text).split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) <= 0:
        raise ConfigError(
            "--sn_filters must be a positive width or comma-separated widths, one per stage, "
            f"e.g. 64 or 128,256,256. Received: {text!r}"
        )
    return widths


# === Arguments ===


def make_parser(model="jem", dataset="digits"):
    """The argument parser; `--help` shows each flag's preset for `model` on `dataset`."""
    preset = presets.resolve(model, dataset)
    parser = argparse.ArgumentParser(
        prog="python -m trainers.fit",
        description="Train JEM-family models. Unset flags take the model/dataset preset "
                    f"(shown for --model {model} --dataset {dataset}; give those first to "
                    "see another's).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="jem", choices=sorted(presets.PRESETS),
                        help="model to train")
    parser.add_argument("--dataset", default="digits", choices=sorted(presets.DATASET_FAMILIES),
                        help="training data")
    for name, flag in presets.FLAGS.items():
        help_text = f"{flag.help} (preset: {preset[name]})"
        if flag.type is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(f"--{name}", type=flag.type, default=None, help=help_text)
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved configuration and exit")
    parser.add_argument("--tf_logs", action="store_true",
                        help="show TensorFlow's C++ log lines (hidden by default)")
    return parser


def resolve_config(argv=None):
    """Parses `argv` into a resolved, validated config; returns `(config, print_only)`."""
    chosen, _ = _model_and_dataset_parser().parse_known_args(argv)
    args = make_parser(chosen.model, chosen.dataset).parse_args(argv)
    overrides = {
        k: v for k, v in vars(args).items()
        if k not in ("model", "dataset", "print_config", "tf_logs") and v is not None
    }
    config = presets.resolve(args.model, args.dataset, overrides)
    unused = unused_flags(config, overrides)
    if unused:
        raise ConfigError(" ".join(unused) + " Drop the flag, or choose a model, sampler or "
                          "backbone that reads it.")
    validate(config)
    return config, args.print_config


def _model_and_dataset_parser():
    """Reads only --model and --dataset (unknown values: the defaults; the full parser reports
    them), so that the full parser's help can show their presets."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", type=lambda v: v if v in presets.PRESETS else "jem",
                        default="jem")
    parser.add_argument("--dataset", default="digits",
                        type=lambda v: v if v in presets.DATASET_FAMILIES else "digits")
    return parser


def validate(config):
    """Raises ConfigError for trainer settings that cannot work, before any work is done.

    Only what no constructor checks is checked here (the trainer's own settings and how they
    combine); the model, backbone, sampler and SAM check their arguments when `factory`
    builds them, which `run` does before loading data.
    """

    def fail(message):
        raise ConfigError(message)

    for key, allowed in CHOICES.items():
        if config.get(key) not in allowed:
            fail(f"--{key} must be one of {', '.join(allowed)}. Received: {config.get(key)!r}")
    if config["augment"] is not None and config["augment"] not in AUGMENTS:
        fail(f"--augment must be one of {', '.join(AUGMENTS)}. Received: {config['augment']!r}")
    for key in ("epochs", "batch_size", "learning_rate"):
        if config[key] is None or config[key] <= 0:
            fail(f"--{key} must be positive. Received: {config[key]}")
    for key in ("noise_scale", "test_noise_scale", "warmup_steps", "num_validation",
                "max_rollbacks", "sample_every"):
        if config[key] is not None and config[key] < 0:
            fail(f"--{key} must be non-negative. Received: {config[key]}")
    for key in ("steps_per_epoch", "px_batch_size", "keep_backups"):
        if config[key] is not None and config[key] <= 0:
            fail(f"--{key} must be positive. Received: {config[key]}")
    px_batch = config["px_batch_size"] or config["batch_size"]
    if config["buffer_size"] < px_batch:
        fail(
            f"--buffer_size ({config['buffer_size']}) is smaller than the batch drawn from it "
            f"each step ({px_batch}); it must be at least the batch size."
        )
    # WideResNet builds any depth, but only 6n+4 gives whole blocks per stage.
    if config["backbone"] == "wrn" and (config["depth"] - 4) % 6:
        fail(f"--depth must be 6n+4 (e.g. 16, 28). Received: {config['depth']}")
    if config["save_freq"] != "epoch":
        try:
            if int(config["save_freq"]) <= 0:
                raise ValueError
        except ValueError:
            fail(f"--save_freq must be 'epoch' or a positive number of steps. "
                 f"Received: {config['save_freq']!r}")
    parse_epochs(config["decay_epochs"])
    runtime.validate_distribution(config, fail)
    if config["model"] == "igebm":
        parse_widths(config["sn_filters"])
    if config["model"] == "gmmc":
        # LatentTargetSampler takes any value; these cannot train.
        if not config["latent_noise"] > 0:
            fail(f"--latent_noise must be positive. Received: {config['latent_noise']}")
        if not config["step_size"] > 0:
            fail(f"--step_size must be positive for GMMC's sampler. "
                 f"Received: {config['step_size']}")
        if config["mode"] != "discriminative" and config["num_steps"] < 1:
            fail(f"--num_steps must be at least 1 for --mode {config['mode']}. "
                 f"Received: {config['num_steps']}")
