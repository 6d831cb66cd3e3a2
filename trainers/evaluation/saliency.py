"""The saliency task: gradient maps of the predicted class, measured by a deletion curve."""

import os

from trainers.evaluation.context import EvaluationError
from trainers.evaluation.context import classifier_required


def task(context):
    import keras

    from keras_jem import metrics

    skip = classifier_required(context)
    if skip:
        return {"status": skip[0], "reason": skip[1]}
    args = context.args
    models = {args.config.get("model", "model"): context.model}
    if args.saliency_baseline:
        path = os.path.join(os.path.expanduser(args.saliency_baseline), "model.keras")
        if not os.path.isfile(path):
            raise EvaluationError(
                f"--saliency_baseline needs a trainers.fit run directory with model.keras; "
                f"{path!r} does not exist."
            )
        baseline = keras.saving.load_model(path)
        name = "baseline" if "softmax" in models else "softmax"
        models = {name: baseline, **models}
    count = min(args.saliency_images, len(context.images))
    result = metrics.run_saliency_task(
        models, context.images[:count], context.labels[:count], args.output_dir,
        seed=args.seed)
    return {
        "status": "ok",
        "settings": {"num_images": count, "methods": ["vanilla", "smoothgrad"],
                     "baseline": args.saliency_baseline},
        "results": result["metrics"],
        "figures": {"saliency": "saliency.png", "saliency_deletion": "saliency_deletion.png"},
    }
