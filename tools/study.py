"""A study: every model on the same data and budget, one table (digits or Fashion-MNIST).

    python -m tools.study --dataset fashion_mnist --output_dir reports/fashion_mnist --seeds 1,2,3
    python -m tools.study --dataset digits --models softmax,jem --skip_existing
    python -m tools.study --dataset fashion_mnist --models softmax,jem \\
        --fit_args "--epochs 1 --steps_per_epoch 5" --eval_examples 200      # a smoke run

For each model this trains `python -m trainers.fit --model M --dataset D --seed S` with the
dataset's preset (plus `--fit_args`) and evaluates it with `python -m trainers.evaluate --tasks
accuracy,calibration,ood` on the dataset's OOD sets (`keras_jem.data.ood_sets_for(D)`; Fashion-
MNIST: uniform noise, vertically flipped test images, MNIST-like digits, averages of two test
images, constant images). IGEBM gets the generation columns only.

FID: Inception weights cannot be downloaded here, so the Frechet distance is computed in the
penultimate features (the backbone's output) of the study's own softmax classifier, trained on
the same dataset with the same backbone (the `softmax` run; trained even when it is not in
`--models`). The table names it "FID (FMNIST-CNN)" / "FID (digits-CNN)": it is comparable between
the models of one study, not with Inception FIDs in papers. Each model's replay buffer is compared
with the classifier features of `--fid_reference_examples` training images; the row "real test
images" gives the floor (held-out real images against the same reference).

`--seeds 1,2,3` trains the softmax, JEM, JEM++ and SADA-JEM once per seed (the other models once,
with the first seed); the main table shows their mean, `seeds.md` every seed. Outputs in `--output_dir`:
`table.md`, `table.json`, `seeds.md`, and one run directory per model and seed (`jem`,
`jem-seed2`, ...) with the sample grids (`samples/`), reliability diagrams and OOD histograms
(`eval/`) the table refers to.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

# Model name -> extra trainers.fit flags (the dataset's preset does the rest).
MODELS = {
    "softmax": [],
    "jem": [],
    "jempp": [],
    "sadajem": [],
    "gmmc-dis": ["--model", "gmmc", "--mode", "discriminative"],
    "gmmc-joint": ["--model", "gmmc", "--mode", "joint"],
    "gmmc-gen": ["--model", "gmmc", "--mode", "generative"],
    "igebm": [],
}
LABELS = {"softmax": "softmax", "jem": "JEM", "jempp": "JEM++", "sadajem": "SADA-JEM",
          "gmmc-dis": "GMMC (dis.)", "gmmc-joint": "GMMC (joint)", "gmmc-gen": "GMMC (gen.)",
          "igebm": "IGEBM"}
DATASETS = {
    "digits": {"models": tuple(MODELS), "fid_name": "FID (digits-CNN)"},
    "fashion_mnist": {
        "models": ("softmax", "jem", "jempp", "sadajem", "gmmc-joint", "igebm"),
        "fid_name": "FID (FMNIST-CNN)",
    },
}
SEEDED_MODELS = ("softmax", "jem", "jempp", "sadajem")
GENERATION_ONLY = ("igebm",)
FEATURE_MODEL = "softmax"
OOD_LABELS = {"uniform_noise": "noise", "vertical_flip": "v-flip", "mnist_like_digits": "digits",
              "interpolation": "mix", "constant": "constant", "faces": "faces",
              "photos": "photos"}


def run_name(model, seed, first_seed):
    return model if seed == first_seed else f"{model}-seed{seed}"


def run_logged(command, log_path):
    """Runs `command` with its output in `log_path`; returns its wall time in seconds."""
    start = time.time()
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                                check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}); see {log_path}")
    return time.time() - start


def train(model, seed, run_dir, dataset, fit_args, skip_existing, log_dir):
    """Trains one run with trainers.fit unless `skip_existing` finds its model.keras."""
    if skip_existing and os.path.exists(os.path.join(run_dir, "model.keras")):
        return
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    flags = MODELS[model] or ["--model", model]
    run_logged([sys.executable, "-m", "trainers.fit", *flags, "--dataset", dataset,
                "--seed", str(seed), "--model_dir", run_dir, "--verbose", "2", *fit_args],
               os.path.join(log_dir, f"{os.path.basename(run_dir)}.fit.log"))


def evaluate(model, run_dir, ood_sets, eval_examples, skip_existing, log_dir):
    """Runs trainers.evaluate (accuracy, calibration, OOD); returns its wall time or None."""
    if model in GENERATION_ONLY:
        return None
    eval_path = os.path.join(run_dir, "eval", "eval.json")
    timing_path = os.path.join(run_dir, "eval", "study_seconds.json")
    if skip_existing and os.path.exists(eval_path):
        if os.path.exists(timing_path):
            with open(timing_path) as f:
                return json.load(f)["seconds"]
        return None
    scores = "energy,max_softmax" if model.startswith("gmmc") else "logsumexp,max_softmax"
    command = [sys.executable, "-m", "trainers.evaluate", "--model_dir", run_dir, "--tasks",
               "accuracy,calibration,ood", "--ood_sets", ",".join(ood_sets),
               "--ood_scores", scores]
    if eval_examples:
        command += ["--num_examples", str(eval_examples), "--ood_examples", str(eval_examples)]
    seconds = run_logged(command, os.path.join(log_dir, f"{os.path.basename(run_dir)}.eval.log"))
    with open(timing_path, "w") as f:
        json.dump({"seconds": seconds}, f)
    return seconds


def summarize(model, seed, run_dir, ood_sets, eval_seconds=None):
    """One run's row: accuracy, ECE, AUROCs, wall times and the last sample grid."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    row = {
        "model": model,
        "seed": seed,
        "run_dir": os.path.basename(run_dir),
        "train_seconds": metrics["train_seconds"],
        "eval_seconds": eval_seconds,
        "epochs": metrics.get("epochs"),
        "rollbacks": metrics.get("rollbacks", 0),
    }
    samples_dir = os.path.join(run_dir, "samples")
    samples = sorted(os.listdir(samples_dir)) if os.path.isdir(samples_dir) else []
    row["samples"] = os.path.join(os.path.basename(run_dir), "samples", samples[-1]) if (
        samples) else None
    eval_path = os.path.join(run_dir, "eval", "eval.json")
    if model in GENERATION_ONLY or not os.path.exists(eval_path):
        return row
    with open(eval_path) as f:
        tasks = json.load(f)["tasks"]
    ood = tasks["ood"]["results"]
    density = "logsumexp" if "logsumexp" in ood else "energy"
    row["test_accuracy"] = tasks["accuracy"]["results"]["accuracy"]
    row["ece"] = tasks["calibration"]["results"]["ece"]
    row["density_score"] = density
    for score, key in ((density, "log_px"), ("max_softmax", "max_pyx")):
        for ood_set in ood_sets:
            if ood_set in ood.get(score, {}):
                row[f"auroc_{key}_{ood_set}"] = ood[score][ood_set]["auroc"]
    return row


