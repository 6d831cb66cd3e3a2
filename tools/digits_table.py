"""The digits study: every model on the same backbone and data, one table.

    python -m tools.digits_table --output_dir reports/digits
    python -m tools.digits_table --models softmax,jem --output_dir reports/digits --skip_existing

For each model this trains `python -m trainers.fit --model M --dataset digits` with the digits
preset (plus `--fit_args`), evaluates it with `python -m trainers.evaluate --tasks
accuracy,calibration,ood` (OOD sets: uniform noise, digit interpolations, scikit-image faces and
photo patches), and writes `table.md` and `table.json` with test accuracy, ECE (20 bins), the AUROC
of log p(x) (the model's energy score for GMMC/IGEBM) and of max p(y|x) against uniform noise and
the other OOD sets, and the training wall time. The per-model run directories keep the sample
grids, reliability diagrams and OOD histograms the table refers to.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# Model name -> extra trainers.fit flags (the digits preset does the rest).
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
OOD_SETS = ("uniform_noise", "interpolation", "faces", "photos")


def _run(command, log_path):
    start = time.time()
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                                check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}); see {log_path}")
    return time.time() - start


def train_and_evaluate(name, output_dir, fit_args, skip_existing):
    run_dir = os.path.join(output_dir, name)
    flags = MODELS[name] if MODELS[name] else ["--model", name]
    if not (skip_existing and os.path.exists(os.path.join(run_dir, "model.keras"))):
        if os.path.exists(run_dir):
            shutil.rmtree(run_dir)
        os.makedirs(run_dir)
        _run([sys.executable, "-m", "trainers.fit", *flags, "--dataset", "digits",
              "--model_dir", run_dir, "--verbose", "2", *fit_args],
             os.path.join(output_dir, f"{name}.fit.log"))
    if not (skip_existing and os.path.exists(os.path.join(run_dir, "eval", "eval.json"))):
        _run([sys.executable, "-m", "trainers.evaluate", "--model_dir", run_dir, "--tasks",
              "accuracy,calibration,ood", "--ood_sets", ",".join(OOD_SETS)],
             os.path.join(output_dir, f"{name}.eval.log"))
    return summarize(name, run_dir)


def summarize(name, run_dir):
    evaluation = _read_json(os.path.join(run_dir, "eval", "eval.json"))
    metrics = _read_json(os.path.join(run_dir, "metrics.json"))
    tasks = evaluation["tasks"]
    ood = tasks["ood"]["results"]
    density_score = "logsumexp" if "logsumexp" in ood else "energy"
    row = {
        "model": name,
        "test_accuracy": tasks["accuracy"]["results"]["accuracy"],
        "ece": tasks["calibration"]["results"]["ece"],
        "density_score": density_score,
        "train_seconds": metrics["train_seconds"],
        "epochs": metrics["epochs"],
        "rollbacks": metrics.get("rollbacks", 0),
    }
    for score in (density_score, "max_softmax"):
        for ood_set in OOD_SETS:
            if score in ood and ood_set in ood[score]:
                row[f"auroc_{score}_{ood_set}"] = ood[score][ood_set]["auroc"]
    samples = sorted(os.listdir(os.path.join(run_dir, "samples"))) if os.path.isdir(
        os.path.join(run_dir, "samples")) else []
    row["samples"] = os.path.join(name, "samples", samples[-1]) if samples else None
    return row


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _auroc(row, key):
    value = row.get(key)
    return "–" if value is None else f"{value:.3f}"


def to_markdown(rows, baseline):
    header = ("| model | test acc. | Δ vs softmax | ECE (20 bins) | AUROC log p(x) vs noise | "
              "vs interp. | vs faces | vs photos | AUROC max p(y|x) vs noise | train time |")
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        score = row["density_score"]
        delta = 100 * (row["test_accuracy"] - baseline) if baseline is not None else 0.0
        lines.append(
            f"| {row['model']} | {100 * row['test_accuracy']:.2f}% | {delta:+.2f} | "
            f"{100 * row['ece']:.2f}% | {_auroc(row, f'auroc_{score}_uniform_noise')} | "
            f"{_auroc(row, f'auroc_{score}_interpolation')} | {_auroc(row, f'auroc_{score}_faces')} | "
            f"{_auroc(row, f'auroc_{score}_photos')} | {_auroc(row, 'auroc_max_softmax_uniform_noise')} | "
            f"{row['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.digits_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="reports/digits")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--fit_args", default="",
                        help="extra trainers.fit flags for every model, e.g. '--epochs 5'")
    parser.add_argument("--skip_existing", action="store_true",
                        help="reuse trained models and evaluations found in output_dir")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; expected some of {', '.join(MODELS)}")
    os.makedirs(args.output_dir, exist_ok=True)
    rows, failures = [], {}
    for name in names:
        print(f"[digits_table] {name} ...", flush=True)
        try:
            rows.append(train_and_evaluate(name, args.output_dir, args.fit_args.split(),
                                           args.skip_existing))
            print(f"[digits_table] {name}: acc {rows[-1]['test_accuracy']:.4f}", flush=True)
        except (RuntimeError, OSError, KeyError) as error:  # keep the rows that worked
            failures[name] = str(error)
            print(f"[digits_table] {name} failed: {error}", flush=True)
    baseline = next((r["test_accuracy"] for r in rows if r["model"] == "softmax"), None)
    table = to_markdown(rows, baseline)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output_dir, "table.json"), "w") as f:
        json.dump({"rows": rows, "failures": failures,
                   "command": " ".join([sys.executable, "-m", "tools.digits_table",
                                        *(argv or sys.argv[1:])])}, f, indent=2)
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
