"""Draw samples from a trained model and write them as PNG grids.

Usage:

```
python -m trainers.sample --model_dir runs/igebm_digits --task cond
python -m trainers.sample --model_dir runs/igebm_digits --task inpaint --num_samples 16
python -m trainers.sample --model_dir runs/igebm_digits --task compose --labels 3,8
python -m trainers.sample --model_dir runs/jem --task cond --sampler mala --num_steps 2000
python -m trainers.sample --model_dir runs/igebm_digits --task ensemble --checkpoints 2
python -m trainers.sample --model_dir runs/igebm_digits --task ensemble \
    --model_files runs/a/model.keras,runs/b/model.keras,runs/c/model.keras --labels 3
```

Reads `MODEL_DIR/model.keras` and `MODEL_DIR/config.json` (written by `trainers.fit`) and writes
`--output` (default `MODEL_DIR/samples_<task>.png`). Tasks:

- `uncond`: samples from noise (a conditional model draws random labels).
- `cond`: one row per label of `--labels` (default: every class), `--num_samples` per row.
- `inpaint`: rows = test images, the images with the `--mask` region grey, the completions
  (Langevin dynamics on the masked pixels only).
- `denoise`: rows = test images, salt-and-pepper corrupted (`--fraction`), restored
  (`--num_rounds` rounds of `--num_steps` steps, default 5 rounds of 5).
- `compose`: rows = samples of each label of `--labels`, then samples of the sum of their
  energies (the product of the conditionals), all from the same starting noise.
- `ensemble`: IGEBM's historical ensemble (`keras_jem.generation.ensemble`): samples of the
  newest model, then samples of the summed energies of several models, from the same noise
  and with the same sampler budget (class-conditional with `--labels`: `--num_samples` per
  label). The models are the `--checkpoints N` newest backups of `trainers.fit` in
  `MODEL_DIR/backup` (restored into the model `MODEL_DIR/config.json` describes; `trainers.fit`
  keeps the `--keep_backups` newest, default 2, written every `--save_freq`), or the `.keras`
  files of `--model_files`
  (e.g. models saved at several epochs with `keras.callbacks.ModelCheckpoint("ep{epoch}.keras")`).

`--sampler mala` (uncond/cond) runs long chains of the Metropolis-adjusted Langevin algorithm
(`keras_jem.sampling.MALA`, a correct MCMC sampler of p(x) or p(x | y), in inference mode) instead
of the model's training sampler; the first `--num_adaptation_steps` tune the step size toward
`--target_acceptance_rate`, and the acceptance rate of the chains after that is printed and stored
in the summary (a rate near 0 means the step is too large for the model's energy).

A JSON summary (task, path, settings and, for inpaint/denoise, the mean squared errors to the
clean images; for MALA the acceptance rate) is printed on stdout. Bad input exits with code 2
before any sampling. TensorFlow's C++ log lines are hidden unless `--verbose` is given (see
`trainers/console.py`).
"""

import json
import os
import sys
import time

from trainers import console
from trainers import run_dir

TASKS = ("uncond", "cond", "inpaint", "denoise", "compose", "ensemble")
MASKS = ("bottom", "top", "left", "right", "center", "random")
SAMPLERS = ("model", "mala")


class SampleError(Exception):
    """Bad input found before sampling (exit code 2)."""