# FID in the feature space of the study's softmax classifier.


def feature_function(model_path, batch_size=500):
    """`images -> penultimate features` of a trained keras-jem classifier (its backbone)."""
    import keras

    model = keras.saving.load_model(model_path, compile=False)
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError(f"{model_path!r} has no `backbone` to take features from.")

    def features(images):
        images = np.asarray(images, np.float32)
        return np.concatenate([
            keras.ops.convert_to_numpy(backbone(images[i:i + batch_size], training=False))
            for i in range(0, len(images), batch_size)
        ]).astype(np.float64)

    return features


def buffer_images(model_path):
    """The replay buffer of a saved model as numpy images, or None if it has none."""
    import keras

    import keras_jem  # noqa: F401  (registers keras-jem's classes with Keras' deserializer)

    model = keras.saving.load_model(model_path, compile=False)
    buffer = getattr(model, "buffer", None)
    if buffer is None or not hasattr(buffer, "stored_images"):
        return None
    # Float images in the data range (a FIFO buffer's 8-bit samples decoded).
    images = keras.ops.convert_to_numpy(buffer.stored_images())
    return images if len(images) else None


def fid_scores(dataset, feature_path, run_dirs, reference_examples, eval_examples=None):
    """FID of each run's replay buffer (and of real test images) in the classifier's features.

    Returns:
        A dict: "reference" (what the statistics come from), "real_test" (the floor) and
        "runs" (run directory name -> FID, or a reason string when it has no buffer).
    """
    from keras_jem import data
    from keras_jem import metrics

    features = feature_function(feature_path)
    train_images, _ = data.load(dataset, "train", num_examples=reference_examples)
    test_images, _ = data.load(dataset, "test", num_examples=eval_examples)
    mu, sigma = metrics.activation_statistics(features(train_images))
    result = {
        "feature_network": os.path.relpath(feature_path, os.path.dirname(
            os.path.dirname(feature_path))),
        "reference": f"{len(train_images)} {dataset} training images",
        "real_test": fid_to(features(test_images), mu, sigma),
        "real_test_images": len(test_images),
        "runs": {},
    }
    for name, run_dir in run_dirs.items():
        images = buffer_images(os.path.join(run_dir, "model.keras"))
        if images is None:
            result["runs"][name] = "no replay buffer"
            continue
        result["runs"][name] = fid_to(features(images), mu, sigma)
    return result


