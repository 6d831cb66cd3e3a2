"""The calibration task: expected calibration error and the reliability diagram."""

import os

from trainers.evaluation.context import classifier_required
from trainers.evaluation.context import logits
from trainers.evaluation.context import refine_settings


def task(context):
    from keras_jem import metrics

    skip = classifier_required(context)
    if skip:
        return {"status": skip[0], "reason": skip[1]}
    args = context.args
    probabilities = metrics.softmax(logits(context))
    result = metrics.expected_calibration_error(probabilities, context.labels,
                                                num_bins=args.ece_bins)
    figure = metrics.reliability_diagram(
        result, context.output("reliability_diagram.png"),
        title=f"{args.config.get('model', 'model')} on {args.dataset} {args.split}",
    )
    return {
        "status": "ok",
        "settings": {"num_bins": args.ece_bins, "binning": "equal-width on [0, 1]",
                     "num_examples": len(context.labels), "input_noise": args.input_noise,
                     **refine_settings(args)},
        "results": result,
        "figures": {"reliability_diagram": os.path.basename(figure)},
    }
