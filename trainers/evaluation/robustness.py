"""The robustness task: PGD robust-accuracy curves under L-infinity and L2 (JSON + PNG)."""

import os

from trainers.evaluation.context import classifier_required
from trainers.evaluation.context import refine_settings


def task(context):
    import numpy as np

    from keras_jem import metrics

    skip = classifier_required(context)
    if skip:
        return {"status": skip[0], "reason": skip[1]}
    args = context.args
    rng = np.random.default_rng(args.seed)
    count = min(args.attack_examples, len(context.images))
    chosen = np.sort(rng.permutation(len(context.images))[:count])
    images, labels = context.images[chosen], context.labels[chosen]
    curves, figures = [], {}
    for norm in args.norms:
        curve = metrics.robust_accuracy_curve(
            context.model, images, labels,
            epsilons=args.epsilons if norm == "linf" else args.l2_epsilons,
            norm=norm, num_steps=args.attack_steps,
            step_size=args.linf_step_size if norm == "linf" else args.l2_step_size,
            num_restarts=args.attack_restarts, epsilon_unit="pixel",
            batch_size=args.batch_size, seed=args.seed, refine_steps=args.refine_steps,
            refine_chains=args.refine_chains, refine_step_size=args.refine_step_size,
            refine_noise=args.refine_noise, refine_gradient=args.refine_gradient,
        )
        curve["label"] = norm + (f" (refined {args.refine_steps} steps x "
                                 f"{args.refine_chains} chains)" if args.refine_steps else "")
        curves.append(curve)
        path = metrics.save_robustness_plot(
            curve, context.output(f"robustness_{norm}.png"),
            title=f"PGD-{args.attack_steps} {norm}, {count} {args.dataset} images",
        )
        figures[f"robustness_{norm}"] = os.path.basename(path)
    json_path = metrics.save_robustness_json(curves, context.output("robustness.json"))
    return {
        "status": "ok",
        "settings": {
            "attack": "PGD, random start, cross-entropy loss, projected and clipped to [-1, 1] "
                      "every step",
            "epsilon_unit": "pixel: [0, 1] pixel scale (x2 in the model's [-1, 1] input)",
            "num_examples": int(count), "example_selection": f"random, seed {args.seed}",
            "num_steps": args.attack_steps, "num_restarts": args.attack_restarts,
            "linf_step_size": args.linf_step_size or "2.5*epsilon/num_steps",
            "l2_step_size": args.l2_step_size or "2.5*epsilon/num_steps",
            **refine_settings(args), "refine_chains": args.refine_chains,
        },
        "results": {curve["norm"]: curve for curve in curves},
        "figures": figures,
        "files": {"curves": os.path.basename(json_path)},
    }
