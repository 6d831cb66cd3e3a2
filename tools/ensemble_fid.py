"""FID of one IGEBM against the ensemble of its last N checkpoints (IGEBM paper, section 4.1).

    python -m tools.ensemble_fid --dataset digits --output_dir reports/digits/ensemble
    python -m tools.ensemble_fid --dataset fashion_mnist --output_dir reports/fashion_mnist/ensemble \\
        --classifier reports/fashion_mnist/softmax/model.keras --chains noise:100,buffer:20

The paper samples CIFAR-10 from the summed energies of its 10 last checkpoints ("EBM (10
historical ensemble)": IS 6.02 -> 6.78). This tool measures the same comparison on a dataset
of the registry:

1. trains an IGEBM with the dataset's preset, `python -m trainers.fit --model igebm
   --keep_backups N --save_freq epoch` (its `N` newest backups are then the last `N` epochs),
   into `OUTPUT_DIR/igebm` (skipped when `model.keras` is already there);
2. restores the `N` newest backups (`trainers.sample.load_checkpoints`); the newest alone is
   the single model, all `N` the ensemble (`keras_jem.generation.ensemble`, summed energies);
3. for each chain setting of `--chains` (`noise:K`: K steps from uniform noise; `buffer:K`: K
   steps from the newest model's replay buffer), draws `--per_class` class-conditional samples
   per class with the single model and with the ensemble from the same starting images, the
   same sampler and the same number of steps;
4. scores each set by its Frechet distance to the test images in the penultimate features of a
   softmax classifier of the same dataset (`--classifier`; by default one is trained into
   `OUTPUT_DIR/softmax`): Inception weights cannot be downloaded here, so the FID is the
   study's "FID (<dataset>-CNN)", comparable between the rows of one run only. The floor is the
   same number of training images against the same test images.

Writes `OUTPUT_DIR/ensemble_fid.json` (with the samples' settings and wall times) and
`OUTPUT_DIR/ensemble_fid.md`, and prints the table. The samples themselves go to
`OUTPUT_DIR/ensemble_samples.npz`.
"""

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np

from tools import study

CHAIN_STARTS = ("noise", "buffer")


def parse_chains(text):
    """`"noise:100,buffer:20"` -> `[("noise", 100), ("buffer", 20)]`."""
    chains = []
    for item in text.split(","):
        start, _, steps = item.strip().partition(":")
        if start not in CHAIN_STARTS or not steps.isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(
                f"each chain is START:STEPS with START in {', '.join(CHAIN_STARTS)} and STEPS a "
                f"positive integer, e.g. noise:100,buffer:20. Received: {item!r}")
        chains.append((start, int(steps)))
    return chains


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m tools.ensemble_fid",
        description="FID of one IGEBM against the ensemble of its last N epochs' checkpoints.")
    add = parser.add_argument
    add("--dataset", default="digits", choices=("digits", "fashion_mnist"))
    add("--output_dir", default=None, help="default reports/<dataset>/ensemble")
    add("--members", type=int, default=5, help="checkpoints in the ensemble (the paper: 10)")
    add("--classifier", default=None,
        help="softmax .keras whose backbone features the FID uses (default: trained into "
             "OUTPUT_DIR/softmax)")
    add("--fit_args", default="", help="extra trainers.fit flags for the IGEBM, e.g. '--epochs 8'")
    add("--per_class", type=int, default=50, help="samples per class (default %(default)s)")
    add("--chains", type=parse_chains, default=parse_chains("noise:100,noise:300,buffer:20"),
        help="START:STEPS,... with START noise or buffer (default noise:100,noise:300,buffer:20)")
    add("--reference_examples", type=int, default=None,
        help="test images the FID compares with (default all)")
    add("--seed", type=int, default=0)
    return parser


def _run(command, log_path):
    print(f"[ensemble_fid] {' '.join(command)}", flush=True)
    study.run_logged(command, log_path)


def train(args, output_dir):
    """Trains the IGEBM (and, without `--classifier`, the softmax) unless already there."""
    fit = [sys.executable, "-m", "trainers.fit", "--dataset", args.dataset, "--sample_every", "0"]
    igebm_dir = os.path.join(output_dir, "igebm")
    if not os.path.exists(os.path.join(igebm_dir, "model.keras")):
        _run(fit + ["--model", "igebm", "--model_dir", igebm_dir, "--save_freq", "epoch",
                    "--keep_backups", str(args.members), *shlex.split(args.fit_args)],
             os.path.join(output_dir, "igebm.fit.log"))
    classifier = args.classifier or os.path.join(output_dir, "softmax", "model.keras")
    if not os.path.exists(classifier):
        _run(fit + ["--model", "softmax", "--model_dir", os.path.dirname(classifier)],
             os.path.join(output_dir, "softmax.fit.log"))
    return igebm_dir, classifier


