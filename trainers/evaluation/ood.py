"""The OOD task: AUROC / AUPR / FPR@95 of each score against each OOD set, with histograms."""

import os


def task(context):
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