def build_parser():
    parser = run_dir.build_parser(
        "python -m trainers.sample",
        "Sample from a trained keras-jem model and save PNG grids.",
        checkpoint_help="a .keras file to use instead of MODEL_DIR/model.keras",
        split_help="inpaint/denoise: data split",
    )
    add = parser.add_argument
    add("--task", required=True, choices=TASKS)
    add("--labels", default=None,
        help="comma-separated labels (cond: rows, default all classes; compose: >= 2 labels)")
    add("--num_samples", type=int, default=None,
        help="samples (uncond: total, default 64; cond/compose: per row, default 8; "
             "inpaint/denoise: test images, default 16)")
    add("--num_steps", type=int, default=None,
        help="sampler steps (default: the model's sampler; denoise: per round, default 5)")
    add("--output", default=None, help="PNG path (default MODEL_DIR/samples_<task>.png)")
    add("--checkpoints", type=int, default=None,
        help="ensemble: the N newest backups in MODEL_DIR/backup (trainers.fit keeps "
             "--keep_backups, default 2)")
    add("--model_files", default=None,
        help="ensemble: comma-separated .keras files (instead of --checkpoints)")
    add("--from_buffer", action="store_true",
        help="uncond/cond: continue chains of the replay buffer instead of starting from noise")
    add("--mask", default="bottom", choices=MASKS,
        help="inpaint: region to fill in (default: the bottom half)")
    add("--fraction", type=float, default=0.1,
        help="denoise: fraction of salt-and-pepper pixels (IGEBM: 0.1)")
    add("--num_rounds", type=int, default=5, help="denoise: rounds of sampling (IGEBM: 5)")
    add("--conditional", action="store_true",
        help="inpaint/denoise: use the true labels' class energy E(x, y)")
    add("--sampler", default="model", choices=SAMPLERS,
        help="uncond/cond: the model's own sampler, or long MALA chains (default model)")
    add("--step_size", type=float, default=1e-3,
        help="mala: initial step size (the Langevin proposal's noise variance)")
    add("--num_adaptation_steps", type=int, default=None,
        help="mala: leading steps that tune the step size (default: a quarter of --num_steps)")
    add("--target_acceptance_rate", type=float, default=0.574,
        help="mala: acceptance rate the step-size adaptation aims at")
    return parser


def _parse_labels(text):
    try:
        return [int(item) for item in str(text).split(",") if item.strip()]
    except ValueError:
        raise SampleError(f"--labels must be comma-separated integers. Received: {text!r}")


