"""The evaluation context: the model, the in-distribution data and the OOD sets, loaded and
checked against each other before any long computation, plus the predictions the tasks share."""

import argparse
import dataclasses
import os

import numpy as np


class EvaluationError(Exception):
    """Bad input found before the evaluation starts (exit code 2)."""


def parse_list(text):
    return [item.strip() for item in str(text).split(",") if item.strip()]


@dataclasses.dataclass
class Context:
    """Everything the tasks share: args, model, data, cached predictions.

    `build_context` fills it in and checks the parts against each other; the tasks read it.
    """

    args: argparse.Namespace
    model: object = None  # the loaded keras-jem model
    images: np.ndarray | None = None  # the --split images in [-1, 1], NHWC
    labels: np.ndarray | None = None
    ood_sets: dict = dataclasses.field(default_factory=dict)  # name -> images
    ood_scores: list = dataclasses.field(default_factory=list)  # OOD score names
    extractor: object = None  # the IS/FID feature extractor, loaded on demand
    extractor_skip_reason: str | None = None
    extractor_weights: str | None = None
    num_classes: int | None = None
    logits: np.ndarray | None = None  # the model's logits on `images`, computed once

    def output(self, name):
        return os.path.join(self.args.output_dir, name)


def _import_libraries():
    import keras  # noqa: F401

    import keras_jem  # noqa: F401  (registers the serializable classes)

    for module in ("keras_jem.models", "keras_jem.backbones", "keras_jem.sampling"):
        try:
            __import__(module)
        except ImportError:
            pass


