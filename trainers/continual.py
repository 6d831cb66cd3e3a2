"""Continual (class-incremental) learning: Split MNIST style, no replay of earlier tasks' data.

    python -m trainers.continual --model igebm --dataset digits --tasks 5
    python -m trainers.continual --model softmax --dataset digits --tasks 5 --epochs 10
    python -m trainers.continual --model jem --dataset digits --tasks 5 --output_dir runs/cl_jem

The classes arrive in `--tasks` groups (`keras_jem.data.continual.class_incremental_tasks`:
{0, 1}, {2, 3}, ... for 5 tasks of 10 classes). One model is trained on each task in turn, on a
dataset built from that task's examples only, and after each task it classifies the test images
of every class seen so far among all the classes seen so far (no task label at test time: the
"active outputs" of class-incremental learning, van de Ven & Tolias 2019; never-trained classes
are not candidates); the accuracy is reported on the seen classes, in total and per class. The three learners (IGEBM paper, section 4.4):

- `softmax`: a classifier fine-tuned task by task (the known failure: it predicts only the
  last task's classes, about 1 / tasks of the seen classes right at the end).
- `igebm`: the conditional IGEBM. Its negatives are drawn with the batch's labels, i.e. the
  current task's classes, so the energies of earlier classes are not pushed up; it classifies
  by `argmin_y E(x, y)` over every class.
- `jem`: JEM with the same objective: no unconditional p(x) term (`--px_weight 0`), the class
  energies trained contrastively with negatives of the batch's labels (`--pxy_weight 1`), and
  the cross-entropy restricted to the classes of the batch (`JEM(ce_classes="batch")`).

Every other flag is `trainers.fit`'s (same presets and factory); `--epochs` is the number of
epochs per task. The run writes `continual.json` (the accuracy matrix, per-task summaries,
settings, wall time), `continual.md` (one Markdown table per task) and `continual.png` (the
per-class accuracy after each task) to `--output_dir` (default `--model_dir`).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from trainers import console
from trainers import fit
from trainers.factory import ConfigError

# The learners' settings for class-incremental learning, placed before the user's flags (which
# win). Epochs are per task; the digits values keep each model to a few minutes on 2 cores.
CONTINUAL_DEFAULTS = {
    "softmax": ["--epochs", "30"],
    "jem": ["--epochs", "30", "--px_weight", "0", "--pxy_weight", "1"],
    "igebm": ["--epochs", "30"],
}
MODELS = tuple(CONTINUAL_DEFAULTS)


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python -m trainers.continual",
        description="Class-incremental learning: train on each task's classes in turn and "
                    "report the accuracy on all classes seen so far. Other flags are "
                    "trainers.fit's (`python -m trainers.fit --model M --help`); --epochs is "
                    "per task.",
    )
    parser.add_argument("--model", default="igebm", choices=MODELS)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--tasks", type=int, default=5, help="number of tasks (5: Split MNIST)")
    parser.add_argument("--output_dir", default=None,
                        help="where the JSON, Markdown and PNG go (default: --model_dir)")
    return parser


def resolve(argv=None):
    """`(args, config)`: the continual flags and the resolved `trainers.fit` config."""
    args, rest = make_parser().parse_known_args(argv)
    model_dir = ["--model_dir", os.path.join("runs", f"continual_{args.model}_{args.dataset}")]
    config, _ = fit.resolve_config(
        ["--model", args.model, "--dataset", args.dataset] + model_dir
        + CONTINUAL_DEFAULTS[args.model] + rest)
    if args.tasks < 1:
        raise ConfigError(f"--tasks must be positive. Received: {args.tasks}")
    if config["buffer_init"] == "gaussian_mixture":
        raise ConfigError(
            "--buffer_init gaussian_mixture fits class Gaussians to the whole training set, "
            "i.e. to every task's data before the first task: use --buffer_init uniform.")
    if args.model == "igebm" and not config["conditional"]:
        raise ConfigError("Continual learning classifies with argmin_y E(x, y): the IGEBM must "
                          "be conditional (drop --no-conditional).")
    args.output_dir = args.output_dir or config["model_dir"]
    return args, config


def construct(config, info):
    """The model of `config` (`trainers.fit.construct`); JEM with the batch-restricted CE."""
    model = fit.construct(config, info)
    if config["model"] == "jem":
        model = type(model).from_config(dict(model.get_config(), ce_classes="batch"))
    return model


def predict_among(logits, classes):
    """The class of `classes` with the largest logit (IGEBM: the lowest energy), per row."""
    import numpy as np

    classes = np.asarray(classes)
    return classes[np.argmax(np.asarray(logits)[:, classes], axis=-1)]


def per_class_accuracy(predictions, labels, num_classes):
    """Accuracy of each class `(num_classes,)` (NaN for a class absent from `labels`)."""
    import numpy as np

    accuracy = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            accuracy[c] = float(np.mean(predictions[mask] == c))
    return accuracy


def seen_accuracy(predictions, labels, seen):
    """Accuracy on the test examples of the classes in `seen` (predictions over all classes)."""
    import numpy as np

    mask = np.isin(labels, seen)
    return float(np.mean(predictions[mask] == labels[mask]))


def run(args, config):
    """Trains task by task; returns the result dict (also written to `args.output_dir`)."""
    import keras
    import numpy as np

    from keras_jem import data
    from keras_jem.data import continual

    info = data.get_info(config["dataset"])
    model = construct(config, info)  # bad settings stop here, before any data is loaded
    keras.utils.set_random_seed(config["seed"])
    (train_x, train_y), _, (test_x, test_y) = fit.load_data(config)
    tasks = continual.class_incremental_tasks(train_y, args.tasks)
    batch_size = config["batch_size"]
    px_batch_size = config["px_batch_size"] or batch_size
    augment = config["augment"] or info.augment
    steps = [config["steps_per_epoch"] or data.steps_per_epoch(
        len(index), max(batch_size, px_batch_size)) for _, index in tasks]
    if min(steps) < 1:
        raise ConfigError(f"A task has fewer examples than a batch ({max(batch_size, px_batch_size)}"
                          "): lower --batch_size.")
    # Only the first task's examples reach the build (the optimizer's schedule needs steps).
    first = tasks[0][1]
    model = fit.build(config, info, train_x[first], train_y[first], steps[0], model=model)
    os.makedirs(args.output_dir, exist_ok=True)
    num_classes = info.num_classes
    matrix, summaries = [], []
    start = time.time()
    for t, (classes, index) in enumerate(tasks):
        task_ds = data.make_train_dataset(
            train_x[index], train_y[index], batch_size=batch_size, px_batch_size=px_batch_size,
            augment=None if augment == "none" else augment, augment_px=config["augment_px"],
            noise_scale=config["noise_scale"], seed=config["seed"] + t)
        task_start = time.time()
        model.fit(task_ds, epochs=config["epochs"], steps_per_epoch=steps[t],
                  verbose=console.progress_verbosity(config["verbose"]))
        seen = continual.seen_so_far(tasks, t)
        logits = keras.ops.convert_to_numpy(model.predict(test_x, batch_size=256, verbose=0))
        predictions = predict_among(logits, seen)
        per_class = per_class_accuracy(predictions, test_y, num_classes)
        summary = {
            "task": t + 1, "classes": list(classes), "seen": list(seen),
            "train_examples": len(index), "steps": steps[t] * config["epochs"],
            "seen_accuracy": seen_accuracy(predictions, test_y, seen),
            "current_task_accuracy": seen_accuracy(predictions, test_y, classes),
            "old_classes_accuracy": (seen_accuracy(predictions, test_y, seen[:-len(classes)])
                                     if t else None),
            "seconds": round(time.time() - task_start, 1),
        }
        matrix.append(per_class.tolist())
        summaries.append(summary)
        print(f"[trainers.continual] task {t + 1}/{len(tasks)} classes {classes}: accuracy on "
              f"the {len(seen)} seen classes {summary['seen_accuracy']:.2%} "
              f"({summary['seconds']} s)", flush=True)
    result = {
        "model": config["model"], "dataset": config["dataset"], "tasks": args.tasks,
        "average_accuracy": float(np.mean([s["seen_accuracy"] for s in summaries])),
        "final_accuracy": summaries[-1]["seen_accuracy"],
        "per_task": summaries, "per_class_accuracy": matrix,
        "wall_time_seconds": round(time.time() - start, 1),
        "config": config,
    }
    write_report(result, args.output_dir)
    return result


def markdown(result):
    """One Markdown table per task: accuracy of each seen class, and over the seen classes."""
    lines = [f"## {result['model']} on {result['dataset']}, {result['tasks']} tasks", ""]
    for summary, row in zip(result["per_task"], result["per_class_accuracy"]):
        seen = summary["seen"]
        lines += [
            (f"After task {summary['task']} (classes {', '.join(map(str, summary['classes']))}; "
             f"{summary['train_examples']} examples, {summary['steps']} steps):"), "",
            "| " + " | ".join(["class"] + [str(c) for c in seen] + ["seen classes"]) + " |",
            "|" + " --- |" * (len(seen) + 2),
            "| " + " | ".join(["accuracy"] + [f"{100 * row[c]:.1f}%" for c in seen]
                              + [f"**{100 * summary['seen_accuracy']:.1f}%**"]) + " |", "",
        ]
    lines += [(f"Average over the tasks of the seen-class accuracy: "
               f"{100 * result['average_accuracy']:.1f}%; after the last task: "
               f"{100 * result['final_accuracy']:.1f}% ({result['wall_time_seconds']} s)."), ""]
    return "\n".join(lines)


def write_report(result, output_dir):
    with open(os.path.join(output_dir, "continual.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True, default=str)
    with open(os.path.join(output_dir, "continual.md"), "w") as f:
        f.write(markdown(result))
    plot(result, os.path.join(output_dir, "continual.png"))


def plot(results, path):
    """Heatmaps (task x class) of the per-class accuracy after each task, one per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = results if isinstance(results, (list, tuple)) else [results]
    fig, axes = plt.subplots(1, len(results), figsize=(3.4 * len(results), 2.6), squeeze=False)
    for ax, result in zip(axes[0], results):
        matrix = np.array(result["per_class_accuracy"], float)
        for t, summary in enumerate(result["per_task"]):  # unseen classes left blank
            matrix[t, [c for c in range(matrix.shape[1]) if c not in summary["seen"]]] = np.nan
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (t, c), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(c, t, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 else "black")
        ax.set_title(f"{result['model']}: final {100 * result['final_accuracy']:.0f}%",
                     fontsize=9)
        ax.set_xlabel("class", fontsize=8)
        ax.set_ylabel("after task", fontsize=8)
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]), [str(t + 1) for t in range(matrix.shape[0])])
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    try:
        args, config = resolve(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    console.setup(verbose=False)
    try:
        result = run(args, config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