def measure(args, igebm_dir, classifier_path):
    """The single model's and the ensemble's FID for each chain setting (a dict)."""
    import keras
    import tensorflow as tf

    from keras_jem import data
    from keras_jem import generation
    from keras_jem import metrics
    from trainers import sample as sample_cli

    with open(os.path.join(igebm_dir, "config.json")) as f:
        config = json.load(f)
    members, steps = sample_cli.load_checkpoints(igebm_dir, config, args.members)
    newest = members[-1]
    features = study.feature_function(classifier_path)
    info = data.get_info(args.dataset)
    test_images, _ = data.load(args.dataset, "test", num_examples=args.reference_examples)
    mu, sigma = metrics.activation_statistics(features(test_images))

    def fid(images):
        return study.fid_to(features(images), mu, sigma)

    labels = np.repeat(np.arange(info.num_classes), args.per_class).astype(np.int32)
    train_images, _ = data.load(args.dataset, "train", num_examples=len(labels))
    noise = np.random.default_rng(args.seed).uniform(
        -1.0, 1.0, (len(labels),) + tuple(info.image_shape)).astype(np.float32)
    # IGEBM's FIFO buffer is class-agnostic (as in the official code, whose chains also start
    # from any stored sample whatever the label they are then run under).
    _, from_buffer, _ = newest.buffer.draw(len(labels), seed=tf.constant([args.seed, 29],
                                                                         tf.int64))
    starts = {"noise": noise, "buffer": keras.ops.convert_to_numpy(from_buffer)}
    result = {
        "dataset": args.dataset, "members_global_steps": steps, "igebm_dir": igebm_dir,
        "classifier": classifier_path, "samples": len(labels),
        "reference": f"{len(test_images)} {args.dataset} test images",
        "fid_train_vs_test": fid(train_images), "chains": {},
    }
    saved = {}
    for start, num_steps in args.chains:
        name = f"{start}_{num_steps}_steps"
        row = {}
        for label, models in (("single", [newest]), (f"ensemble{len(members)}", members)):
            begin = time.time()
            images = keras.ops.convert_to_numpy(generation.ensemble(
                models, x_init=starts[start], y=labels, num_steps=num_steps, seed=args.seed + 1))
            row[label] = {"fid": fid(images), "seconds": round(time.time() - begin, 1)}
            saved[f"{name}_{label}"] = images
        result["chains"][name] = row
        print(f"[ensemble_fid] {name}: {row}", flush=True)
    saved["labels"] = labels
    return result, saved


def to_markdown(result):
    ensemble = f"ensemble of {len(result['members_global_steps'])}"
    lines = [f"| start, steps | single model | {ensemble} | sampling time single / ensemble |",
             "| --- | --- | --- | --- |"]
    for name, row in result["chains"].items():
        single, both = row["single"], next(v for k, v in row.items() if k != "single")
        start, steps, _ = name.split("_", 2)
        start = "uniform noise" if start == "noise" else "the newest model's replay buffer"
        lines.append(f"| {start}, {steps} steps | {single['fid']:.1f} | {both['fid']:.1f} | "
                     f"{single['seconds']:.0f} s / {both['seconds']:.0f} s |")
    lines.append(f"\nFID in the features of {result['classifier']} against "
                 f"{result['reference']}, {result['samples']} class-conditional samples; "
                 f"{result['samples']} training images score {result['fid_train_vs_test']:.1f}. "
                 f"Members: the backups at global steps {result['members_global_steps']}.")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.members < 1 or args.per_class < 1:
        raise SystemExit(f"--members and --per_class must be positive. Received: "
                         f"{args.members}, {args.per_class}")
    if args.classifier and not os.path.exists(args.classifier):
        raise SystemExit(f"--classifier {args.classifier!r} does not exist: pass a trained "
                         "softmax .keras (trainers.fit --model softmax) or leave it out.")
    output_dir = args.output_dir or os.path.join("reports", args.dataset, "ensemble")
    os.makedirs(output_dir, exist_ok=True)
    igebm_dir, classifier = train(args, output_dir)
    result, saved = measure(args, igebm_dir, classifier)
    with open(os.path.join(output_dir, "ensemble_fid.json"), "w") as f:
        json.dump(result, f, indent=1)
    np.savez_compressed(os.path.join(output_dir, "ensemble_samples.npz"), **saved)
    table = to_markdown(result)
    with open(os.path.join(output_dir, "ensemble_fid.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