def validate_args(args):
    """Cheap checks that need neither TensorFlow nor the model."""
    for name in ("num_samples", "num_steps", "num_rounds"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_steps" else 1):
            raise SampleError(f"--{name} must be positive. Received: {value}")
    if not 0.0 <= args.fraction <= 1.0:
        raise SampleError(f"--fraction must be in [0, 1]. Received: {args.fraction}")
    args.labels = None if args.labels is None else _parse_labels(args.labels)
    if args.task == "compose" and (args.labels is None or len(args.labels) < 2):
        raise SampleError("--task compose needs at least two labels, e.g. --labels 3,8.")
    if args.from_buffer and args.task not in ("uncond", "cond"):
        raise SampleError("--from_buffer applies to --task uncond or cond only.")
    if args.sampler == "mala":
        if args.task not in ("uncond", "cond"):
            raise SampleError(f"--sampler mala applies to --task uncond or cond only. "
                              f"Received: --task {args.task}.")
        if args.num_steps is None:
            args.num_steps = 1000
        if args.num_adaptation_steps is None:
            args.num_adaptation_steps = args.num_steps // 4
        if not 0 <= args.num_adaptation_steps < max(args.num_steps, 1):
            raise SampleError(
                f"--num_adaptation_steps must be in [0, --num_steps) so that some steps are "
                f"measured. Received: {args.num_adaptation_steps} with --num_steps "
                f"{args.num_steps}.")
        if not args.step_size > 0:
            raise SampleError(f"--step_size must be positive. Received: {args.step_size}")
        if not 0 < args.target_acceptance_rate < 1:
            raise SampleError("--target_acceptance_rate must be in (0, 1). Received: "
                              f"{args.target_acceptance_rate}")
    model_dir = os.path.expanduser(args.model_dir)
    args.config = run_dir.read_config(model_dir, SampleError) or {}
    args.model_dir = model_dir
    _validate_ensemble(args)
    args.model_path = os.path.expanduser(args.checkpoint or os.path.join(model_dir, "model.keras"))
    if args.model_files:
        args.model_path = args.model_files[-1]
    if args.task == "ensemble" and args.checkpoints:
        args.model_path = None  # the models come from the backups
    elif not os.path.isfile(args.model_path):
        raise SampleError(
            f"No trained model at {args.model_path!r}. Train one with "
            f"`python -m trainers.fit --model_dir {model_dir} ...` or pass --checkpoint."
        )
    config_path = os.path.join(model_dir, "config.json")
    args.dataset = args.config.get("dataset")
    args.data_dir = args.data_dir or args.config.get("data_dir")
    if args.task in ("inpaint", "denoise") and not args.dataset:
        raise SampleError(
            f"--task {args.task} needs data: {config_path!r} is missing or has no 'dataset'."
        )
    args.output = os.path.expanduser(
        args.output or os.path.join(model_dir, f"samples_{args.task}.png")
    )
    return args


def _validate_ensemble(args):
    if args.task != "ensemble":
        if args.checkpoints is not None or args.model_files is not None:
            raise SampleError("--checkpoints and --model_files apply to --task ensemble only.")
        return
    if (args.checkpoints is None) == (args.model_files is None):
        raise SampleError("--task ensemble needs the models: --checkpoints N (the newest "
                          "backups in MODEL_DIR/backup) or --model_files a.keras,b.keras.")
    if args.checkpoints is not None and args.checkpoints < 1:
        raise SampleError(f"--checkpoints must be positive. Received: {args.checkpoints}")
    if args.model_files is not None:
        files = [os.path.expanduser(f) for f in args.model_files.split(",") if f.strip()]
        missing = [f for f in files if not os.path.isfile(f)]
        if not files or missing:
            raise SampleError(f"--model_files must list existing .keras files. Missing: "
                              f"{missing or args.model_files!r}")
        args.model_files = files


def load_checkpoints(model_dir, config, count):
    """The `count` newest backups of `trainers.fit` in `model_dir/backup`, newest last.

    Each is restored into a fresh model built from the run's `config` (its model, backbone and
    sampler settings) through `trainers.fit`'s factory.
    """
    from keras_jem import checkpointing
    from keras_jem import data
    from trainers import fit

    backup = checkpointing.StepBackup(os.path.join(model_dir, "backup"))
    entries = backup.checkpoints()
    if len(entries) < count:
        raise SampleError(
            f"--checkpoints {count}: {backup.backup_dir} holds {len(entries)} readable backup(s) "
            "(trainers.fit keeps the --keep_backups newest, default 2). Use fewer, train with "
            f"`trainers.fit --keep_backups {count}`, or pass saved models with --model_files.")
    if not config.get("model"):
        raise SampleError(f"--checkpoints needs the run's settings: {model_dir}/config.json is "
                          "missing or has no 'model'.")
    from trainers import presets

    config = {**presets.complete(config), "strategy": "default",
              "buffer_init": "uniform"}  # the same variables as the run, without its init
    info = data.get_info(config["dataset"])
    models = []
    for entry in reversed(entries[:count]):
        model = fit.build(config, info, steps_per_epoch=1)
        try:
            backup.restore(model, global_step=entry["global_step"])
        except checkpointing.IncompatibleCheckpointError as error:
            raise SampleError(str(error)) from None
        models.append(model)
    return models, [entry["global_step"] for entry in reversed(entries[:count])]


def load_model(path):
    import keras

    import keras_jem  # noqa: F401  (registers the serializable classes)

    for module in ("keras_jem.models.gmmc", "keras_jem.models.igebm", "keras_jem.generation"):
        __import__(module)
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001  (any loading problem is bad input here)
        raise SampleError(
            f"Could not load the model from {path!r}: {type(error).__name__}: {error}"
        ) from None


def _label_rows(model, args, summary):
    """The `--labels` of `cond` and `compose` (recorded in `summary`) and the samples per label.

    Returns:
        `(labels, per_row)`.
    """
    labels = _check_labels(model, args.labels)
    summary["labels"] = labels
    return labels, args.num_samples or 8


def _check_labels(model, labels):
    num_classes = int(getattr(model, "num_classes", 1))
    conditional = getattr(model, "conditional", True) and num_classes > 1
    if labels is None:
        return list(range(num_classes))
    if not conditional:
        raise SampleError("This model is unconditional: it takes no --labels.")
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise SampleError(f"--labels {bad} are not classes of the model (0..{num_classes - 1}).")
    return labels


def make_mask(kind, image_shape, seed=0):
    """Boolean (h, w) mask, True on the region to fill in."""
    import numpy as np

    height, width = image_shape[:2]
    mask = np.zeros((height, width), bool)
    if kind == "bottom":
        mask[height // 2:] = True
    elif kind == "top":
        mask[: height // 2] = True
    elif kind == "left":
        mask[:, : width // 2] = True
    elif kind == "right":
        mask[:, width // 2:] = True
    elif kind == "center":
        mask[height // 4: height - height // 4, width // 4: width - width // 4] = True
    else:
        mask = np.random.default_rng(seed).uniform(size=(height, width)) < 0.5
    return mask


def _load_images(args, model, count):
    import numpy as np

    from keras_jem import data as data_lib

    try:
        images, labels = data_lib.load(args.dataset, split=args.split, data_dir=args.data_dir)
    except (ValueError, RuntimeError) as error:
        raise SampleError(f"Could not load {args.dataset!r} ({args.split}): {error}") from None
    if tuple(images.shape[1:]) != tuple(model.image_shape):
        raise SampleError(
            f"{args.dataset!r} images have shape {images.shape[1:]}, the model takes "
            f"{model.image_shape}."
        )
    order = np.random.default_rng(args.seed).permutation(len(images))[:count]
    return images[order], labels[order]


def sample_mala(model, args, num_samples=None, y=None):
    """Long MALA chains under the model's energy (inference mode); returns (images, summary)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_jem.sampling import MALA

    num_samples = len(y) if y is not None else num_samples
    labels = None if y is None else tf.constant(np.asarray(y, np.int32))
    seed = tf.constant([args.seed, 29], tf.int64)
    if args.from_buffer:
        # The labels the model's buffer draws by (None: class-agnostic, e.g. IGEBM's FIFO).
        _, x_init, _ = model.buffer.draw(num_samples, labels=model._buffer_labels(labels),
                                         seed=seed)
    else:
        x_init = model.buffer.fresh_samples(num_samples, labels=labels, seed=seed)
    sampler = MALA(num_steps=args.num_steps, step_size=args.step_size,
                   num_adaptation_steps=args.num_adaptation_steps,
                   target_acceptance_rate=args.target_acceptance_rate)
    print(f"[trainers.sample] MALA: {num_samples} chains, {args.num_steps} steps "
          f"({args.num_adaptation_steps} adapting the step size)...", file=sys.stderr, flush=True)
    result = sampler.sample(model, x_init, y=labels, seed=seed, training=False)
    rates = keras.ops.convert_to_numpy(result.acceptance_rate)
    summary = {
        "sampler": "mala",
        "mala": sampler.get_config(),
        "acceptance_rate": float(np.mean(rates)),
        "acceptance_rate_quantiles": [float(q) for q in np.quantile(rates, [0.0, 0.5, 1.0])],
        "final_step_size": float(result.step_size),
    }
    print(f"[trainers.sample] MALA acceptance rate {summary['acceptance_rate']:.3f} (per chain "
          f"{rates.min():.3f} to {rates.max():.3f}) over the last "
          f"{args.num_steps - args.num_adaptation_steps} steps; step size "
          f"{summary['final_step_size']:.3g}", file=sys.stderr, flush=True)
    return keras.ops.convert_to_numpy(result.samples), summary


def run(args):
    import keras
    import numpy as np

    from keras_jem import generation
    from keras_jem.metrics import images as image_lib

    members = None
    if args.task == "ensemble":
        if args.checkpoints:
            members, steps = load_checkpoints(args.model_dir, args.config, args.checkpoints)
        else:
            members = [load_model(path) for path in args.model_files]
            steps = None
        model = members[-1]
    else:
        model = load_model(args.model_path)
    if not getattr(model, "built", False) or getattr(model, "image_shape", None) is None:
        raise SampleError(f"The model in {args.model_path!r} is not built (no image_shape).")
    summary = {"task": args.task, "model_path": args.model_path, "output": args.output,
               "seed": args.seed, "num_steps": args.num_steps}
    start = time.time()
    to_numpy = keras.ops.convert_to_numpy
    task = args.task
    if args.sampler == "mala":
        labels = None
        if task == "cond":
            labels, per_row = _label_rows(model, args, summary)
            num_cols = per_row
            grid, mala = sample_mala(model, args, y=np.repeat(labels, per_row))
        else:
            num_cols = None
            grid, mala = sample_mala(model, args, num_samples=args.num_samples or 64)
        summary.update(mala)
    elif task == "uncond":
        count = args.num_samples or 64
        grid = to_numpy(model.sample(num_samples=count, num_steps=args.num_steps,
                                     from_buffer=args.from_buffer, seed=args.seed))
        num_cols = None
    elif task == "cond":
        labels, per_row = _label_rows(model, args, summary)
        grid = to_numpy(model.sample(y=np.repeat(labels, per_row), num_steps=args.num_steps,
                                     from_buffer=args.from_buffer, seed=args.seed))
        num_cols = per_row
    elif task == "compose":
        labels, per_row = _label_rows(model, args, summary)
        x_init = np.random.default_rng(args.seed).uniform(
            -1.0, 1.0, (per_row,) + tuple(model.image_shape)).astype(np.float32)
        # Each label alone (one sampler run for all rows), then their sum, from the same noise.
        single = to_numpy(generation.langevin(
            model, np.tile(x_init, (len(labels), 1, 1, 1)), y=np.repeat(labels, per_row),
            num_steps=args.num_steps, seed=args.seed))
        composed = to_numpy(generation.compose([(model, label) for label in labels],
                                               x_init=x_init, num_steps=args.num_steps,
                                               seed=args.seed))
        target = generation.EnergySum([(model, label) for label in labels])
        summary["summed_energy_start"] = float(np.mean(to_numpy(target.energy(x_init))))
        summary["summed_energy_composed"] = float(np.mean(to_numpy(target.energy(composed))))
        grid = np.concatenate([single, composed])
        num_cols = per_row
    elif task == "ensemble":
        labels = None if args.labels is None else _check_labels(model, args.labels)
        per_row = args.num_samples or 8
        y = None if labels is None else np.repeat(labels, per_row)
        x_init = np.random.default_rng(args.seed).uniform(
            -1.0, 1.0, (per_row * len(labels or [0]),) + tuple(model.image_shape)
        ).astype(np.float32)
        single = to_numpy(generation.ensemble([model], x_init=x_init, y=y,
                                              num_steps=args.num_steps, seed=args.seed))
        both = to_numpy(generation.ensemble(members, x_init=x_init, y=y,
                                            num_steps=args.num_steps, seed=args.seed))
        target = generation.EnergySum(members)
        energy = (lambda x: float(np.mean(to_numpy(target.energy(x, None if y is None else
                                                                 np.asarray(y, np.int32))))))
        summary.update(labels=labels, num_models=len(members), checkpoint_steps=steps,
                       model_files=args.model_files,
                       ensemble_energy_start=energy(x_init), ensemble_energy_single=energy(single),
                       ensemble_energy_ensemble=energy(both))
        grid = np.concatenate([single, both])
        num_cols = per_row
    else:
        count = args.num_samples or 16
        images, labels = _load_images(args, model, count)
        y = labels if args.conditional else None
        if y is not None:
            _check_labels(model, [int(v) for v in set(labels.tolist())])
        if task == "inpaint":
            mask = make_mask(args.mask, model.image_shape, args.seed)
            full_mask = np.broadcast_to(mask[None, :, :, None], images.shape)
            shown = np.where(full_mask, 0.0, images).astype(np.float32)  # mid-grey mask
            result = to_numpy(generation.inpaint(model, images, mask, num_steps=args.num_steps,
                                                 y=y, seed=args.seed))
            summary["mask"] = args.mask
            summary["mse_masked_region"] = float(np.mean((result - images)[full_mask] ** 2))
            summary["unmasked_identical"] = bool(np.array_equal(result[~full_mask],
                                                                images[~full_mask]))
        else:
            shown = generation.salt_and_pepper(images, args.fraction, seed=args.seed)
            steps = {} if args.num_steps is None else {"num_steps": args.num_steps}
            result = to_numpy(generation.denoise(model, shown, num_rounds=args.num_rounds, y=y,
                                                 seed=args.seed, **steps))
            summary["fraction"] = args.fraction
            summary["num_rounds"] = args.num_rounds
            summary["mse_corrupted"] = float(np.mean((shown - images) ** 2))
            summary["mse_denoised"] = float(np.mean((result - images) ** 2))
        grid = np.concatenate([images, shown, result])
        num_cols = count
    image_lib.save_image_grid(grid, args.output, num_cols=num_cols)
    summary["seconds"] = round(time.time() - start, 2)
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        validate_args(args)
        console.setup(verbose=args.verbose)
        summary = run(args)
    except SampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
