"""Train a Joint Energy-based Model from the command line.

    python -m trainers.fit --model jem --model_dir runs/jem            # digits, offline, minutes
    python -m trainers.fit --model jempp --dataset cifar10 --data_dir ~/tensorflow_datasets
    python -m trainers.fit --model sadajem --dataset cifar10 --epochs 10 --learning_rate 0.05
    python -m trainers.fit --model gmmc --mode gen --model_dir runs/gmmc_gen  # dis, gen or joint
    python -m trainers.fit --model igebm --model_dir runs/igebm               # conditional IGEBM
    python -m trainers.fit --model jem --dataset cifar10 --strategy mirrored --save_freq 500

Every hyperparameter has a flag; unset flags take the preset of the model and dataset
(`trainers/presets.py`, the papers' settings for CIFAR). The run directory receives the resolved
`config.json`, TensorBoard logs, a PNG grid of samples per epoch, a backup every `--save_freq`
steps that includes the replay buffer, optimizer and random state (an interrupted run resumes
from its epoch and step when the same command is run again), the final `model.keras` and
`metrics.json`. `--strategy mirrored|multi_worker|tpu` trains on several devices or machines
(batch sizes are global; see `keras_jem.distribute`). A diverging run is rolled back to the
last backup and continued with a new seed (at most `--max_rollbacks` times).
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from trainers import presets  # noqa: E402

logger = logging.getLogger("trainers.fit")

NORMS = ("none", "batch", "group", "instance", "layer")
BACKBONES = ("small_cnn", "wrn")
OPTIMIZERS = ("adam", "sgd")
SAMPLERS = ("sgld", "proximal")
AUGMENTS = ("crop_flip", "crop", "none")


class ConfigError(ValueError):
    """A setting that cannot work; raised before any data is loaded or model built."""


def _model_builders():
    """Model name -> function(config, backbone, info) -> keras_jem model."""
    import keras_jem

    def jem_family(cls):
        def build(config, backbone, info):
            kwargs = dict(
                backbone=backbone,
                num_classes=info.num_classes,
                sampler=build_sampler(config),
                buffer_size=config["buffer_size"],
                buffer_init=config["buffer_init"],
                buffer_covariance=config["buffer_covariance"],
                reinit_probability=config["reinit_probability"],
                conditional_sampling=config["conditional_sampling"],
                px_weight=config["px_weight"],
                pyx_weight=config["pyx_weight"],
                pxy_weight=config["pxy_weight"],
                energy_l2_weight=config["energy_l2_weight"],
                sample_in_training_mode=config["sample_in_training_mode"],
                divergence_threshold=config["divergence_threshold"],
                weight_decay=config["weight_decay"],
                sam=build_sam(config),
                seed=config["seed"],
            )
            return cls(**kwargs)

        return build

    def gmmc(config, backbone, info):
        return keras_jem.GMMC(
            backbone=backbone,
            num_classes=info.num_classes,
            mode=config["mode"],
            center_scale=config["center_scale"],
            beta=config["beta"],
            start_generative=config["start_generative"],
            sampler=keras_jem.sampling.LatentTargetSampler(
                num_steps=config["num_steps"],
                step_size=config["step_size"],
                latent_noise=config["latent_noise"],
                inject=config["inject"],
                clip_range=(-1.0, 1.0) if config["clip_samples"] else None,
            ),
            buffer_size=config["buffer_size"],
            reinit_probability=config["reinit_probability"],
            energy_l2_weight=config["energy_l2_weight"],
            sample_in_training_mode=config["sample_in_training_mode"],
            divergence_threshold=config["divergence_threshold"],
            weight_decay=config["weight_decay"],
            sam=build_sam(config),
            seed=config["seed"],
        )

    def igebm(config, backbone, info):
        return keras_jem.IGEBM(
            backbone,
            sampler=build_sampler(config),
            buffer_size=config["buffer_size"],
            reinit_probability=config["reinit_probability"],
            energy_l2_weight=config["energy_l2_weight"],
            divergence_threshold=config["divergence_threshold"],
            sample_in_training_mode=config["sample_in_training_mode"],
            seed=config["seed"],
        )

    builders = {
        "softmax": jem_family(keras_jem.JEM),
        "jem": jem_family(keras_jem.JEM),
        "jempp": jem_family(keras_jem.JEMPP),
        "sadajem": jem_family(keras_jem.SADAJEM),
        "gmmc": gmmc,
        "igebm": igebm,
    }
    builders.update(EXTRA_BUILDERS)
    return builders


# Models defined in their own modules register here: name -> builder(config, backbone, info).
EXTRA_BUILDERS = {}


def build_sampler(config):
    from keras_jem import sampling

    clip_range = (-1.0, 1.0) if config["clip_samples"] else None
    if config["sampler"] == "proximal":
        return sampling.ProximalSGLD(
            num_steps=config["num_steps"],
            inner_steps=config["inner_steps"],
            step_size=config["step_size"],
            gradient_clip=config["gradient_clip"],
            clip_range=clip_range,
            noise_scale=config["sampler_noise"],
        )
    return sampling.SGLD(
        num_steps=config["num_steps"],
        step_size=config["step_size"],
        noise_scale=config["sampler_noise"],
        gradient_clip=config["gradient_clip"],
        clip_range=clip_range,
    )


def build_sam(config):
    from keras_jem.optimizers import SAM

    if not config["sam_rho"]:
        return None
    return SAM(rho=config["sam_rho"], adaptive=config["sam_adaptive"])


def build_backbone(config, info=None):
    from keras_jem import backbones

    if config["model"] == "igebm":
        widths = parse_widths(config["sn_filters"])
        conditional = config["conditional"]
        if conditional and info is None:
            raise ValueError("A conditional IGEBM backbone needs the dataset info.")
        return backbones.SNResNet(
            filters=widths[0] if len(widths) == 1 else tuple(widths),
            num_blocks=config["sn_num_blocks"],
            num_classes=info.num_classes if conditional else None,
            dropout_rate=config["dropout_rate"],
            pooling=config["sn_pooling"],
        )
    norm = None if config["norm"] == "none" else config["norm"]
    if config["backbone"] == "wrn":
        return backbones.WideResNet(
            depth=config["depth"], width=config["width"], norm=norm,
            dropout_rate=config["dropout_rate"],
        )
    return backbones.SmallCNN(norm=norm, dropout_rate=config["dropout_rate"])


def build_optimizer(config, steps_per_epoch):
    import keras

    from keras_jem.optimizers import WarmupPiecewiseConstant

    boundaries = [int(e) * steps_per_epoch for e in parse_epochs(config["decay_epochs"])]
    schedule = WarmupPiecewiseConstant(
        config["learning_rate"], warmup_steps=config["warmup_steps"], boundaries=boundaries,
        factor=config["decay_factor"],
    )
    extra = {"clipnorm": config["clipnorm"]} if config["clipnorm"] else {}
    if config["optimizer"] == "sgd":
        return keras.optimizers.SGD(schedule, momentum=config["momentum"], **extra)
    return keras.optimizers.Adam(
        schedule, beta_1=config["beta_1"], beta_2=config["beta_2"], **extra
    )


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


def parse_epochs(text):
    if text is None or str(text).strip() == "":
        return []
    try:
        return sorted(int(e) for e in str(text).split(","))
    except ValueError:
        raise ConfigError(
            f"--decay_epochs must be comma-separated integers, e.g. '160,180'. Received: {text!r}"
        )


# === Arguments ===


def _bool(text):
    value = str(text).lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, received {text!r}")


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python -m trainers.fit",
        description="Train JEM-family models. Unset flags take the model/dataset preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="jem", choices=sorted(presets.PRESETS),
                        help="model to train")
    parser.add_argument("--dataset", default="digits", choices=sorted(presets.DATASET_FAMILIES),
                        help="training data")
    for flag, arguments in EXTRA_FLAGS.items():
        parser.add_argument(f"--{flag}", **arguments)
    for name, (kind, default, help_text) in presets.SETTINGS.items():
        if kind is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction,
                                default=None, help=f"{help_text} (preset: {default})")
        else:
            parser.add_argument(f"--{name}", type=kind, default=None,
                                help=f"{help_text} (preset: {default})")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved configuration and exit")
    return parser


# Flags of models defined in their own modules, e.g. GMMC's --mode: name -> argparse kwargs.
EXTRA_FLAGS = {}


def resolve_config(argv=None):
    args = make_parser().parse_args(argv)
    overrides = {
        k: v for k, v in vars(args).items()
        if k not in ("model", "dataset", "print_config") and v is not None
    }
    for owner, names in presets.MODEL_SETTINGS.items():
        given = [f"--{name}" for name in names if name in overrides]
        if given and args.model != owner:
            raise ConfigError(
                f"{', '.join(given)} only applies to --model {owner}. Received: --model "
                f"{args.model}."
            )
    config = presets.resolve(args.model, args.dataset, overrides)
    validate(config)
    return config, args.print_config


def validate(config):
    """Raises ConfigError for settings that cannot work, before any work is done."""

    def fail(message):
        raise ConfigError(message)

    choices = {
        "backbone": BACKBONES, "norm": NORMS, "optimizer": OPTIMIZERS, "sampler": SAMPLERS,
        "buffer_init": ("uniform", "gaussian_mixture"),
        "buffer_covariance": ("full", "diagonal"),
        "jit_compile": ("auto", "true", "false"),
        "strategy": ("default", "mirrored", "multi_worker", "tpu"),
        "mixed_precision": ("none", "mixed_bfloat16", "mixed_float16"),
    }
    for key, allowed in choices.items():
        if config.get(key) not in allowed:
            fail(f"--{key} must be one of {', '.join(allowed)}. Received: {config.get(key)!r}")
    if config["augment"] is not None and config["augment"] not in AUGMENTS:
        fail(f"--augment must be one of {', '.join(AUGMENTS)}. Received: {config['augment']!r}")
    positive = ("epochs", "batch_size", "buffer_size", "learning_rate")
    for key in positive:
        if config[key] is None or config[key] <= 0:
            fail(f"--{key} must be positive. Received: {config[key]}")
    non_negative = ("step_size", "sampler_noise", "num_steps", "noise_scale",
                    "test_noise_scale", "px_weight", "pyx_weight", "pxy_weight",
                    "energy_l2_weight", "weight_decay", "warmup_steps", "num_validation",
                    "sam_rho", "max_rollbacks", "sample_every")
    for key in non_negative:
        if config[key] is not None and config[key] < 0:
            fail(f"--{key} must be non-negative. Received: {config[key]}")
    for key in ("steps_per_epoch", "px_batch_size", "inner_steps"):
        if config[key] is not None and config[key] <= 0:
            fail(f"--{key} must be positive. Received: {config[key]}")
    if config["gradient_clip"] is not None and config["gradient_clip"] <= 0:
        fail(f"--gradient_clip must be positive. Received: {config['gradient_clip']}")
    if not 0 <= config["reinit_probability"] <= 1:
        fail(f"--reinit_probability must be in [0, 1]. Received: {config['reinit_probability']}")
    if not 0 <= config["dropout_rate"] < 1:
        fail(f"--dropout_rate must be in [0, 1). Received: {config['dropout_rate']}")
    px_batch = config["px_batch_size"] or config["batch_size"]
    if config["buffer_size"] < px_batch:
        fail(
            f"--buffer_size ({config['buffer_size']}) is smaller than the batch drawn from it "
            f"each step ({px_batch}); it must be at least the batch size."
        )
    if config["backbone"] == "wrn" and config["width"] <= 0:
        fail(f"--width must be positive. Received: {config['width']}")
    if config["backbone"] == "wrn" and (config["depth"] - 4) % 6:
        fail(f"--depth must be 6n+4 (e.g. 16, 28). Received: {config['depth']}")
    if config["save_freq"] != "epoch":
        try:
            if int(config["save_freq"]) <= 0:
                raise ValueError
        except ValueError:
            fail(f"--save_freq must be 'epoch' or a positive number of steps. "
                 f"Received: {config['save_freq']!r}")
    if config["verbose"] not in ("auto", "0", "1", "2"):
        fail(f"--verbose must be auto, 0, 1 or 2. Received: {config['verbose']!r}")
    parse_epochs(config["decay_epochs"])
    _validate_distribution(config, fail)
    if config["model"] == "gmmc":
        _validate_gmmc(config, fail)
    if config["model"] == "igebm":
        if config["sn_pooling"] not in ("sum", "mean"):
            fail(f"--sn_pooling must be sum or mean. Received: {config['sn_pooling']!r}")
        if config["sn_num_blocks"] < 1:
            fail(f"--sn_num_blocks must be at least 1. Received: {config['sn_num_blocks']}")
        parse_widths(config["sn_filters"])
    for check in EXTRA_VALIDATORS:
        check(config, fail)
    # Class-conditional sampling needs equal class blocks; the number of classes is known
    # without loading data.
    from keras_jem import data

    num_classes = data.get_info(config["dataset"]).num_classes
    class_blocks = (config["conditional_sampling"] or config["pxy_weight"] > 0) and config[
        "model"] not in ("gmmc", "igebm")
    class_blocks |= config["model"] == "gmmc" and config["mode"] != "discriminative"
    class_blocks |= config["model"] == "igebm" and config["conditional"]
    if config["model"] == "gmmc":
        from keras_jem.models.gmmc import max_mahalanobis_centers

        feature_dim = _feature_dim(config)
        try:
            max_mahalanobis_centers(num_classes, feature_dim, config["center_scale"])
        except ValueError as error:
            fail(f"{error} (backbone {config['backbone']}, {feature_dim} features, "
                 f"{num_classes} classes)")
    if class_blocks and config["buffer_size"] % num_classes:
        fail(
            f"Class-conditional sampling splits the buffer into {num_classes} equal blocks, "
            f"but --buffer_size={config['buffer_size']} is not divisible by {num_classes}."
        )


# Checks of models defined in their own modules: functions (config, fail).
EXTRA_VALIDATORS = []


def _validate_gmmc(config, fail):
    from trainers.presets import GMMC_MODES

    if config["mode"] not in GMMC_MODES:
        fail(f"--mode must be one of {', '.join(GMMC_MODES)} (or dis, gen). "
             f"Received: {config['mode']!r}")
    if not config["center_scale"] > 0:
        fail(f"--center_scale must be positive. Received: {config['center_scale']}")
    for key in ("beta", "start_generative"):
        if config[key] < 0:
            fail(f"--{key} must be non-negative. Received: {config[key]}")
    if not config["latent_noise"] > 0:
        fail(f"--latent_noise must be positive. Received: {config['latent_noise']}")
    if not config["step_size"] > 0:
        fail(f"--step_size must be positive for GMMC's sampler. Received: {config['step_size']}")
    if config["mode"] != "discriminative" and config["num_steps"] < 1:
        fail(f"--num_steps must be at least 1 for --mode {config['mode']}. "
             f"Received: {config['num_steps']}")


def _feature_dim(config):
    """The feature width of the backbone `config` builds, without building it."""
    if config["backbone"] == "wrn":
        return 64 * config["width"]
    import inspect

    from keras_jem.backbones import SmallCNN

    return inspect.signature(SmallCNN).parameters["feature_dim"].default


def _validate_distribution(config, fail):
    """Strategy flags, TF_CONFIG and, when the replica count is known, the global batch."""
    from keras_jem import distribute

    if config.get("num_devices") is not None:
        if config["num_devices"] <= 0:
            fail(f"--num_devices must be positive. Received: {config['num_devices']}")
        if config["strategy"] != "mirrored":
            fail("--num_devices sets the replicas of --strategy mirrored. Received: "
                 f"--strategy {config['strategy']} --num_devices {config['num_devices']}")
    if config["strategy"] == "multi_worker":
        try:
            distribute.parse_tf_config()
        except distribute.ClusterConfigError as error:
            fail(str(error))
    if config.get("num_devices"):
        check_global_batch(config, config["num_devices"], fail)


def check_global_batch(config, replicas, fail):
    from keras_jem import distribute

    for key in ("batch_size", "px_batch_size"):
        if config.get(key):
            try:
                distribute.check_global_batch(config[key], replicas, name=key)
            except ValueError as error:
                fail(str(error))


# === Training ===


def _jit_compile(config, model, strategy=None):
    setting = config["jit_compile"]
    from keras_jem import distribute

    if strategy is not None and distribute.uses_cpu_replicas(strategy) and setting == "true":
        # MirroredStrategy + jit_compile fails on CPU replicas (a resource on another device).
        print(f"[trainers.fit] XLA is off: jit_compile is not supported with "
              f"{distribute.num_replicas(strategy)} replicas on CPU devices "
              "(--jit_compile true ignored).", flush=True)
        return False
    if setting == "true":
        return True
    if setting == "false":
        return False
    # Keras' own "auto": XLA on accelerators, off on CPU-only machines and under tf.distribute.
    # On CPUs XLA makes every model here slower: a WRN-16-2 JEM iteration took 55 s with it
    # against 5 s with TensorFlow's executor, the digits CNN's sampler 3.5 s against 0.27 s
    # (`python -m tools.bench --jit_compile both`; README, Performance).
    return "auto"


def load_data(config):
    from keras_jem import data

    kwargs = dict(data_dir=config["data_dir"], download=config["download"],
                  manual_dir=config["manual_dir"])
    train = data.load(config["dataset"], "train", **kwargs)
    test = data.load(config["dataset"], "test", **kwargs)
    validation = None
    if config["num_validation"]:
        train, validation = data.split_validation(*train, config["num_validation"])
    return train, validation, test


def build(config, info, train_images=None, train_labels=None, steps_per_epoch=1,
          strategy=None):
    """Builds and compiles the model of `config` for `strategy` (default: the current one).

    The model object is constructed in `distribute.construction_scope` and its variables
    (weights, buffer, optimizer) are created under `strategy.scope()`.
    """
    import tensorflow as tf

    from keras_jem import distribute

    strategy = strategy or tf.distribute.get_strategy()
    with distribute.construction_scope(strategy), _dtype_policy(config["mixed_precision"]):
        model = _model_builders()[config["model"]](config, build_backbone(config, info),
                                                             info)
    with strategy.scope(), _dtype_policy(config["mixed_precision"]):
        model.build((None,) + tuple(info.image_shape))
        if getattr(model, "buffer", None) is not None and model.buffer.initialization == (
            "gaussian_mixture"
        ):
            model.adapt_buffer(train_images, train_labels, seed=config["seed"])
        model.compile(optimizer=build_optimizer(config, steps_per_epoch),
                      jit_compile=_jit_compile(config, model, strategy))
        logger.info("jit_compile=%s -> XLA %s", config["jit_compile"],
                    "on" if model.jit_compile else "off")
        model.optimizer.build(model.trainable_variables)
    return model


@contextlib.contextmanager
def _dtype_policy(name):
    """The global Keras dtype policy `name` ("none": float32) while the model is constructed.

    Layers keep the policy they were created with (and `.keras` files record it), so the global
    policy is restored afterwards.
    """
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32" if name in (None, "none") else name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def run(config):
    """Trains with `config` (a resolved, validated dict); returns the metrics dict."""
    import keras
    import numpy as np

    import keras_jem
    from keras_jem import callbacks as jem_callbacks
    from keras_jem import checkpointing
    from keras_jem import data
    from keras_jem import distribute

    # The strategy comes first: splitting a CPU into logical devices must precede any TF op.
    strategy = make_strategy(config)
    model_dir = config["model_dir"]
    worker_index = distribute.worker_info(strategy)[0]
    if worker_index:
        # Every worker writes its own files; only the chief's are the run's.
        model_dir = os.path.join(model_dir, "workers", f"worker_{worker_index}")
    os.makedirs(model_dir, exist_ok=True)
    config_path = os.path.join(model_dir, "config.json")
    previous_config = None
    if os.path.exists(config_path):
        with open(config_path) as f:
            previous_config = f.read()
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    keras.utils.set_random_seed(config["seed"])

    info = data.get_info(config["dataset"])
    (train_x, train_y), validation, (test_x, test_y) = load_data(config)
    config = dict(config, image_shape=list(info.image_shape), num_classes=info.num_classes)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)

    batch_size = config["batch_size"]
    px_batch_size = config["px_batch_size"] or batch_size
    augment = config["augment"] or info.augment

    def make_train_ds():
        # A fresh pipeline per fit: one Dataset object draws new shuffles per iterator, and a
        # resumed run must see the batches of an uninterrupted one (see fit_from_backup).
        train_ds = data.make_train_dataset(
            train_x, train_y, batch_size=batch_size, px_batch_size=px_batch_size,
            augment=None if augment == "none" else augment, augment_px=config["augment_px"],
            noise_scale=config["noise_scale"], seed=config["seed"],
        )
        if distribute.is_multi_worker(strategy):
            train_ds = distribute.shard_by_data(train_ds)
        return train_ds

    steps = config["steps_per_epoch"] or data.steps_per_epoch(
        len(train_x), max(batch_size, px_batch_size))
    test_ds = data.make_eval_dataset(test_x, test_y, batch_size=256,
                                     noise_scale=config["test_noise_scale"], seed=0)
    val_ds = None
    if validation is not None:
        val_ds = data.make_eval_dataset(*validation, batch_size=256,
                                        noise_scale=config["test_noise_scale"], seed=0)

    model = build(config, info, train_x, train_y, steps, strategy=strategy)
    print(f"[trainers.fit] {config['model']} on {config['dataset']}: "
          f"{len(train_x)} training images, {steps} steps/epoch, {config['epochs']} epochs, "
          f"{model.count_params():,} parameters; run directory {model_dir}", flush=True)

    ckpt_dir = os.path.join(model_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)

    verbose = config["verbose"]
    verbose = (1 if sys.stdout.isatty() else 2) if verbose == "auto" else int(verbose)
    save_freq = config["save_freq"]
    save_freq = save_freq if save_freq == "epoch" else int(save_freq)

    # Step-level backup (weights, buffer, optimizer, seeds, epoch and step): a killed run
    # continues where its last backup left off when the same command runs again.
    backup = checkpointing.StepBackup(os.path.join(model_dir, "backup"), save_freq=save_freq,
                                      steps_per_epoch=steps, worker_index=0)
    history = {}
    seed = config["seed"]
    start = time.time()
    with strategy.scope():
        try:
            restored = backup.restore_on_all_workers(model, strategy)
        except checkpointing.IncompatibleCheckpointError as error:
            if previous_config is not None:  # keep the configuration of the existing run
                with open(config_path, "w") as f:
                    f.write(previous_config)
            raise ConfigError(
                f"{error} {model_dir} holds a run of another configuration (its settings are in "
                f"{config_path}): rerun with those settings to resume it, or use a new "
                "--model_dir."
            ) from error
        rollbacks = backup.rollbacks  # persisted: a restarted run keeps counting
        if restored is None:
            backup.save(model)  # step 0: what a divergence before the first backup rolls to
        else:
            print(f"[trainers.fit] resuming from the backup at epoch {backup.epoch + 1}, "
                  f"step {backup.step} of {steps} (global step {backup.global_step}, written "
                  f"with {restored.get('num_replicas', 1)} replica(s)).", flush=True)
        while True:
            guard = jem_callbacks.DivergenceGuard()
            backup.guard = guard
            callback_list = [
                guard,
                backup,
                keras.callbacks.CSVLogger(os.path.join(model_dir, "history.csv"), append=True),
                keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"),
                                            update_freq="epoch"),
            ]
            if val_ds is not None:
                callback_list.append(keras.callbacks.ModelCheckpoint(
                    os.path.join(ckpt_dir, "best.weights.h5"), monitor="val_accuracy",
                    mode="max", save_best_only=True, save_weights_only=True))
            if config["sample_every"] and _draws_samples(config) and hasattr(model, "sample"):
                callback_list.append(jem_callbacks.SampleGrid(
                    os.path.join(model_dir, "samples"), every=config["sample_every"],
                    log_dir=os.path.join(model_dir, "logs")))
            callback_list += [factory(config, model) for factory in EXTRA_CALLBACKS]
            results = checkpointing.fit_from_backup(
                model, make_train_ds, backup, config["epochs"], callbacks=callback_list,
                validation_data=val_ds, verbose=verbose,
            )
            for result in results:
                for key, values in result.history.items():
                    history.setdefault(key, []).extend(values)
            if not guard.diverged:
                break
            epoch, batch, logs = guard.diverged_at
            if rollbacks >= config["max_rollbacks"]:
                raise RuntimeError(
                    f"Training diverged at epoch {epoch + 1}, step {batch + 1} "
                    f"({_short(logs)}) after {rollbacks} rollbacks. Try a lower "
                    "--learning_rate, more --num_steps, --energy_l2_weight 0.1 or "
                    "--noise_scale 0.1 (JEM issues #4 and #8)."
                )
            rollbacks += 1
            seed = config["seed"] + 1000 * rollbacks
            print(f"[trainers.fit] divergence at epoch {epoch + 1}, step {batch + 1} "
                  f"({_short(logs)}): rolling back to the last backup and continuing with seed "
                  f"{seed} (rollback {rollbacks} of at most {config['max_rollbacks']}).",
                  flush=True)
            # Restores the last backup on every worker, reseeds, and persists the new seed and
            # rollback count at once (a restarted run must not replay the diverged seed).
            backup.rollback(model, seed, strategy)
    wall_time = time.time() - start

    model.save(os.path.join(model_dir, "model.keras"))
    evaluation = model.evaluate(test_ds, verbose=0, return_dict=True)
    metrics = {
        # An unconditional IGEBM has no classes: it reports only the test energy.
        "test_accuracy": _maybe_float(evaluation.get("accuracy")),
        "test_loss_ce": _maybe_float(evaluation.get("loss_ce")),
        "test_energy": _maybe_float(evaluation.get("energy_data")),
        "train_seconds": wall_time,
        "rollbacks": rollbacks,
        "epochs": config["epochs"],
        "keras_jem_version": keras_jem.__version__,
    }
    with open(os.path.join(model_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(model_dir, "history.json"), "w") as f:
        json.dump({k: [float(v) for v in np.asarray(vs).tolist()] for k, vs in history.items()},
                  f)
    result = (f"test accuracy {metrics['test_accuracy']:.4f}"
              if metrics["test_accuracy"] is not None
              else f"test energy {metrics['test_energy']:.4g}")
    print(f"[trainers.fit] done in {wall_time:.0f} s: {result}; model saved to "
          f"{os.path.join(model_dir, 'model.keras')}", flush=True)
    return metrics


# Callbacks of models defined in their own modules: functions (config, model) -> callback.
EXTRA_CALLBACKS = []


def _maybe_float(value):
    return None if value is None else float(value)


def _draws_samples(config):
    """Whether the model trains with samples (then a sample grid is written per epoch)."""
    if config["model"] == "gmmc":
        return config["mode"] != "discriminative"
    if config["model"] == "igebm":
        return True
    return config["px_weight"] > 0 or config["pxy_weight"] > 0


def make_strategy(config):
    """The run's `tf.distribute` strategy; checks the global batch against its replicas."""
    from keras_jem import distribute

    try:
        strategy = distribute.create_strategy(config["strategy"],
                                              num_devices=config.get("num_devices"),
                                              tpu=config.get("tpu"))
    except (ValueError, RuntimeError) as error:
        raise ConfigError(str(error)) from error

    def fail(message):
        raise ConfigError(message)

    replicas = distribute.num_replicas(strategy)
    check_global_batch(config, replicas, fail)
    if replicas > 1:
        worker_index, num_workers, _ = distribute.worker_info(strategy)
        print(f"[trainers.fit] strategy {config['strategy']}: {replicas} replicas"
              + (f" over {num_workers} workers (this is worker {worker_index})"
                 if num_workers > 1 else "")
              + f"; global batch {config['batch_size']}, "
              f"{config['batch_size'] // replicas} per replica.", flush=True)
    return strategy


def _short(logs):
    keys = ("loss", "energy_data", "energy_samples")
    return ", ".join(f"{k}={logs[k]:.3g}" for k in keys if k in logs)


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        config, print_only = resolve_config(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if print_only:
        print(json.dumps(config, indent=2, sort_keys=True))
        return 0
    from keras_jem.data import DatasetNotAvailableError

    try:
        run(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DatasetNotAvailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
