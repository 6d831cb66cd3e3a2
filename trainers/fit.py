"""Train a Joint Energy-based Model from the command line.

    python -m trainers.fit --model jem --model_dir runs/jem            # digits, offline, minutes
    python -m trainers.fit --model jempp --dataset cifar10 --data_dir ~/tensorflow_datasets
    python -m trainers.fit --model sadajem --dataset cifar10 --epochs 10 --learning_rate 0.05
    python -m trainers.fit --model gmmc --mode gen --model_dir runs/gmmc_gen  # dis, gen or joint
    python -m trainers.fit --model igebm --model_dir runs/igebm               # conditional IGEBM
    python -m trainers.fit --model jem --dataset cifar10 --strategy mirrored --save_freq 500

Every hyperparameter has a flag; unset flags take the preset of the model and dataset
(`trainers/presets.py`, the papers' settings for CIFAR; `--model M --dataset D --help` shows
them); `trainers/fit_arguments.py` parses, resolves and checks them. The model, backbone, sampler and optimizer are built by `trainers/factory.py` from those
settings before any data is loaded, so their constructors' checks stop a bad flag at once;
`trainers/runtime.py` holds the strategy, XLA and dtype-policy plumbing. The run directory
receives the resolved `config.json`, TensorBoard logs, a PNG grid of samples per epoch, a backup every `--save_freq`
steps that includes the replay buffer, optimizer and random state (an interrupted run resumes
from its epoch and step when the same command is run again), the final `model.keras` and
`metrics.json`. `--strategy mirrored|multi_worker|tpu` trains on several devices or machines
(batch sizes are global; see `keras_jem.distribute`). A diverging run is rolled back to the
last backup and continued with a new seed (at most `--max_rollbacks` times).
"""

import json
import logging
import math
import os
import sys
import time
import types

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from trainers import console
from trainers import factory
from trainers import runtime
from trainers.factory import ConfigError

# The command line lives in trainers/fit_arguments.py; its names stay importable from here.
from trainers.fit_arguments import CHOICES  # noqa: F401
from trainers.fit_arguments import make_parser  # noqa: F401
from trainers.fit_arguments import parse_widths  # noqa: F401
from trainers.fit_arguments import resolve_config
from trainers.fit_arguments import validate  # noqa: F401

logger = logging.getLogger("trainers.fit")

# === Training ===


def load_data(config):
    from keras_jem import data

    kwargs = {"data_dir": config["data_dir"], "download": config["download"],
              "manual_dir": config["manual_dir"]}
    train = data.load(config["dataset"], "train", **kwargs)
    test = data.load(config["dataset"], "test", **kwargs)
    validation = None
    if config["num_validation"]:
        train, validation = data.split_validation(*train, config["num_validation"])
    return train, validation, test


def construct(config, info, strategy=None):
    """The model object of `config` (`trainers.factory`), not yet built, for `strategy`.

    Its constructors check every model, backbone, sampler and SAM setting: `run` calls this
    before it loads data or writes anything.
    """
    import tensorflow as tf

    from keras_jem import distribute

    strategy = strategy or tf.distribute.get_strategy()
    with distribute.construction_scope(strategy), runtime.dtype_policy(config["mixed_precision"]):
        return factory.build_model(config, info.num_classes)


def build(config, info, train_images=None, train_labels=None, steps_per_epoch=1,
          strategy=None, model=None):
    """Builds and compiles the model of `config` for `strategy` (default: the current one).

    The model object (`model`, or `construct(config, info, strategy)`) is constructed in
    `distribute.construction_scope`; its variables (weights, buffer, optimizer) are created
    under `strategy.scope()`.
    """
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    if model is None:
        model = construct(config, info, strategy)
    with strategy.scope(), runtime.dtype_policy(config["mixed_precision"]):
        model.build((None,) + tuple(info.image_shape))
        if getattr(model, "buffer", None) is not None and model.buffer.initialization == (
            "gaussian_mixture"
        ):
            model.adapt_buffer(train_images, train_labels, seed=config["seed"])
        model.compile(optimizer=factory.build_optimizer(config, steps_per_epoch),
                      jit_compile=runtime.jit_compile(config, model, strategy))
        logger.info("jit_compile=%s -> XLA %s", config["jit_compile"],
                    "on" if model.jit_compile else "off")
        model.optimizer.build(model.trainable_variables)
    return model


