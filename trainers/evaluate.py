"""Evaluate a trained model: accuracy, calibration, OOD detection, robustness and generation.

Usage:

```
python -m trainers.evaluate --model_dir runs/jem_digits \
    --tasks accuracy,calibration,ood,robustness,generation
```

Reads `MODEL_DIR/model.keras` and `MODEL_DIR/config.json` (written by `trainers.fit`) and writes
into `--output_dir` (default `MODEL_DIR/eval`):

- `eval.json`: every number with the settings that produced it, and per task its status
  (`ok`, `skipped` with the reason, or `failed` with the error);
- `report.md`: the same as a readable report with the figures embedded (relative paths);
- the figures (`*.png`) and `predictions.npz` (per-example loss, correctness, confidence).

All inputs are checked before any long computation (model files, task names, OOD sets available
offline, image shapes, FID weights). A task that fails does not lose the others: the results
are written after every task, the failure is recorded, and the exit code is 1. Bad input exits
with code 2.
"""

import argparse
import datetime
import fractions
import inspect
import json
import os
import sys
import time
import traceback

TASKS = ("accuracy", "calibration", "ood", "robustness", "generation")
DEFAULT_OOD_SETS = {
    "digits": ("uniform_noise", "interpolation", "faces", "photos"),
    "cifar10": ("svhn", "cifar100", "celeb_a", "interpolation"),
    "cifar100": ("svhn", "cifar10", "celeb_a", "interpolation"),
    "svhn": ("cifar10", "cifar100", "celeb_a", "interpolation"),
}
FALLBACK_OOD_SETS = ("uniform_noise", "interpolation")
JEM_FAMILY = ("jem", "jempp", "jem++", "sadajem", "sada_jem", "sada-jem")
# JEM++'s L-infinity protocol (ALGORITHMS.md 3.5), in [0, 1] pixel units.
DEFAULT_LINF_EPSILONS = "0,1/255,2/255,4/255,8/255,12/255,16/255,22/255,30/255"
DEFAULT_L2_EPSILONS = "0,0.125,0.25,0.5,1.0"