def prepare(args):
    """Load model, data and OOD sets and check that they fit together."""
    import keras

    from keras_jem import data as data_lib
    from keras_jem import metrics

    context = Context(args)
    try:
        info = data_lib.get_info(args.dataset)
    except ValueError as error:
        raise EvaluationError(str(error)) from None

    # OOD sets and scores: names first (cheap).
    ood_names = (parse_list(args.ood_sets) if args.ood_sets
                 else list(data_lib.ood_sets_for(args.dataset)))
    if "ood" in args.tasks:
        unknown = [name for name in ood_names if name not in data_lib.available_ood()]
        if unknown or not ood_names:
            raise EvaluationError(
                f"Unknown OOD set(s) {unknown or ood_names}. Available: "
                f"{list(data_lib.available_ood())}."
            )
        model_type = str(args.config.get("model", "")).lower()
        default_scores = ["logsumexp", "max_softmax", "grad_norm"]
        if model_type in ("gmmc", "igebm"):
            default_scores = ["energy"] + default_scores
        scores = parse_list(args.ood_scores) if args.ood_scores else default_scores
        unknown = [name for name in scores if name not in metrics.available_scores()]
        if unknown:
            raise EvaluationError(
                f"Unknown OOD score(s) {unknown}. Available: {metrics.available_scores()}."
            )
        context.ood_scores = scores

    # FID weights: an explicit path must exist.
    if "generation" in args.tasks:
        if args.fid_weights is not None:
            try:
                metrics.find_inception_weights(args.fid_weights)
            except FileNotFoundError as error:
                raise EvaluationError(str(error)) from None
        if args.fid_reference and os.path.exists(args.fid_reference):
            try:
                metrics.load_statistics(args.fid_reference)
            except (ValueError, OSError) as error:
                raise EvaluationError(f"--fid_reference: {error}") from None

    # Model.
    _import_libraries()
    try:
        model = keras.saving.load_model(args.model_path, compile=False)
    except Exception as error:  # noqa: BLE001  (any loading problem is bad input here)
        raise EvaluationError(
            f"Could not load the model from {args.model_path!r}: {type(error).__name__}: {error}. "
            "Is it a .keras file written by trainers.fit (and is keras_jem importable)?"
        ) from None
    context.model = model

    # In-distribution data.
    try:
        images, labels = data_lib.load(
            args.dataset, split=args.split, data_dir=args.data_dir, download=False,
            num_examples=args.num_examples,
        )
    except (ValueError, RuntimeError) as error:
        raise EvaluationError(f"Could not load {args.dataset!r} ({args.split}): {error}") from None
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int64)
    if len(images) < 2:
        raise EvaluationError(f"{args.dataset!r} {args.split} holds {len(images)} images.")

    # Shapes: data, config, model.
    data_shape = tuple(images.shape[1:])
    expected = [("dataset " + args.dataset, tuple(info.image_shape))]
    if args.config.get("image_shape"):
        expected.append(("config.json image_shape", tuple(args.config["image_shape"])))
    model_shape = getattr(model, "image_shape", None)
    if model_shape:
        expected.append(("model.image_shape", tuple(model_shape)))
    for source, shape in expected:
        if tuple(shape) != data_shape:
            raise EvaluationError(
                f"Shape mismatch: the evaluation images are {data_shape} but {source} is "
                f"{tuple(shape)}. Evaluate the model on the dataset it was trained on "
                "(--dataset), or check --model_dir."
            )
    try:
        probe = np.asarray(model(images[:2], training=False))
    except Exception as error:  # noqa: BLE001
        raise EvaluationError(
            f"The model cannot process images of shape {data_shape}: "
            f"{type(error).__name__}: {error}"
        ) from None
    if probe.ndim != 2 or probe.shape[0] != 2:
        raise EvaluationError(
            f"The model must return logits (batch, num_classes); it returned {probe.shape}."
        )
    context.num_classes = int(probe.shape[1])
    config_classes = args.config.get("num_classes") or info.num_classes
    if context.num_classes > 1 and context.num_classes != config_classes:
        raise EvaluationError(
            f"The model has {context.num_classes} outputs but the dataset/config has "
            f"{config_classes} classes."
        )
    if context.num_classes > 1 and labels.max() >= context.num_classes:
        raise EvaluationError(
            f"Labels go up to {labels.max()} but the model has {context.num_classes} classes."
        )

    rng = np.random.default_rng(args.seed)

    # OOD sets: load them all now, so an unavailable one fails before any long computation.
    if "ood" in args.tasks:
        num_ood = args.ood_examples or len(images)
        for index, name in enumerate(ood_names):
            try:
                ood = data_lib.load_ood(
                    name, like=data_shape, reference_images=images, num_examples=num_ood,
                    seed=args.seed + 1 + index, data_dir=args.data_dir, download=False,
                )
            except (ValueError, RuntimeError, OSError) as error:
                raise EvaluationError(
                    f"OOD set {name!r} is not available: {error}\nDrop it with --ood_sets "
                    f"(e.g. --ood_sets {','.join(n for n in ood_names if n != name)})."
                ) from None
            ood = np.asarray(ood, np.float32)
            if tuple(ood.shape[1:]) != data_shape:
                raise EvaluationError(
                    f"OOD set {name!r} has images of shape {ood.shape[1:]}, expected {data_shape}."
                )
            if args.input_noise:
                ood = np.clip(ood + args.input_noise * rng.standard_normal(ood.shape), -1, 1)
            context.ood_sets[name] = ood.astype(np.float32)
    if args.input_noise:
        images = np.clip(
            images + args.input_noise * rng.standard_normal(images.shape), -1.0, 1.0
        ).astype(np.float32)
    context.images, context.labels = images, labels

    # Feature extractor for IS/FID: optional, only an explicit bad path is an error (above).
    if "generation" in args.tasks:
        try:
            weights, _ = metrics.find_inception_weights(args.fid_weights)
        except FileNotFoundError as error:
            context.extractor_skip_reason = str(error)
        else:
            context.extractor_weights = weights
    return context


def classifier_required(context):
    """`None`, or the `(status, reason)` of a task that needs a classifier the model lacks."""
    if context.num_classes < 2:
        return "skipped", (
            "the model is unconditional (one output: -energy); it has no classifier"
        )
    return None


def logits(context):
    """The logits of the in-distribution images, computed once and shared by the tasks."""
    from keras_jem import metrics

    if context.logits is None:
        args = context.args
        context.logits = metrics.predict_logits(
            context.model, context.images, batch_size=args.batch_size,
            refine_steps=args.refine_steps, refine_chains=1,
            refine_step_size=args.refine_step_size, refine_noise=args.refine_noise,
            seed=args.seed,
        )
    return context.logits


def refine_settings(args):
    return {
        "refine_steps": args.refine_steps,
        "refine_step_size": args.refine_step_size,
        "refine_noise": args.refine_noise,
        "refine_gradient": args.refine_gradient,
    }


def with_problems(task, skipped, errors):
    """`task` (a task's report entry) with the parts it skipped and the errors of the parts that
    failed, keyed by part; `error` sums the errors up in one line."""
    if skipped:
        task["skipped"] = skipped
    if errors:
        task["errors"] = errors
        task["error"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
    return task
