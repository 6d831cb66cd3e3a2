"""Export a trained model directory as a TensorFlow Serving SavedModel.

Usage:

```
python -m trainers.export --model_dir runs/jem --export_dir models/jem
python -m trainers.export --model_dir runs/jem --export_dir models/jem --ood_threshold -3.2
python -m trainers.export --model_dir runs/jem --export_dir models/jem \
    --ood_threshold_from runs/jem/eval.json
```

Reads `<model_dir>/model.keras` (written by `python -m trainers.fit`) and writes
`<export_dir>/<next integer version>/` with the `serving_default`, `classify` and `ood_score`
endpoints (see `keras_jem.export`). Prints the path of the new version.
"""

import argparse
import json
import logging
import math
import os
import sys

from trainers import console

logger = logging.getLogger("trainers.export")

# Keys under which an evaluation report may store the log p(x) (logsumexp) OOD threshold.
_SCORE_KEYS = ("logsumexp", "log_px")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m trainers.export",
        description="Export <model_dir>/model.keras as a TF Serving SavedModel version.",
    )
    parser.add_argument("--model_dir", required=True, help="directory holding model.keras")
    parser.add_argument(
        "--export_dir",
        required=True,
        help="the model's base path; the export goes to <export_dir>/<version>/",
    )
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument(
        "--ood_threshold",
        type=float,
        default=None,
        help="threshold on log p(x) (logsumexp of the logits); adds is_ood = log_px < threshold",
    )
    threshold.add_argument(
        "--ood_threshold_from",
        default=None,
        metavar="EVAL_JSON",
        help="read the log p(x) threshold from an evaluation report (eval.json)",
    )
    parser.add_argument(
        "--ood_threshold_key",
        default=None,
        help="dotted path of the threshold inside EVAL_JSON (e.g. ood.logsumexp.threshold); "
        "default: the single number whose key contains 'threshold' under a 'logsumexp' entry",
    )
    parser.add_argument(
        "--version", type=int, default=None, help="version number (default: next free integer)"
    )
    parser.add_argument(
        "--image_feature_key",
        default="image",
        help="tf.Example feature holding the flattened float image for `classify`",
    )
    parser.add_argument(
        "--class_names",
        default=None,
        help="comma-separated class names returned by `classify` (default: 0..K-1)",
    )
    parser.add_argument("--no_warmup", action="store_true", help="do not write warmup requests")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's C++ log lines")
    parser.add_argument(
        "--max_encoded_image_size",
        default="4096",
        help="largest encoded image `classify` decodes: SIDE or HEIGHTxWIDTH (default 4096); "
        "larger ones are refused from their header, before decoding",
    )
    return parser


def parse_max_size(text):
    """"4096" -> 4096, "2048x1024" -> (2048, 1024); ValueError otherwise."""
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(
            f"--max_encoded_image_size takes SIDE or HEIGHTxWIDTH in pixels (e.g. 4096 or "
            f"2048x1024); received {text!r}."
        )
    return values[0] if len(values) == 1 else tuple(values)


def find_ood_threshold(report, key=None):
    """Find the log p(x) OOD threshold in an evaluation report (a dict loaded from eval.json).

    Args:
        report: the parsed JSON.
        key: optional dotted path (e.g. `"ood.logsumexp.threshold"`) of the value.

    Returns:
        The threshold as a float.

    Raises:
        ValueError: if it is missing or ambiguous, with the candidates found.
    """
    if key:
        node = report
        for part in key.split("."):
            if isinstance(node, list) and part.isdigit():
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise ValueError(f"No entry {key!r} in the evaluation report (missing {part!r}).")
        if not isinstance(node, (int, float)) or isinstance(node, bool):
            raise ValueError(f"Entry {key!r} is not a number: {node!r}")
        return float(node)

    candidates = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (str(k),))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (str(i),))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            under_score = any(p.lower() in _SCORE_KEYS for p in path)
            if under_score and path and "threshold" in path[-1].lower():
                candidates[".".join(path)] = float(node)

    walk(report, ())
    values = {v for v in candidates.values() if math.isfinite(v)}
    if len(values) == 1:
        return values.pop()
    if not values:
        raise ValueError(
            "Found no log p(x) threshold in the evaluation report: expected a number whose key "
            "contains 'threshold' under a 'logsumexp' (or 'log_px') entry, e.g. "
            '{"ood": {"logsumexp": {"threshold_at_95_tpr": -3.2}}}. Pass --ood_threshold_key '
            "with its dotted path, or --ood_threshold VALUE."
        )
    raise ValueError(
        f"Found several log p(x) thresholds in the evaluation report: {candidates}. Choose one "
        "with --ood_threshold_key."
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model_path = os.path.join(args.model_dir, "model.keras")
    if not os.path.isfile(model_path):
        raise SystemExit(
            f"error: no trained model at {model_path}. Expected the model directory written by "
            "`python -m trainers.fit --model_dir DIR` (it holds model.keras)."
        )
    ood_threshold = args.ood_threshold
    if args.ood_threshold_from:
        try:
            with open(args.ood_threshold_from) as f:
                report = json.load(f)
            ood_threshold = find_ood_threshold(report, args.ood_threshold_key)
        except (OSError, json.JSONDecodeError, ValueError) as e:
            raise SystemExit(f"error: --ood_threshold_from {args.ood_threshold_from}: {e}")
        logger.info("OOD threshold on log p(x) from %s: %s", args.ood_threshold_from, ood_threshold)
    class_names = args.class_names.split(",") if args.class_names else None
    try:
        max_encoded_image_size = parse_max_size(args.max_encoded_image_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")

    # Imported here so that `--help` and argument errors are instant.
    console.setup(verbose=args.verbose)
    import keras

    import keras_jem  # noqa: F401  (registers the keras_jem classes for deserialization)
    from keras_jem import export

    model = keras.saving.load_model(model_path)
    path = export.export_serving_model(
        model,
        args.export_dir,
        ood_threshold=ood_threshold,
        version=args.version,
        image_feature_key=args.image_feature_key,
        class_names=class_names,
        warmup=not args.no_warmup,
        max_encoded_image_size=max_encoded_image_size,
    )
    print(path)
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