class EvaluationError(Exception):
    """Bad input found before the evaluation starts (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# Command line


def _parse_list(text):
    return [item.strip() for item in str(text).split(",") if item.strip()]


def parse_epsilons(text):
    """Parse `"0,1/255,8/255,0.5"` into floats (fractions allowed)."""
    values = []
    for item in _parse_list(text):
        try:
            values.append(float(fractions.Fraction(item)))
        except (ValueError, ZeroDivisionError):
            raise EvaluationError(
                f"Could not read epsilon {item!r}: use numbers or fractions such as 8/255, "
                "separated by commas."
            ) from None
    if not values or min(values) < 0:
        raise EvaluationError(f"Epsilons must be a non-empty list of values >= 0. Got: {text!r}")
    return sorted(values)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m trainers.evaluate",
        description="Evaluate a trained keras-jem model and write eval.json + report.md.",
    )
    add = parser.add_argument
    add("--model_dir", required=True, help="directory written by trainers.fit")
    add("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    add("--output_dir", default=None, help="where to write results (default MODEL_DIR/eval)")
    add("--checkpoint", default=None, help="a .keras file to evaluate instead of model.keras")
    add("--dataset", default=None, help="in-distribution dataset (default: config.json)")
    add("--split", default="test", help="split of the in-distribution set (default test)")
    add("--data_dir", default=None, help="TFDS data directory (default: config.json, then TFDS)")
    add("--batch_size", type=int, default=100)
    add("--num_examples", type=int, default=None,
        help="use only the first N in-distribution examples (default: the whole split)")
    add("--seed", type=int, default=0)
    add("--input_noise", type=float, default=None,
        help="std of Gaussian noise added to test and OOD images (JEM adds 0.03, the others 0; "
             "default: config.json's test_noise_scale, else 0)")
    add("--refine_steps", type=int, default=0,
        help="SGLD refinement steps before classifying (accuracy, calibration, robustness)")
    add("--refine_chains", type=int, default=5,
        help="refined copies averaged by the attacked classifier (JEM: 5)")
    add("--refine_step_size", type=float, default=1.0)
    add("--refine_noise", type=float, default=0.01)
    # Calibration.
    add("--ece_bins", type=int, default=20)
    # OOD.
    add("--ood_sets", default=None,
        help="comma-separated OOD sets (default per dataset; digits: "
             + ",".join(DEFAULT_OOD_SETS["digits"]) + "; cifar10: "
             + ",".join(DEFAULT_OOD_SETS["cifar10"]) + ")")
    add("--ood_scores", default=None,
        help="comma-separated scores: logsumexp,max_softmax,grad_norm,energy "
             "(default: logsumexp,max_softmax,grad_norm; energy first for gmmc/igebm)")
    add("--ood_examples", type=int, default=None,
        help="images per OOD set (default: as many as in-distribution images)")
    # Robustness.
    add("--norms", default="linf,l2", help="PGD threat models: linf, l2")
    add("--epsilons", default=DEFAULT_LINF_EPSILONS,
        help="L-inf epsilons on the [0,1] pixel scale (fractions allowed)")
    add("--l2_epsilons", default=DEFAULT_L2_EPSILONS, help="L2 epsilons on the [0,1] pixel scale")
    add("--attack_steps", type=int, default=50, help="PGD steps (JEM++: 50)")
    add("--linf_step_size", default="2/255",
        help="L-inf PGD step on the [0,1] pixel scale (JEM++: 2/255); 'auto' = 2.5*eps/steps")
    add("--l2_step_size", default="auto",
        help="L2 PGD step on the [0,1] pixel scale; 'auto' = 2.5*eps/steps")
    add("--attack_restarts", type=int, default=1)
    add("--attack_examples", type=int, default=1000,
        help="test images attacked (JEM++: 1000, shuffled with the seed)")
    # Generation.
    add("--num_samples", type=int, default=100, help="samples in the grids")
    add("--sample_steps", type=int, default=None, help="sampler steps (default: the model's)")
    add("--fid_weights", default=None,
        help="Keras InceptionV3 weights .h5 (default: look in ~/.keras/models; skip IS/FID if "
             "absent)")
    add("--fid_reference", default=None,
        help=".npz reference statistics; computed from the training split and saved there if "
             "the file does not exist (default OUTPUT_DIR/fid_reference_<dataset>.npz)")
    add("--fid_reference_examples", type=int, default=10000)
    add("--num_fresh_samples", type=int, default=1000,
        help="fresh samples from noise scored with IS/FID (papers: 50000)")
    add("--is_top_k", type=float, default=0.1,
        help="buffer top-k per class for IS (<=1 fraction, >1 count; SADA-JEM: 0.1)")
    add("--fid_top_k", type=float, default=0.9,
        help="buffer top-k per class for FID (SADA-JEM: 0.9)")
    add("--fid_image_size", type=int, default=299, help=argparse.SUPPRESS)
    return parser


def _validate_args(args):
    """Cheap checks that need neither TensorFlow nor the model."""
    tasks = _parse_list(args.tasks)
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise EvaluationError(
            f"Unknown task(s) {unknown or args.tasks!r}. Expected a comma-separated subset of "
            f"{', '.join(TASKS)}."
        )
    args.tasks = [task for task in TASKS if task in tasks]
    for name in ("batch_size", "attack_steps", "attack_restarts", "attack_examples", "ece_bins",
                 "num_samples", "refine_chains", "fid_reference_examples", "num_fresh_samples"):
        if getattr(args, name) < 1:
            raise EvaluationError(f"--{name} must be >= 1. Received: {getattr(args, name)}")
    for name in ("num_examples", "ood_examples"):
        value = getattr(args, name)
        if value is not None and value < 2:
            raise EvaluationError(f"--{name} must be >= 2. Received: {value}")
    if args.refine_steps < 0 or (args.input_noise is not None and args.input_noise < 0):
        raise EvaluationError("--refine_steps and --input_noise must be >= 0.")
    args.norms = _parse_list(args.norms)
    bad_norms = [norm for norm in args.norms if norm not in ("linf", "l2")]
    if bad_norms or not args.norms:
        raise EvaluationError(f"Unknown --norms {bad_norms or args.norms}: use linf and/or l2.")
    args.epsilons = parse_epsilons(args.epsilons)
    args.l2_epsilons = parse_epsilons(args.l2_epsilons)
    for name in ("linf_step_size", "l2_step_size"):
        value = getattr(args, name)
        if value in (None, "auto"):
            setattr(args, name, None)
        else:
            setattr(args, name, parse_epsilons(value)[0])
    for name in ("is_top_k", "fid_top_k"):
        if getattr(args, name) <= 0:
            raise EvaluationError(f"--{name} must be > 0. Received: {getattr(args, name)}")

    model_dir = os.path.expanduser(args.model_dir)
    if not os.path.isdir(model_dir):
        raise EvaluationError(f"--model_dir {model_dir!r} does not exist.")
    config_path = os.path.join(model_dir, "config.json")
    model_path = os.path.expanduser(args.checkpoint) if args.checkpoint else os.path.join(
        model_dir, "model.keras")
    if not os.path.isfile(model_path):
        hint = ""
        checkpoints = os.path.join(model_dir, "checkpoints")
        if os.path.isdir(checkpoints) and os.listdir(checkpoints):
            hint = (f" There are checkpoints in {checkpoints!r}: training may not have finished; "
                    "pass one with --checkpoint PATH.keras.")
        raise EvaluationError(
            f"No trained model in {model_dir!r}: {model_path!r} does not exist. Train one with "
            f"`python -m trainers.fit --model_dir {args.model_dir} ...`.{hint}"
        )
    if not model_path.endswith(".keras"):
        raise EvaluationError(f"--checkpoint must be a full-model .keras file. Got: {model_path!r}")
    config = {}
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, ValueError) as error:
            raise EvaluationError(f"Could not read {config_path!r}: {error}") from None
    elif args.dataset is None:
        raise EvaluationError(
            f"{config_path!r} is missing, so the dataset is unknown: pass --dataset NAME."
        )
    args.model_dir = model_dir
    args.model_path = model_path
    args.config = config
    args.dataset = args.dataset or config.get("dataset")
    if not args.dataset:
        raise EvaluationError(f"{config_path!r} has no 'dataset' entry: pass --dataset NAME.")
    args.data_dir = args.data_dir or config.get("data_dir")
    if args.input_noise is None:
        args.input_noise = float(config.get("test_noise_scale") or 0.0)
    args.output_dir = os.path.expanduser(args.output_dir or os.path.join(model_dir, "eval"))
    return args


# ---------------------------------------------------------------------------------------------
# Preparation: everything that can fail on bad input, before the long computations


class Context:
    """Everything the tasks share: args, model, data, cached predictions."""

    def __init__(self, args):
        self.args = args
        self.model = None
        self.images = None
        self.labels = None
        self.ood_sets = {}
        self.ood_scores = []
        self.extractor = None
        self.extractor_skip_reason = None
        self.extractor_weights = None
        self.num_classes = None
        self.logits = None

    def output(self, name):
        return os.path.join(self.args.output_dir, name)


def _import_libraries():
    import keras  # noqa: F401

    import keras_jem  # noqa: F401  (registers the serializable classes)

    for module in ("keras_jem.models", "keras_jem.backbones", "keras_jem.sampling"):
        try:
            __import__(module)
        except ImportError:
            pass


def prepare(args):
    """Load model, data and OOD sets and check that they fit together."""
    import keras
    import numpy as np

    from keras_jem import data as data_lib
    from keras_jem import metrics

    context = Context(args)
    try:
        info = data_lib.get_info(args.dataset)
    except ValueError as error:
        raise EvaluationError(str(error)) from None

    # OOD sets and scores: names first (cheap).
    ood_names = (_parse_list(args.ood_sets) if args.ood_sets
                 else list(DEFAULT_OOD_SETS.get(args.dataset, FALLBACK_OOD_SETS)))
    if "ood" in args.tasks:
        unknown = [name for name in ood_names if name not in data_lib.available_ood()]
        if unknown or not ood_names:
            raise EvaluationError(
                f"Unknown OOD set(s) {unknown or ood_names}. Available: "
                f"{list(data_lib.available_ood())}."
            )
        model_type = str(args.config.get("model", "")).lower()
        default_scores = ["logsumexp", "max_softmax", "grad_norm"]
        if model_type in ("gmmc", "igebm"):
            default_scores = ["energy"] + default_scores
        scores = _parse_list(args.ood_scores) if args.ood_scores else default_scores
        unknown = [name for name in scores if name not in metrics.available_scores()]
        if unknown:
            raise EvaluationError(
                f"Unknown OOD score(s) {unknown}. Available: {metrics.available_scores()}."
            )
        context.ood_scores = scores

    # FID weights: an explicit path must exist.
    if "generation" in args.tasks:
        if args.fid_weights is not None:
            try:
                metrics.find_inception_weights(args.fid_weights)
            except FileNotFoundError as error:
                raise EvaluationError(str(error)) from None
        if args.fid_reference and os.path.exists(args.fid_reference):
            try:
                metrics.load_statistics(args.fid_reference)
            except (ValueError, OSError) as error:
                raise EvaluationError(f"--fid_reference: {error}") from None

    # Model.
    _import_libraries()
    try:
        model = keras.saving.load_model(args.model_path, compile=False)
    except Exception as error:  # noqa: BLE001  (any loading problem is bad input here)
        raise EvaluationError(
            f"Could not load the model from {args.model_path!r}: {type(error).__name__}: {error}. "
            "Is it a .keras file written by trainers.fit (and is keras_jem importable)?"
        ) from None
    context.model = model

    # In-distribution data.
    try:
        images, labels = data_lib.load(
            args.dataset, split=args.split, data_dir=args.data_dir, download=False,
            num_examples=args.num_examples,
        )
    except (ValueError, RuntimeError) as error:
        raise EvaluationError(f"Could not load {args.dataset!r} ({args.split}): {error}") from None
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int64)
    if len(images) < 2:
        raise EvaluationError(f"{args.dataset!r} {args.split} holds {len(images)} images.")

    # Shapes: data, config, model.
    data_shape = tuple(images.shape[1:])
    expected = [("dataset " + args.dataset, tuple(info.image_shape))]
    if args.config.get("image_shape"):
        expected.append(("config.json image_shape", tuple(args.config["image_shape"])))
    model_shape = getattr(model, "image_shape", None)
    if model_shape:
        expected.append(("model.image_shape", tuple(model_shape)))
    for source, shape in expected:
        if tuple(shape) != data_shape:
            raise EvaluationError(
                f"Shape mismatch: the evaluation images are {data_shape} but {source} is "
                f"{tuple(shape)}. Evaluate the model on the dataset it was trained on "
                "(--dataset), or check --model_dir."
            )
    try:
        probe = np.asarray(model(images[:2], training=False))
    except Exception as error:  # noqa: BLE001
        raise EvaluationError(
            f"The model cannot process images of shape {data_shape}: "
            f"{type(error).__name__}: {error}"
        ) from None
    if probe.ndim != 2 or probe.shape[0] != 2:
        raise EvaluationError(
            f"The model must return logits (batch, num_classes); it returned {probe.shape}."
        )
    context.num_classes = int(probe.shape[1])
    config_classes = args.config.get("num_classes") or info.num_classes
    if context.num_classes > 1 and context.num_classes != config_classes:
        raise EvaluationError(
            f"The model has {context.num_classes} outputs but the dataset/config has "
            f"{config_classes} classes."
        )
    if context.num_classes > 1 and labels.max() >= context.num_classes:
        raise EvaluationError(
            f"Labels go up to {labels.max()} but the model has {context.num_classes} classes."
        )

    rng = np.random.default_rng(args.seed)

    # OOD sets: load them all now, so an unavailable one fails before any long computation.
    if "ood" in args.tasks:
        num_ood = args.ood_examples or len(images)
        for index, name in enumerate(ood_names):
            try:
                ood = data_lib.load_ood(
                    name, like=data_shape, reference_images=images, num_examples=num_ood,
                    seed=args.seed + 1 + index, data_dir=args.data_dir, download=False,
                )
            except (ValueError, RuntimeError, OSError) as error:
                raise EvaluationError(
                    f"OOD set {name!r} is not available: {error}\nDrop it with --ood_sets "
                    f"(e.g. --ood_sets {','.join(n for n in ood_names if n != name)})."
                ) from None
            ood = np.asarray(ood, np.float32)
            if tuple(ood.shape[1:]) != data_shape:
                raise EvaluationError(
                    f"OOD set {name!r} has images of shape {ood.shape[1:]}, expected {data_shape}."
                )
            if args.input_noise:
                ood = np.clip(ood + args.input_noise * rng.standard_normal(ood.shape), -1, 1)
            context.ood_sets[name] = ood.astype(np.float32)
    if args.input_noise:
        images = np.clip(
            images + args.input_noise * rng.standard_normal(images.shape), -1.0, 1.0
        ).astype(np.float32)
    context.images, context.labels = images, labels

    # Feature extractor for IS/FID: optional, only an explicit bad path is an error (above).
    if "generation" in args.tasks:
        try:
            weights, _ = metrics.find_inception_weights(args.fid_weights)
        except FileNotFoundError as error:
            context.extractor_skip_reason = str(error)
        else:
            context.extractor_weights = weights
    return context


# ---------------------------------------------------------------------------------------------
# Tasks


def _classifier_required(context):
    if context.num_classes < 2:
        return "skipped", (
            "the model is unconditional (one output: -energy); it has no classifier"
        )
    return None


def _logits(context):
    from keras_jem import metrics

    if context.logits is None:
        args = context.args
        context.logits = metrics.predict_logits(
            context.model, context.images, batch_size=args.batch_size,
            refine_steps=args.refine_steps, refine_chains=1,
            refine_step_size=args.refine_step_size, refine_noise=args.refine_noise,
            seed=args.seed,
        )
    return context.logits


def _refine_settings(args):
    return {
        "refine_steps": args.refine_steps,
        "refine_step_size": args.refine_step_size,
        "refine_noise": args.refine_noise,
    }


def task_accuracy(context):
    import numpy as np

    from keras_jem import metrics

    skip = _classifier_required(context)
    if skip:
        return {"status": skip[0], "reason": skip[1]}
    args = context.args
    result = metrics.classification_metrics(_logits(context), context.labels)
    per_example = result.pop("per_example")
    path = context.output("predictions.npz")
    os.makedirs(args.output_dir, exist_ok=True)
    np.savez(path, labels=context.labels, **per_example)
    return {
        "status": "ok",
        "settings": {"dataset": args.dataset, "split": args.split,
                     "num_examples": len(context.labels), "input_noise": args.input_noise,
                     **_refine_settings(args), "refine_chains": 1},
        "results": result,
        "files": {"predictions": os.path.basename(path)},
    }


def task_calibration(context):
    from keras_jem import metrics

    skip = _classifier_required(context)
    if skip:
        return {"status": skip[0], "reason": skip[1]}
    args = context.args
    probabilities = metrics.softmax(_logits(context))
    result = metrics.expected_calibration_error(probabilities, context.labels,
                                                num_bins=args.ece_bins)
    figure = metrics.reliability_diagram(
        result, context.output("reliability_diagram.png"),
        title=f"{args.config.get('model', 'model')} on {args.dataset} {args.split}",
    )
    return {
        "status": "ok",
        "settings": {"num_bins": args.ece_bins, "binning": "equal-width on [0, 1]",
                     "num_examples": len(context.labels), "input_noise": args.input_noise,
                     **_refine_settings(args)},
        "results": result,
        "figures": {"reliability_diagram": os.path.basename(figure)},
    }


def task_ood(context):
    from keras_jem import metrics

    args = context.args
    results, figures, errors, skipped = {}, {}, {}, {}
    for score_name in context.ood_scores:
        if context.num_classes < 2 and score_name == "max_softmax":
            skipped[score_name] = "max_softmax needs a classifier (the model is unconditional)"
            continue
        try:
            score_fn = metrics.get_score(score_name)
            in_scores = score_fn(context.model, context.images, batch_size=args.batch_size)
            out_scores = {
                name: score_fn(context.model, images, batch_size=args.batch_size)
                for name, images in context.ood_sets.items()
            }
            results[score_name] = {
                name: metrics.ood_metrics(in_scores, scores) for name, scores in out_scores.items()
            }
            path = metrics.score_histogram(
                in_scores, out_scores, context.output(f"ood_histogram_{score_name}.png"),
                score_name=score_name, in_name=f"{args.dataset} {args.split}",
            )
            figures[f"histogram_{score_name}"] = os.path.basename(path)
        except Exception as error:  # noqa: BLE001  (record, keep the other scores)
            errors[score_name] = f"{type(error).__name__}: {error}"
    task = {
        "status": "ok" if results and not errors else ("partial" if results else "failed"),
        "settings": {
            "in_distribution": f"{args.dataset} {args.split}",
            "num_in": len(context.images),
            "ood_sets": {name: len(images) for name, images in context.ood_sets.items()},
            "scores": context.ood_scores,
            "input_noise": args.input_noise,
            "positive_class": "in-distribution (higher score = more in-distribution)",
        },
        "results": results,
        "figures": figures,
    }
    if skipped:
        task["skipped"] = skipped
    if errors:
        task["errors"] = errors
        task["error"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
    return task


def task_robustness(context):
    import numpy as np

    from keras_jem import metrics

    skip = _classifier_required(context)
    if skip:
        return {"status": skip[0], "reason": skip[1]}
    args = context.args
    rng = np.random.default_rng(args.seed)
    count = min(args.attack_examples, len(context.images))
    chosen = np.sort(rng.permutation(len(context.images))[:count])
    images, labels = context.images[chosen], context.labels[chosen]
    curves, figures = [], {}
    for norm in args.norms:
        curve = metrics.robust_accuracy_curve(
            context.model, images, labels,
            epsilons=args.epsilons if norm == "linf" else args.l2_epsilons,
            norm=norm, num_steps=args.attack_steps,
            step_size=args.linf_step_size if norm == "linf" else args.l2_step_size,
            num_restarts=args.attack_restarts, epsilon_unit="pixel",
            batch_size=args.batch_size, seed=args.seed, refine_steps=args.refine_steps,
            refine_chains=args.refine_chains, refine_step_size=args.refine_step_size,
            refine_noise=args.refine_noise,
        )
        curve["label"] = norm + (f" (refined {args.refine_steps} steps x "
                                 f"{args.refine_chains} chains)" if args.refine_steps else "")
        curves.append(curve)
        path = metrics.save_robustness_plot(
            curve, context.output(f"robustness_{norm}.png"),
            title=f"PGD-{args.attack_steps} {norm}, {count} {args.dataset} images",
        )
        figures[f"robustness_{norm}"] = os.path.basename(path)
    json_path = metrics.save_robustness_json(curves, context.output("robustness.json"))
    return {
        "status": "ok",
        "settings": {
            "attack": "PGD, random start, cross-entropy loss, projected and clipped to [-1, 1] "
                      "every step",
            "epsilon_unit": "pixel: [0, 1] pixel scale (x2 in the model's [-1, 1] input)",
            "num_examples": int(count), "example_selection": f"random, seed {args.seed}",
            "num_steps": args.attack_steps, "num_restarts": args.attack_restarts,
            "linf_step_size": args.linf_step_size or "2.5*epsilon/num_steps",
            "l2_step_size": args.l2_step_size or "2.5*epsilon/num_steps",
            **_refine_settings(args), "refine_chains": args.refine_chains,
        },
        "results": {curve["norm"]: curve for curve in curves},
        "figures": figures,
        "files": {"curves": os.path.basename(json_path)},
    }


def _to_numpy(value):
    import keras
    import numpy as np

    return np.asarray(keras.ops.convert_to_numpy(value), np.float32)


def _sample(model, args, num_samples=None, y=None, seed=None):
    """Call `model.sample` in batches, passing only the arguments it accepts."""
    import numpy as np

    parameters = inspect.signature(model.sample).parameters
    kwargs = {}
    if args.sample_steps is not None and "num_steps" in parameters:
        kwargs["num_steps"] = args.sample_steps
    total = len(y) if y is not None else int(num_samples)
    outputs = []
    for index, start in enumerate(range(0, total, args.batch_size)):
        stop = min(total, start + args.batch_size)
        call = dict(kwargs)
        if "seed" in parameters and seed is not None:
            call["seed"] = seed + index
        if y is not None:
            call["y"] = np.asarray(y[start:stop])
        else:
            call["num_samples"] = stop - start
        outputs.append(_to_numpy(model.sample(**call)))
    return np.concatenate(outputs, axis=0)


def task_generation(context):
    import numpy as np

    from keras_jem import metrics

    args = context.args
    model = context.model
    if not callable(getattr(model, "sample", None)):
        return {"status": "skipped", "reason": f"{type(model).__name__} has no `sample` method"}
    results, figures, errors, skipped = {}, {}, {}, {}
    classify = context.num_classes > 1

    def probabilities_of(images):
        return metrics.softmax(metrics.predict_logits(model, images, args.batch_size))

    # Fresh samples from noise: unconditional grid, and most/least confident.
    samples = _sample(model, args, num_samples=args.num_samples, seed=args.seed)
    figures["samples"] = os.path.basename(
        metrics.save_image_grid(samples, context.output("samples.png")))
    results["samples"] = {"num_samples": len(samples), "source": "model.sample from fresh starts",
                          "num_steps": args.sample_steps or "model default"}
    if classify:
        sample_probabilities = probabilities_of(samples)
        for key, path in metrics.save_confidence_grids(
            samples, sample_probabilities, args.output_dir, count=min(64, len(samples)),
            prefix="samples_",
        ).items():
            figures[f"samples_{key}"] = os.path.basename(path)

        # Per class: conditional sampling when the model supports it.
        per_class = max(1, min(10, args.num_samples // max(1, context.num_classes) or 1))
        labels = np.repeat(np.arange(context.num_classes), per_class)
        try:
            class_samples = _sample(model, args, y=labels, seed=args.seed + 1)
            method = "model.sample(y=...) (class-conditional)"
            class_labels = labels
        except (TypeError, NotImplementedError, ValueError) as error:
            class_samples = samples
            class_labels = sample_probabilities.argmax(axis=1)
            method = (f"predicted class of unconditional samples (model.sample(y=...) failed: "
                      f"{type(error).__name__}: {error})")
        path = metrics.save_class_grid(class_samples, class_labels,
                                       context.output("samples_per_class.png"),
                                       num_classes=context.num_classes, per_class=per_class)
        figures["samples_per_class"] = os.path.basename(path)
        results["samples_per_class"] = {"method": method, "per_class": per_class}

    # Replay buffer.
    buffer_images = None
    buffer = getattr(model, "buffer", None)
    if buffer is not None and getattr(buffer, "images", None) is not None:
        buffer_images = _to_numpy(buffer.images)
        results["replay_buffer"] = {"size": len(buffer_images)}
        if classify:
            buffer_probabilities = probabilities_of(buffer_images)
            predicted = buffer_probabilities.argmax(axis=1)
            results["replay_buffer"]["predicted_class_counts"] = np.bincount(
                predicted, minlength=context.num_classes).tolist()
            for key, path in metrics.save_confidence_grids(
                buffer_images, buffer_probabilities, args.output_dir,
                count=min(64, len(buffer_images)), prefix="buffer_",
            ).items():
                figures[f"buffer_{key}"] = os.path.basename(path)
            order = np.argsort(-buffer_probabilities.max(axis=1), kind="stable")
            path = metrics.save_class_grid(
                buffer_images[order], predicted[order], context.output("buffer_per_class.png"),
                num_classes=context.num_classes, per_class=10)
            figures["buffer_per_class"] = os.path.basename(path)
        else:
            figures["buffer"] = os.path.basename(metrics.save_image_grid(
                buffer_images[:64], context.output("buffer.png")))
    else:
        skipped["replay_buffer"] = "the model has no replay buffer"

    # IS / FID.
    quality = _generation_quality(context, buffer_images, probabilities_of if classify else None,
                                  errors)
    if isinstance(quality, str):
        skipped["inception_score_and_fid"] = quality
    else:
        results.update(quality)

    task = {
        "status": "ok" if not errors else "partial",
        "settings": {
            "num_samples": args.num_samples, "sample_steps": args.sample_steps or "model default",
            "num_fresh_samples": args.num_fresh_samples, "is_top_k": args.is_top_k,
            "fid_top_k": args.fid_top_k, "fid_reference_examples": args.fid_reference_examples,
            "top_k_rule": "per predicted class, by max-softmax confidence; <=1 fraction, >1 count",
        },
        "results": results,
        "figures": figures,
    }
    if skipped:
        task["skipped"] = skipped
    if errors:
        task["errors"] = errors
        task["error"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
    return task


def _generation_quality(context, buffer_images, probabilities_of, errors):
    """IS/FID of the buffer's top-k per class and of fresh samples; a str = skip reason."""

    from keras_jem import data as data_lib
    from keras_jem import metrics

    args = context.args
    if context.extractor_skip_reason:
        return "no feature extractor: " + context.extractor_skip_reason
    if context.extractor is None:
        context.extractor = metrics.InceptionFeatureExtractor(
            context.extractor_weights, image_size=args.fid_image_size, batch_size=args.batch_size)
    extractor = context.extractor
    out = {}

    reference_path = args.fid_reference or context.output(f"fid_reference_{args.dataset}.npz")
    if os.path.exists(reference_path):
        reference = metrics.load_statistics(reference_path)
    else:
        real, _ = data_lib.load(args.dataset, "train", data_dir=args.data_dir, download=False,
                                num_examples=args.fid_reference_examples)
        mu, sigma = metrics.activation_statistics(extractor.features(real))
        reference_path = metrics.save_statistics(
            reference_path, mu, sigma, dataset=args.dataset, split="train",
            num_images=len(real), extractor=extractor.name,
            image_size=getattr(extractor, "image_size", None))
        reference = metrics.load_statistics(reference_path)
    out["fid_reference"] = {"path": reference_path, **reference["metadata"]}

    if buffer_images is not None and probabilities_of is not None:
        try:
            probabilities = probabilities_of(buffer_images)
            entry = {"protocol": "replay buffer, top-k per predicted class by confidence "
                                 "(SADA-JEM/JEM++/GMMC); optimistic vs fresh samples"}
            for metric, ratio in (("inception_score", args.is_top_k), ("fid", args.fid_top_k)):
                index = metrics.select_top_k_per_class(probabilities, ratio)
                quality = metrics.sample_quality(buffer_images[index], extractor,
                                                 reference if metric == "fid" else None)
                entry[metric] = {"top_k": ratio, "num_images": len(index),
                                 "value": quality[metric],
                                 **({"std": quality["inception_score_std"]}
                                    if metric == "inception_score" else {})}
            out["replay_buffer_top_k"] = entry
        except Exception as error:  # noqa: BLE001
            errors["replay_buffer_top_k"] = f"{type(error).__name__}: {error}"
    try:
        fresh = _sample(context.model, args, num_samples=args.num_fresh_samples,
                        seed=args.seed + 1000)
        quality = metrics.sample_quality(fresh, extractor, reference)
        quality["protocol"] = "fresh samples: model.sample from its initial (noise) distribution"
        out["fresh_samples"] = quality
    except Exception as error:  # noqa: BLE001
        errors["fresh_samples"] = f"{type(error).__name__}: {error}"
    out["extractor"] = extractor.name
    return out