def run(config):
    """Trains with `config` (a resolved, validated dict); returns the metrics dict."""
    state = setup(config)
    history, rollbacks, wall_time = train(state)
    return finish(state, history, rollbacks, wall_time)


def _trainable_parameters(model):
    """The trainable weights' size (`count_params` also counts the replay buffer)."""
    return sum(math.prod(v.shape) for v in model.trainable_weights)


def setup(config):
    """Strategy, model object (its constructors check the settings), then run directory, data
    and the built, compiled model."""
    import keras

    from keras_jem import data
    from keras_jem import distribute

    # The strategy comes first: splitting a CPU into logical devices must precede any TF op.
    strategy = runtime.make_strategy(config)
    info = data.get_info(config["dataset"])
    # Before the model object: Keras' unseeded initializers take their seeds at construction.
    keras.utils.set_random_seed(config["seed"])
    model = construct(config, info, strategy)  # bad settings stop here, before any work
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
    _write_json(config_path, config)
    keras.utils.set_random_seed(config["seed"])  # the data split draws as before the model

    (train_x, train_y), validation, (test_x, test_y) = load_data(config)
    config = dict(config, image_shape=list(info.image_shape), num_classes=info.num_classes)
    _write_json(config_path, config)

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
    model = build(config, info, train_x, train_y, steps, strategy=strategy, model=model)
    os.makedirs(os.path.join(model_dir, "checkpoints"), exist_ok=True)
    print(f"[trainers.fit] {config['model']} on {config['dataset']}: "
          f"{len(train_x)} training images, {steps} steps/epoch, {config['epochs']} epochs, "
          f"{_trainable_parameters(model):,} trainable parameters; run directory {model_dir}",
          flush=True)
    # What `train` and `finish` need.
    return types.SimpleNamespace(
        config=config, strategy=strategy, model=model, model_dir=model_dir,
        config_path=config_path, previous_config=previous_config, make_train_ds=make_train_ds,
        val_ds=val_ds, test_ds=test_ds, steps=steps, train_images=train_x)


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)


def _callbacks(state, backup, guard):
    import keras

    from keras_jem.tensorboard import TrainingSummaries

    config, model, model_dir = state.config, state.model, state.model_dir
    callback_list = [
        guard,
        backup,
        keras.callbacks.CSVLogger(os.path.join(model_dir, "history.csv"), append=True),
        # Scalars in keras.callbacks.TensorBoard's layout, plus the epoch's sample grid as an
        # image beside them (and as samples/epoch_XXX.png).
        TrainingSummaries(
            os.path.join(model_dir, "logs"),
            samples=bool(config["sample_every"]) and _draws_samples(config)
            and hasattr(model, "sample"),
            sample_dir=os.path.join(model_dir, "samples"), every=config["sample_every"] or 1),
    ]
    if state.val_ds is not None:
        ckpt_dir = os.path.join(model_dir, "checkpoints")
        callback_list.append(keras.callbacks.ModelCheckpoint(
            os.path.join(ckpt_dir, "best.weights.h5"), monitor="val_accuracy",
            mode="max", save_best_only=True, save_weights_only=True))
    return callback_list + [factory_(config, model) for factory_ in EXTRA_CALLBACKS]


#: The sections that describe the model and how it trains (not the run or the data); a resume hint
#: lists their differences.
_VARIABLE_SECTIONS = ("backbone", "model", "sampler", "sam", "optimizer")