def fid_to(activations, mu, sigma):
    """FID of `activations` against reference statistics `(mu, sigma)`."""
    from keras_jem import metrics

    mu_x, sigma_x = metrics.activation_statistics(activations)
    return float(metrics.frechet_distance(mu_x, sigma_x, mu, sigma))


# Tables.


def aggregate(rows):
    """Rows of one model over its seeds -> mean, std (ddof 0) and count of every numeric key."""
    summary = {"model": rows[0]["model"], "seeds": [r["seed"] for r in rows],
               "samples": rows[0].get("samples"), "density_score": rows[0].get("density_score")}
    keys = sorted({k for r in rows for k, v in r.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in ("seed", "epochs")})
    for key in keys:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            summary[key] = float(np.mean(values))
            if len(values) > 1:
                summary[f"{key}_std"] = float(np.std(values))
    return summary


def _number(value, fmt="{:.3f}"):
    return "–" if not isinstance(value, (int, float)) else fmt.format(value)


def _percent(value):
    return "–" if value is None else f"{100 * value:.2f}%"


def to_markdown(summaries, ood_sets, fid_name, baseline):
    ood_headers = " | ".join(f"vs {OOD_LABELS.get(s, s)}" for s in ood_sets)
    lines = [
        (f"| model | seeds | test acc. | Δ vs softmax | ECE (20 bins) | {ood_headers} | "
        f"{fid_name} | samples | train time | eval time |"),
        "|" + "---|" * (10 + len(ood_sets) - 1),
    ]
    for s in summaries:
        accuracy = s.get("test_accuracy")
        accuracy_text = _percent(accuracy)
        if "test_accuracy_std" in s:
            accuracy_text += f" ± {100 * s['test_accuracy_std']:.2f}"
        delta = ("–" if accuracy is None or baseline is None
                 else f"{100 * (accuracy - baseline):+.2f}")
        cells = [
            f"{_number(s.get(f'auroc_log_px_{o}'))} / {_number(s.get(f'auroc_max_pyx_{o}'))}"
            if accuracy is not None else "–"
            for o in ood_sets
        ]
        samples = f"[grid]({s['samples']})" if s.get("samples") else "–"
        eval_time = _number(s.get("eval_seconds"), "{:.0f} s")
        lines.append(
            f"| {LABELS.get(s['model'], s['model'])} | {','.join(map(str, s['seeds']))} | "
            f"{accuracy_text} | {delta} | {_percent(s.get('ece'))} | {' | '.join(cells)} | "
            f"{_number(s.get('fid'), '{:.4g}')} | {samples} | "
            f"{_number(s.get('train_seconds'), '{:.0f} s')} | {eval_time} |"
        )
    return "\n".join(lines)