TASK_FUNCTIONS = {
    "accuracy": task_accuracy,
    "calibration": task_calibration,
    "ood": task_ood,
    "robustness": task_robustness,
    "generation": task_generation,
}


# ---------------------------------------------------------------------------------------------
# Report


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_outputs(report, output_dir):
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "eval.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(report, f, indent=2, default=_json_default)
    os.replace(json_path + ".tmp", json_path)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(render_markdown(report))
    return json_path


def _fmt(value, percent=False, digits=4):
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{100 * value:.2f}%" if percent else f"{value:.{digits}g}"
    return str(value)


def render_markdown(report):
    lines = [
        f"# Evaluation of `{report['model_dir']}`",
        "",
        f"- model: `{report.get('model')}`, dataset: `{report.get('dataset')}`",
        f"- command: `{report['command']}`",
        f"- started {report['started']}" + (f", finished {report['finished']}"
                                            if report.get("finished") else " (running)"),
        "",
    ]
    for name, task in report["tasks"].items():
        lines += [f"## {name}", "", f"status: **{task['status']}**"
                  + (f" ({task['seconds']:.1f} s)" if "seconds" in task else ""), ""]
        if task.get("reason"):
            lines += [f"reason: {task['reason']}", ""]
        if task.get("error"):
            lines += ["error:", "", "```", str(task["error"]), "```", ""]
        results = task.get("results") or {}
        if name == "accuracy" and results:
            lines += [(f"- accuracy: **{_fmt(results['accuracy'], True)}** on "
                       f"{results['num_examples']} images"), f"- loss: {_fmt(results['loss'])}", ""]
        if name == "calibration" and results:
            lines += [f"- ECE ({results['num_bins']} bins): **{_fmt(results['ece'], True)}**", ""]
        if name == "ood" and results:
            sets = list(task["settings"]["ood_sets"])
            lines += ["AUROC (FPR at 95% TPR):", "",
                      "| score | " + " | ".join(sets) + " |",
                      "|---|" + "---|" * len(sets)]
            for score, per_set in results.items():
                cells = [f"{per_set[s]['auroc']:.3f} ({per_set[s]['fpr_at_95_tpr']:.3f})"
                         if s in per_set else "n/a" for s in sets]
                lines.append(f"| {score} | " + " | ".join(cells) + " |")
            lines.append("")
        if name == "robustness" and results:
            for norm, curve in results.items():
                lines += [(f"{curve.get('label', norm)}: PGD-{curve['num_steps']} on "
                           f"{curve['num_examples']} images"), "",
                          "| epsilon ([0, 1] pixel scale) | robust accuracy | per-epsilon |",
                          "|---|---|---|"]
                for eps, acc, raw in zip(curve["epsilons"], curve["accuracy"],
                                         curve["per_epsilon_accuracy"]):
                    shown = f"{eps * 255:.3g}/255" if norm == "linf" else f"{eps:.3g}"
                    lines.append(f"| {shown} | {_fmt(acc, True)} | {_fmt(raw, True)} |")
                lines.append("")
        if name == "generation" and results:
            for key in ("replay_buffer_top_k", "fresh_samples"):
                entry = results.get(key)
                if not entry:
                    continue
                if key == "fresh_samples":
                    lines.append(f"- fresh samples ({entry['num_images']}): IS "
                                 f"{_fmt(entry['inception_score'])}, FID {_fmt(entry['fid'])} "
                                 f"({entry['extractor']})")
                else:
                    lines.append(
                        f"- replay buffer top-k: IS {_fmt(entry['inception_score']['value'])} "
                        f"(top {entry['inception_score']['top_k']}), FID "
                        f"{_fmt(entry['fid']['value'])} (top {entry['fid']['top_k']})")
            for key, reason in (task.get("skipped") or {}).items():
                lines.append(f"- {key} skipped: {reason}")
            lines.append("")
        for label, figure in (task.get("figures") or {}).items():
            lines += [f"![{label}]({figure})", ""]
        if task.get("settings"):
            lines += ["<details><summary>settings</summary>", "", "```json",
                      json.dumps(task["settings"], indent=2, default=_json_default), "```", "",
                      "</details>", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main


def _settings(args):
    keys = [key for key in vars(args) if key not in ("config",)]
    return {key: getattr(args, key) for key in sorted(keys)}


def run(args, argv):
    """Prepare (validating everything), then run each task; returns the exit code."""
    context = prepare(args)
    import keras
    import tensorflow as tf

    report = {
        "model_dir": args.model_dir,
        "model_file": args.model_path,
        "model": args.config.get("model", type(context.model).__name__),
        "dataset": args.dataset,
        "command": "python -m trainers.evaluate " + " ".join(argv),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "settings": _settings(args),
        "config": args.config,
        "tasks": {},
    }
    failed = False
    for name in args.tasks:
        print(f"[evaluate] {name} ...", flush=True)
        start = time.time()
        try:
            task = TASK_FUNCTIONS[name](context)
        except Exception as error:  # noqa: BLE001  (a failing task must not lose the others)
            task = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc()}
        task["seconds"] = round(time.time() - start, 2)
        failed |= task["status"] in ("failed", "partial")
        report["tasks"][name] = task
        print(f"[evaluate] {name}: {task['status']} ({task['seconds']} s)"
              + (f": {task['error']}" if task.get("error") else ""), flush=True)
        write_outputs(report, args.output_dir)
    report["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    path = write_outputs(report, args.output_dir)
    print(f"[evaluate] wrote {path} and {os.path.join(args.output_dir, 'report.md')}")
    return 1 if failed else 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = _validate_args(args)
        return run(args, argv)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