def _flag_text(name, value):
    """`--name value` as typed on the command line (`--name` / `--no-name` for booleans)."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"--{name} {value}"


def _resume_flags(previous_config, config):
    """The flags that bring `config` back to the settings of the run in `previous_config`.

    A setting missing from an older `config.json` had its flag's default then (a new flag's
    default keeps the old behaviour), e.g. an IGEBM run from before the FIFO buffer:
    `--buffer_type persistent --no-noise_first`.
    """
    from trainers import presets
    from trainers.flags import FLAGS

    try:
        previous = json.loads(previous_config)
    except ValueError:
        return []
    previous = presets.complete(previous)
    flags = []
    for name in ("model", "dataset", *FLAGS):
        if name in FLAGS and FLAGS[name].section not in _VARIABLE_SECTIONS:
            continue
        old = previous.get(name)
        new = config.get(name)
        if isinstance(old, list) and isinstance(new, tuple):
            new = list(new)
        if old is not None and old != new:
            flags.append(_flag_text(name, old))
    return flags


def _restore_or_start(state, backup):
    """Resumes from the run directory's backup, or saves step 0 (the first rollback target)."""
    from keras_jem import checkpointing

    try:
        restored = backup.restore_on_all_workers(state.model, state.strategy)
    except checkpointing.IncompatibleCheckpointError as error:
        if state.previous_config is not None:  # keep the configuration of the existing run
            with open(state.config_path, "w") as f:
                f.write(state.previous_config)
        hint = ""
        if state.previous_config is not None:
            flags = _resume_flags(state.previous_config, state.config)
            if flags:
                hint = (f" The run's settings that this command changes: {' '.join(flags)} "
                        "(add them to resume it).")
        raise ConfigError(
            f"{error} {state.model_dir} holds a run of another configuration (its settings are "
            f"in {state.config_path}): rerun with those settings to resume it, or use a new "
            f"--model_dir.{hint}"
        ) from error
    if restored is None:
        backup.save(state.model)
    else:
        print(f"[trainers.fit] resuming from the backup at epoch {backup.epoch + 1}, "
              f"step {backup.step} of {state.steps} (global step {backup.global_step}, written "
              f"with {restored.get('num_replicas', 1)} replica(s)).", flush=True)


def train(state):
    """Fits from the last backup; on divergence rolls back and continues with a new seed.

    Returns `(history, rollbacks, wall_time)`.
    """

    from keras_jem import callbacks as jem_callbacks
    from keras_jem import checkpointing

    config, model = state.config, state.model
    verbose = console.progress_verbosity(config["verbose"])
    save_freq = config["save_freq"]
    save_freq = save_freq if save_freq == "epoch" else int(save_freq)
    # Step-level backup (weights, buffer, optimizer, seeds, epoch and step): a killed run
    # continues where its last backup left off when the same command runs again.
    backup = checkpointing.StepBackup(os.path.join(state.model_dir, "backup"),
                                      save_freq=save_freq, steps_per_epoch=state.steps,
                                      keep=config["keep_backups"], worker_index=0)
    history = {}
    start = time.time()
    with state.strategy.scope():
        _restore_or_start(state, backup)
        rollbacks = backup.rollbacks  # persisted: a restarted run keeps counting
        while True:
            guard = jem_callbacks.DivergenceGuard()
            backup.guard = guard
            results = checkpointing.fit_from_backup(
                model, state.make_train_ds, backup, config["epochs"],
                callbacks=_callbacks(state, backup, guard), validation_data=state.val_ds,
                verbose=verbose,
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
            backup.rollback(model, seed, state.strategy)
    return history, rollbacks, time.time() - start


def finish(state, history, rollbacks, wall_time):
    """Saves the model, evaluates it on the test set and writes metrics.json, history.json."""
    import numpy as np

    import keras_jem

    config, model, model_dir = state.config, state.model, state.model_dir
    from keras_jem import batch_norm

    reestimated = 0
    if config["reestimate_batch_norm"]:
        # The moving statistics are mostly the sampler's last batch's (see keras_jem.batch_norm).
        reestimated = keras_jem.reestimate_batch_norm(model, state.train_images)
        if reestimated:
            print(f"[trainers.fit] BatchNorm moving statistics of {reestimated} layers "
                  f"re-estimated on {min(len(state.train_images), batch_norm.MAX_IMAGES)} clean "
                  "training images",
                  flush=True)
    model.save(os.path.join(model_dir, "model.keras"))
    evaluation = model.evaluate(state.test_ds, verbose=0, return_dict=True)
    metrics = {
        # An unconditional IGEBM has no classes: it reports only the test energy.
        "test_accuracy": _maybe_float(evaluation.get("accuracy")),
        "test_loss_ce": _maybe_float(evaluation.get("loss_ce")),
        "test_energy": _maybe_float(evaluation.get("energy_data")),
        "train_seconds": wall_time,
        "rollbacks": rollbacks,
        "batch_norm_layers_reestimated": reestimated,
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


# Extra callbacks, functions (config, model) -> callback: tests use it to observe a run.
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


def _short(logs):
    keys = ("loss", "energy_data", "energy_samples")
    return ", ".join(f"{k}={logs[k]:.3g}" for k in keys if k in logs)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    console.setup(verbose="--tf_logs" in argv)
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
