"""The generation task: sample grids, the replay buffer's classes, IS/FID of buffer and fresh
samples."""

import contextlib
import inspect
import os

from trainers.evaluation.context import with_problems


def _to_numpy(value):
    import keras
    import numpy as np

    return np.asarray(keras.ops.convert_to_numpy(value), np.float32)


@contextlib.contextmanager
def unchanged_state(model):
    """Restores the model's non-trainable variables, replay buffer aside, when the block ends.

    JEM++ and SADA-JEM sample with BatchNorm in training mode (as the papers do), so every
    sampler pass moves the moving statistics towards the sampler's batches; without this the
    buffer would then be classified (class counts, top-k IS/FID) by another network than the
    trained one. Sampling keeps the model's own mode; only its side effects are undone. The
    replay buffer is not copied: fresh samples never write to it, and it is the big variable
    (123 MB for CIFAR-10).
    """
    import keras

    buffer = getattr(model, "buffer", None)
    buffer_variables = {id(v) for v in getattr(buffer, "weights", None) or ()}
    saved = [(variable, keras.ops.convert_to_numpy(variable))
             for variable in model.non_trainable_variables
             if id(variable) not in buffer_variables]
    try:
        yield
    finally:
        for variable, value in saved:
            variable.assign(value)


def _sample(model, args, num_samples=None, y=None, seed=None):
    """Call `model.sample` in batches, passing only the arguments it accepts; the model's
    BatchNorm statistics are left as they were (`unchanged_state`)."""
    import numpy as np

    parameters = inspect.signature(model.sample).parameters
    kwargs = {}
    if args.sample_steps is not None and "num_steps" in parameters:
        kwargs["num_steps"] = args.sample_steps
    total = len(y) if y is not None else int(num_samples)
    outputs = []
    for index, start in enumerate(range(0, total, args.batch_size)):
        stop = min(total, start + args.batch_size)
        call = dict(kwargs)
        if "seed" in parameters and seed is not None:
            call["seed"] = seed + index
        if y is not None:
            call["y"] = np.asarray(y[start:stop])
        else:
            call["num_samples"] = stop - start
        with unchanged_state(model):
            outputs.append(_to_numpy(model.sample(**call)))
    return np.concatenate(outputs, axis=0)


