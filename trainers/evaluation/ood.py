"""The OOD task: AUROC / AUPR / FPR@95 of each score against each OOD set, with histograms."""

import os

from trainers.evaluation.context import with_problems

#: What the `energy` score of a class-conditional IGEBM is (the official sandbox's score).
CONDITIONAL_ENERGY_SCORE = "-min_y E(x, y) (conditional IGEBM, as the official ebm_sandbox.py)"


def uses_min_class_energy(model, score_name):
    """Whether `score_name` is the `energy` score of a class-conditional IGEBM."""
    return (score_name == "energy" and bool(getattr(model, "conditional", False))
            and callable(getattr(model, "ood_score", None)))


def score_function(model, score_name):
    """`score_fn(model, images, batch_size)` of `score_name` for `model`.

    The registered score (`keras_jem.metrics.get_score`), except the `energy` score of a
    class-conditional IGEBM: the official sandbox scores it by `-min_y E(x, y)`
    (`IGEBM.ood_score`), not by `-E(x) = logsumexp_y -E(x, y)`.
    """
    from keras_jem import metrics
    from keras_jem.metrics import classification

    if not uses_min_class_energy(model, score_name):
        return metrics.get_score(score_name)

    def min_class_energy_score(model, images, batch_size=100):
        fn = classification.model_function(
            model, "min_class_energy_score", lambda m: m.ood_score)
        return classification.batched(fn, images, batch_size).astype("float64")

    return min_class_energy_score


def task(context):
    from keras_jem import metrics

    args = context.args
    results, figures, errors, skipped = {}, {}, {}, {}
    for score_name in context.ood_scores:
        if context.num_classes < 2 and score_name == "max_softmax":
            skipped[score_name] = "max_softmax needs a classifier (the model is unconditional)"
            continue
        try:
            score_fn = score_function(context.model, score_name)
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
            **({"energy_score": CONDITIONAL_ENERGY_SCORE}
               if uses_min_class_energy(context.model, "energy") else {}),
        },
        "results": results,
        "figures": figures,
    }
    return with_problems(task, skipped, errors)
