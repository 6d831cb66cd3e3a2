"""The accuracy task: test accuracy and loss, and the per-example predictions file."""

import os

from trainers.evaluation.context import classifier_required
from trainers.evaluation.context import logits
from trainers.evaluation.context import refine_settings


def task(context):
    import numpy as np

    from keras_jem import metrics

    skip = classifier_required(context)
    if skip:
        return {"status": skip[0], "reason": skip[1]}
    args = context.args
    result = metrics.classification_metrics(logits(context), context.labels)
    per_example = result.pop("per_example")
    path = context.output("predictions.npz")
    os.makedirs(args.output_dir, exist_ok=True)
    np.savez(path, labels=context.labels, **per_example)
    return {
        "status": "ok",
        "settings": {"dataset": args.dataset, "split": args.split,
                     "num_examples": len(context.labels), "input_noise": args.input_noise,
                     **refine_settings(args), "refine_chains": 1},
        "results": result,
        "files": {"predictions": os.path.basename(path)},
    }
