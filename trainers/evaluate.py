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

The evaluation context (model, data, OOD sets) is `trainers/evaluation/context.py`, each task
is a module of `trainers/evaluation/` and the report writer is `trainers/evaluation/report.py`;
this module is the command line.

All inputs are checked before any long computation (model files, task names, OOD sets available
offline, image shapes, FID weights). A task that fails does not lose the others: the results
are written after every task, the failure is recorded, and the exit code is 1. Bad input exits
with code 2.
"""

import argparse
import datetime
import fractions
import os
import sys
import time
import traceback

from trainers import console
from trainers import run_dir
from trainers.evaluation import accuracy
from trainers.evaluation import calibration
from trainers.evaluation import generation
from trainers.evaluation import ood
from trainers.evaluation import robustness
from trainers.evaluation import saliency
from trainers.evaluation.context import EvaluationError
from trainers.evaluation.context import parse_list
from trainers.evaluation.context import prepare
from trainers.evaluation.report import write_outputs

TASKS = ("accuracy", "calibration", "ood", "robustness", "generation", "saliency")
# What `--tasks` runs when not given (saliency, a study of its own, only when asked for).
DEFAULT_TASKS = TASKS[:5]
TASK_FUNCTIONS = {
    "accuracy": accuracy.task,
    "calibration": calibration.task,
    "ood": ood.task,
    "robustness": robustness.task,
    "generation": generation.task,
    "saliency": saliency.task,
}
# JEM++'s L-infinity protocol (ALGORITHMS.md 3.5), in [0, 1] pixel units.
DEFAULT_LINF_EPSILONS = "0,1/255,2/255,4/255,8/255,12/255,16/255,22/255,30/255"
DEFAULT_L2_EPSILONS = "0,0.125,0.25,0.5,1.0"


def parse_epsilons(text):
    """Parse `"0,1/255,8/255,0.5"` into floats (fractions allowed)."""
    values = []
    for item in parse_list(text):
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
    parser = run_dir.build_parser(
        "python -m trainers.evaluate",
        "Evaluate a trained keras-jem model and write eval.json + report.md.",
        checkpoint_help="a .keras file to evaluate instead of model.keras",
        split_help="split of the in-distribution set",
    )
    add = parser.add_argument
    add("--tasks", default=",".join(DEFAULT_TASKS),
        help=f"comma-separated subset of {','.join(TASKS)}")
    add("--output_dir", default=None, help="where to write results (default MODEL_DIR/eval)")
    add("--dataset", default=None, help="in-distribution dataset (default: config.json)")
    add("--batch_size", type=int, default=100)
    add("--num_examples", type=int, default=None,
        help="use only the first N in-distribution examples (default: the whole split)")
    add("--input_noise", type=float, default=None,
        help="std of Gaussian noise added to test and OOD images (JEM adds 0.03, the others 0; "
             "default: config.json's test_noise_scale, else 0)")
    add("--refine_steps", type=int, default=0,
        help="SGLD refinement steps before classifying (accuracy, calibration, robustness)")
    add("--refine_chains", type=int, default=5,
        help="refined copies averaged by the attacked classifier (JEM: 5)")
    add("--refine_step_size", type=float, default=1.0)
    add("--refine_noise", type=float, default=0.01)
    add("--refine_gradient", default="straight_through", choices=("straight_through", "exact"),
        help="how PGD differentiates through the refinement: straight_through (JEM's "
             "attack_model.py: the SGLD updates are not differentiated) or exact (through "
             "every step)")
    # Calibration.
    add("--ece_bins", type=int, default=20)
    # OOD.
    add("--ood_sets", default=None,
        help="comma-separated OOD sets (default: the dataset's, keras_jem.data.ood_sets_for; "
             "digits: uniform_noise,interpolation,faces,photos; fashion_mnist: uniform_noise,"
             "vertical_flip,mnist_like_digits,interpolation,constant; cifar10: svhn,cifar100,"
             "celeb_a,interpolation)")
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
    add("--saliency_baseline", default=None,
        help="saliency: a trainers.fit run directory (e.g. runs/softmax) shown beside the model")
    add("--saliency_images", type=int, default=450, help="saliency: test images measured")
    add("--tensorboard_dir", default=None,
        help="where the figures and numbers also go as TensorBoard summaries (default "
             "MODEL_DIR/logs; 'none' writes none)")
    return parser


def _validate_args(args):
    """Cheap checks that need neither TensorFlow nor the model."""
    tasks = parse_list(args.tasks)
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise EvaluationError(
            f"Unknown task(s) {unknown or args.tasks!r}. Expected a comma-separated subset of "
            f"{', '.join(TASKS)}."
        )
    args.tasks = [task for task in TASKS if task in tasks]
    for name in ("batch_size", "attack_steps", "attack_restarts", "attack_examples", "ece_bins",
                 "num_samples", "refine_chains", "fid_reference_examples", "num_fresh_samples",
                 "saliency_images"):
        if getattr(args, name) < 1:
            raise EvaluationError(f"--{name} must be >= 1. Received: {getattr(args, name)}")
    for name in ("num_examples", "ood_examples"):
        value = getattr(args, name)
        if value is not None and value < 2:
            raise EvaluationError(f"--{name} must be >= 2. Received: {value}")
    if args.refine_steps < 0 or (args.input_noise is not None and args.input_noise < 0):
        raise EvaluationError("--refine_steps and --input_noise must be >= 0.")
    args.norms = parse_list(args.norms)
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
    config = run_dir.read_config(model_dir, EvaluationError)
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
    if config is None and args.dataset is None:
        raise EvaluationError(
            f"{config_path!r} is missing, so the dataset is unknown: pass --dataset NAME."
        )
    config = config or {}
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
    if args.tensorboard_dir != "none":
        args.tensorboard_dir = os.path.expanduser(
            args.tensorboard_dir or os.path.join(model_dir, "logs"))
    return args


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
    if args.tensorboard_dir != "none":
        from keras_jem import tensorboard

        tensorboard.write_evaluation(
            args.tensorboard_dir,
            figures=tensorboard.find_figures(report["tasks"], args.output_dir),
            scalars=report["tasks"], step=0)
        print(f"[evaluate] TensorBoard summaries in {args.tensorboard_dir}", flush=True)
    print(f"[evaluate] wrote {path} and {os.path.join(args.output_dir, 'report.md')}")
    return 1 if failed else 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = _validate_args(args)
        console.setup(verbose=args.verbose)  # before anything imports TensorFlow
        return run(args, argv)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