def seeds_markdown(rows, ood_sets):
    headers = " | ".join(f"log p(x) vs {OOD_LABELS.get(s, s)}" for s in ood_sets)
    lines = [f"| model | seed | test acc. | ECE | {headers} | train time |",
             "|" + "---|" * (5 + len(ood_sets))]
    for r in rows:
        cells = " | ".join(_number(r.get(f"auroc_log_px_{o}")) for o in ood_sets)
        lines.append(
            f"| {LABELS.get(r['model'], r['model'])} | {r['seed']} | "
            f"{_percent(r.get('test_accuracy'))} | {_percent(r.get('ece'))} | {cells} | "
            f"{_number(r.get('train_seconds'), '{:.0f} s')} |"
        )
    return "\n".join(lines)


def _parse_list(text, name, parser, allowed=None):
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        parser.error(f"--{name} is empty")
    if allowed is not None:
        unknown = sorted(set(items) - set(allowed))
        if unknown:
            parser.error(f"unknown {name} {unknown}; expected some of {', '.join(allowed)}")
    return items


def build_parser(prog="python -m tools.study", default_dataset=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=default_dataset, choices=sorted(DATASETS),
                        required=default_dataset is None)
    parser.add_argument("--output_dir", default=None, help="default reports/<dataset>")
    parser.add_argument("--models", default=None,
                        help="comma-separated subset of " + ", ".join(MODELS)
                             + " (default: the dataset's list; fashion_mnist: "
                             + ",".join(DATASETS["fashion_mnist"]["models"]) + ")")
    parser.add_argument("--seeds", default="1",
                        help="seeds of the softmax, JEM, JEM++ and SADA-JEM, e.g. 1,2,3 (the "
                             "other models use the first)")
    parser.add_argument("--fit_args", default="",
                        help="extra trainers.fit flags for every model, e.g. '--epochs 1 "
                             "--steps_per_epoch 5'")
    parser.add_argument("--eval_examples", type=int, default=None,
                        help="test images (and images per OOD set) to evaluate on; default all")
    parser.add_argument("--fid_reference_examples", type=int, default=10000,
                        help="training images the FID reference statistics come from")
    parser.add_argument("--skip_existing", action="store_true",
                        help="reuse trained models and evaluations found in output_dir")
    parser.add_argument("--table_only", action="store_true",
                        help="train nothing: the table of the runs already in output_dir (a "
                             "model or seed not trained there is left out, and said so); "
                             "implies --skip_existing")
    return parser


