"""How a trained model's log p(x) AUROC depends on the BatchNorm statistics it is scored with.

    python -m tools.batch_norm_diagnosis --dataset digits runs/jempp-seed1 runs/jempp-seed2

For each run directory (a `model.keras` written by `trainers.fit`) prints the test accuracy and
the AUROC of log p(x) = logsumexp of the logits against each OOD set, scored three ways:

- `moving`: inference mode with the moving statistics the model was saved with;
- `re-estimated`: inference mode after `keras_jem.reestimate_batch_norm` on up to
  `--max_train` clean training images;
- `own batch`: training mode, each batch of `--batch_size` images normalised by its own
  statistics. A diagnosis only: such a score depends on the other images of the batch.

A model without BatchNorm gives the same three numbers. See docs/batch_norm.md.
"""

import argparse
import os
import sys


def _scores(model, images, training, batch_size):
    import numpy as np
    import tensorflow as tf

    logits = [model(images[i:i + batch_size], training=training).numpy()
              for i in range(0, len(images), batch_size)]
    logits = np.concatenate(logits)
    return tf.reduce_logsumexp(logits, axis=-1).numpy(), logits.argmax(-1)


def diagnose(model, test, ood_sets, train_images, batch_size=100):
    """`{mode: {"accuracy": a, <ood name>: auroc, ...}}` for the three ways of scoring."""
    import keras_jem
    from keras_jem import metrics

    test_images, test_labels = test
    weights = [v.numpy() for v in model.weights]
    results = {}
    for mode in ("moving", "re-estimated", "own batch"):
        if mode == "re-estimated":
            keras_jem.reestimate_batch_norm(model, train_images, batch_size=batch_size)
        training = mode == "own batch"
        in_scores, predictions = _scores(model, test_images, training, batch_size)
        row = {"accuracy": float((predictions == test_labels).mean())}
        for name, images in ood_sets.items():
            out_scores, _ = _scores(model, images, training, batch_size)
            row[name] = metrics.ood_metrics(in_scores, out_scores)["auroc"]
        results[mode] = row
        for variable, value in zip(model.weights, weights):  # training mode moves statistics
            variable.assign(value)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="trainers.fit run directories")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--ood", default="uniform_noise",
                        help="comma-separated OOD sets (keras_jem.data.load_ood names)")
    parser.add_argument("--num_test", type=int, default=2000)
    parser.add_argument("--max_train", type=int, default=10000)
    parser.add_argument("--batch_size", type=int, default=100)
    args = parser.parse_args(argv)
    for run in args.runs:
        if not os.path.exists(os.path.join(run, "model.keras")):
            parser.error(f"{run!r} holds no model.keras (a trainers.fit run directory?)")

    import keras
    import numpy as np

    from keras_jem import data

    train_images, _ = data.load(args.dataset, split="train")
    test_images, test_labels = data.load(args.dataset, split="test")
    test_images = np.asarray(test_images, np.float32)[:args.num_test]
    test_labels = np.asarray(test_labels)[:args.num_test]
    ood_sets = {name: np.asarray(data.load_ood(name, like=args.dataset,
                                               reference_images=test_images,
                                               num_examples=len(test_images)), np.float32)
                for name in args.ood.split(",")}
    train_images = np.asarray(train_images, np.float32)[:args.max_train]
    print("| run | scored with | test accuracy | " + " | ".join(
        f"AUROC vs {name}" for name in ood_sets) + " |")
    print("|---|---|---|" + "---|" * len(ood_sets))
    for run in args.runs:
        model = keras.saving.load_model(os.path.join(run, "model.keras"), compile=False)
        for mode, row in diagnose(model, (test_images, test_labels), ood_sets, train_images,
                                  args.batch_size).items():
            print(f"| {run} | {mode} | {row['accuracy']:.2%} | " + " | ".join(
                f"{row[name]:.3f}" for name in ood_sets) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