def task(context):
    import numpy as np

    from keras_jem import metrics

    args = context.args
    model = context.model
    if not callable(getattr(model, "sample", None)):
        return {"status": "skipped", "reason": f"{type(model).__name__} has no `sample` method"}
    results, figures, errors, skipped = {}, {}, {}, {}
    classify = context.num_classes > 1

    def probabilities_of(images):
        return metrics.softmax(metrics.predict_logits(model, images, args.batch_size))

    # Fresh samples from noise: unconditional grid, and most/least confident.
    samples = _sample(model, args, num_samples=args.num_samples, seed=args.seed)
    figures["samples"] = os.path.basename(
        metrics.save_image_grid(samples, context.output("samples.png")))
    results["samples"] = {"num_samples": len(samples), "source": "model.sample from fresh starts",
                          "num_steps": args.sample_steps or "model default"}
    if classify:
        sample_probabilities = probabilities_of(samples)
        for key, path in metrics.save_confidence_grids(
            samples, sample_probabilities, args.output_dir, count=min(64, len(samples)),
            prefix="samples_",
        ).items():
            figures[f"samples_{key}"] = os.path.basename(path)

        # Per class: conditional sampling when the model supports it.
        per_class = max(1, min(10, args.num_samples // max(1, context.num_classes) or 1))
        labels = np.repeat(np.arange(context.num_classes), per_class)
        try:
            class_samples = _sample(model, args, y=labels, seed=args.seed + 1)
            method = "model.sample(y=...) (class-conditional)"
            class_labels = labels
        except (TypeError, NotImplementedError, ValueError) as error:
            class_samples = samples
            class_labels = sample_probabilities.argmax(axis=1)
            method = (f"predicted class of unconditional samples (model.sample(y=...) failed: "
                      f"{type(error).__name__}: {error})")
        path = metrics.save_class_grid(class_samples, class_labels,
                                       context.output("samples_per_class.png"),
                                       num_classes=context.num_classes, per_class=per_class)
        figures["samples_per_class"] = os.path.basename(path)
        results["samples_per_class"] = {"method": method, "per_class": per_class}

    # Replay buffer.
    buffer_images = None
    buffer = getattr(model, "buffer", None)
    if buffer is not None and hasattr(buffer, "stored_images"):
        # Float images in the data range (a FIFO buffer's 8-bit samples decoded).
        buffer_images = _to_numpy(buffer.stored_images())
    if buffer_images is not None and len(buffer_images):
        results["replay_buffer"] = {"size": len(buffer_images)}
        if classify:
            buffer_probabilities = probabilities_of(buffer_images)
            predicted = buffer_probabilities.argmax(axis=1)
            results["replay_buffer"]["predicted_class_counts"] = np.bincount(
                predicted, minlength=context.num_classes).tolist()
            for key, path in metrics.save_confidence_grids(
                buffer_images, buffer_probabilities, args.output_dir,
                count=min(64, len(buffer_images)), prefix="buffer_",
            ).items():
                figures[f"buffer_{key}"] = os.path.basename(path)
            order = np.argsort(-buffer_probabilities.max(axis=1), kind="stable")
            path = metrics.save_class_grid(
                buffer_images[order], predicted[order], context.output("buffer_per_class.png"),
                num_classes=context.num_classes, per_class=10)
            figures["buffer_per_class"] = os.path.basename(path)
        else:
            figures["buffer"] = os.path.basename(metrics.save_image_grid(
                buffer_images[:64], context.output("buffer.png")))
    else:
        skipped["replay_buffer"] = ("the model has no replay buffer" if buffer_images is None
                                    else "the replay buffer holds no samples yet")
        buffer_images = None

    # IS / FID.
    quality = _generation_quality(context, buffer_images, probabilities_of if classify else None,
                                  errors)
    if isinstance(quality, str):
        skipped["inception_score_and_fid"] = quality
    else:
        results.update(quality)

    task = {
        "status": "ok" if not errors else "partial",
        "settings": {
            "num_samples": args.num_samples, "sample_steps": args.sample_steps or "model default",
            "num_fresh_samples": args.num_fresh_samples, "is_top_k": args.is_top_k,
            "fid_top_k": args.fid_top_k, "fid_reference_examples": args.fid_reference_examples,
            "top_k_rule": "per predicted class, by max-softmax confidence; <=1 fraction, >1 count",
        },
        "results": results,
        "figures": figures,
    }
    return with_problems(task, skipped, errors)


def _generation_quality(context, buffer_images, probabilities_of, errors):
    """IS/FID of the buffer's top-k per class and of fresh samples; a str = skip reason."""

    from keras_jem import data as data_lib
    from keras_jem import metrics

    args = context.args
    if context.extractor_skip_reason:
        return "no feature extractor: " + context.extractor_skip_reason
    if context.extractor is None:
        context.extractor = metrics.InceptionFeatureExtractor(
            context.extractor_weights, image_size=args.fid_image_size, batch_size=args.batch_size)
    extractor = context.extractor
    out = {}

    reference_path = args.fid_reference or context.output(f"fid_reference_{args.dataset}.npz")
    if os.path.exists(reference_path):
        reference = metrics.load_statistics(reference_path)
    else:
        real, _ = data_lib.load(args.dataset, "train", data_dir=args.data_dir, download=False,
                                num_examples=args.fid_reference_examples)
        mu, sigma = metrics.activation_statistics(extractor.features(real))
        reference_path = metrics.save_statistics(
            reference_path, mu, sigma, dataset=args.dataset, split="train",
            num_images=len(real), extractor=extractor.name,
            image_size=getattr(extractor, "image_size", None))
        reference = metrics.load_statistics(reference_path)
    out["fid_reference"] = {"path": reference_path, **reference["metadata"]}

    if buffer_images is not None and probabilities_of is not None:
        try:
            probabilities = probabilities_of(buffer_images)
            entry = {"protocol": "replay buffer, top-k per predicted class by confidence "
                                 "(SADA-JEM/JEM++/GMMC); optimistic vs fresh samples"}
            for metric, ratio in (("inception_score", args.is_top_k), ("fid", args.fid_top_k)):
                index = metrics.select_top_k_per_class(probabilities, ratio)
                quality = metrics.sample_quality(buffer_images[index], extractor,
                                                 reference if metric == "fid" else None)
                entry[metric] = {"top_k": ratio, "num_images": len(index),
                                 "value": quality[metric],
                                 **({"std": quality["inception_score_std"]}
                                    if metric == "inception_score" else {})}
            out["replay_buffer_top_k"] = entry
        except Exception as error:  # noqa: BLE001
            errors["replay_buffer_top_k"] = f"{type(error).__name__}: {error}"
    try:
        fresh = _sample(context.model, args, num_samples=args.num_fresh_samples,
                        seed=args.seed + 1000)
        quality = metrics.sample_quality(fresh, extractor, reference)
        quality["protocol"] = "fresh samples: model.sample from its initial (noise) distribution"
        out["fresh_samples"] = quality
    except Exception as error:  # noqa: BLE001
        errors["fresh_samples"] = f"{type(error).__name__}: {error}"
    out["extractor"] = extractor.name
    return out