def main(argv=None, prog="python -m tools.study", default_dataset=None):
    parser = build_parser(prog, default_dataset)
    args = parser.parse_args(argv)
    from keras_jem import data

    dataset = args.dataset
    models = _parse_list(args.models or ",".join(DATASETS[dataset]["models"]), "models", parser,
                         MODELS)
    try:
        seeds = [int(s) for s in _parse_list(args.seeds, "seeds", parser)]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, received {args.seeds!r}")
    if args.eval_examples is not None and args.eval_examples < 2:
        parser.error("--eval_examples must be >= 2")
    output_dir = args.output_dir or os.path.join("reports", dataset)
    log_dir = os.path.join(output_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    ood_sets = data.ood_sets_for(dataset)
    fit_args = args.fit_args.split()
    fid_name = DATASETS[dataset]["fid_name"]
    prefix = f"[study {dataset}]"

    # The FID feature network is the softmax run: train it first, also when not in the table.
    to_run = list(models) if FEATURE_MODEL in models else [FEATURE_MODEL, *models]
    rows, failures, run_dirs, not_trained = [], {}, {}, []
    skip_existing = args.skip_existing or args.table_only
    for model in to_run:
        for seed in seeds if model in SEEDED_MODELS else seeds[:1]:
            name = run_name(model, seed, seeds[0])
            run_dir = os.path.join(output_dir, name)
            if args.table_only and not os.path.exists(os.path.join(run_dir, "model.keras")):
                print(f"{prefix} {name}: not trained in {output_dir}, left out (--table_only)",
                      flush=True)
                not_trained.append(name)
                continue
            print(f"{prefix} {name} ...", flush=True)
            try:
                train(model, seed, run_dir, dataset, fit_args, skip_existing, log_dir)
                eval_seconds = evaluate(model, run_dir, ood_sets, args.eval_examples,
                                        skip_existing, log_dir)
                row = summarize(model, seed, run_dir, ood_sets, eval_seconds)
            except Exception as error:  # noqa: BLE001  (keep the rows of the runs that worked)
                failures[name] = str(error)
                print(f"{prefix} {name} failed: {error}", flush=True)
                continue
            run_dirs[name] = run_dir
            if model in models:
                rows.append(row)
            accuracy = row.get("test_accuracy")
            print(f"{prefix} {name}: "
                  + (f"acc {accuracy:.4f}, " if accuracy is not None else "")
                  + f"train {row['train_seconds']:.0f} s", flush=True)

    fid = None
    if FEATURE_MODEL in run_dirs:
        try:
            fid = fid_scores(dataset, os.path.join(run_dirs[FEATURE_MODEL], "model.keras"),
                             {n: d for n, d in run_dirs.items() if not n.startswith(FEATURE_MODEL)},
                             args.fid_reference_examples, args.eval_examples)
        except Exception as error:  # noqa: BLE001  (the other columns still stand)
            failures["fid"] = f"{type(error).__name__}: {error}"
    else:
        failures.setdefault("fid", "the softmax feature network did not train")
    for row in rows:
        value = (fid or {}).get("runs", {}).get(row["run_dir"])
        if isinstance(value, float):
            row["fid"] = value

    summaries = [aggregate([r for r in rows if r["model"] == m]) for m in models
                 if any(r["model"] == m for r in rows)]
    baseline = next((s.get("test_accuracy") for s in summaries if s["model"] == "softmax"), None)
    table = to_markdown(summaries, ood_sets, fid_name, baseline)
    notes = [
        "",
        (f"AUROC cells: log p(x) / max p(y|x), test images positive, against each OOD set "
        f"({', '.join(ood_sets)}). log p(x) is logsumexp of the logits (GMMC: its -E(x)). "
        "Softmax, JEM, JEM++ and SADA-JEM: mean over the seeds of the seeds column (seeds.md); "
        "Δ vs softmax against the softmax's mean."),
    ]
    if not_trained:
        notes.append(f"Not trained (left out of this table): {', '.join(not_trained)}.")
    if fid:
        notes.append(
            f"{fid_name}: Fréchet distance of each model's replay buffer to "
            f"{fid['reference']}, in the penultimate features of the study's softmax classifier "
            f"({fid['feature_network']}), not Inception; real test images score "
            f"{fid['real_test']:.4g} ({fid['real_test_images']} images)."
        )
    table += "\n" + "\n".join(notes)
    seeds_table = seeds_markdown([r for r in rows if r["model"] in SEEDED_MODELS], ood_sets)
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(output_dir, "seeds.md"), "w") as f:
        f.write(seeds_table + "\n")
    command = " ".join([sys.executable, "-m", prog.split()[-1], *(
        sys.argv[1:] if argv is None else argv)])
    with open(os.path.join(output_dir, "table.json"), "w") as f:
        json.dump({"dataset": dataset, "ood_sets": list(ood_sets), "fid_name": fid_name,
                   "summaries": summaries, "rows": rows, "fid": fid, "failures": failures,
                   "not_trained": not_trained,
                   "command": command}, f, indent=2)
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
