"""A client for keras-jem models served by TF Serving or by `serving.server`.

```
python -m serving.client classify --target localhost:8500 --model jem digit.png
python -m serving.client predict --target localhost:8500 --model jem --json a.png b.jpg x.npy
python -m serving.client ood --target localhost:8500 --model jem --version 3 photo.jpg
python -m serving.client status --model jem
```

Images (PNG, JPEG, or anything Pillow reads) are converted to the model's input size and channels
(read from the server with GetModelMetadata) and scaled to [-1, 1]. `.npy` files hold one image
`(H, W, C)` / `(H, W)` or a batch `(N, H, W, C)`; uint8 arrays are scaled from [0, 255], float
arrays are taken as already in [-1, 1].

From Python:

```python
from serving.client import ServingClient, load_images

with ServingClient("localhost:8500", "jem") as client:
    images, names = load_images(["digit.png"], client.image_shape())
    client.predict(images)["probabilities"]
    client.classify(images)      # [[("3", 0.91), ("8", 0.04), ...]], best first
    client.ood(images)["log_px"]
```
"""

import argparse
import json
import sys

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

DEFAULT_FEATURE_KEY = "image"


class ServingClient:
    """Talks to `tensorflow.serving.PredictionService` / `ModelService` for one model.

    Args:
        target: "host:port" of the gRPC server.
        model: the served model's name.
        version: optional integer version to ask for (default: the server's latest).
        version_label: optional version label (e.g. "stable"), instead of `version`.
        timeout: seconds per request.
        channel: optional existing `grpc.Channel` (then `target` is ignored).

    Example:

    ```python
    with ServingClient("localhost:8500", "jem") as client:
        outputs = client.predict(np.zeros((1, 8, 8, 1), "float32"))
    ```
    """

    def __init__(
        self, target="localhost:8500", model="jem", version=None, version_label=None,
        timeout=30.0, channel=None,
    ):
        if version is not None and version_label is not None:
            raise ValueError("Pass `version` or `version_label`, not both.")
        self.model = model
        self.version = version
        self.version_label = version_label
        self.timeout = timeout
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._metadata = None

    def _spec(self, spec, signature=None):
        spec.name = self.model
        if self.version is not None:
            spec.version.value = int(self.version)
        elif self.version_label is not None:
            spec.version_label = self.version_label
        if signature:
            spec.signature_name = signature

    def status(self):
        """[{"version", "state", "error_code", "error_message"}] of the model's versions."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec)
        response = self.models.GetModelStatus(request, timeout=self.timeout)
        return [
            {
                "version": s.version,
                "state": get_model_status_pb2.ModelVersionStatus.State.Name(s.state),
                "error_code": s.status.error_code,
                "error_message": s.status.error_message,
            }
            for s in response.model_version_status
        ]

    def metadata(self, refresh=False):
        """{signature: {"inputs": {key: (dtype, shape)}, "outputs": {...}}} of the model."""
        if self._metadata is None or refresh:
            request = get_model_metadata_pb2.GetModelMetadataRequest(
                metadata_field=["signature_def"]
            )
            self._spec(request.model_spec)
            response = self.prediction.GetModelMetadata(request, timeout=self.timeout)
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signature_map)

            def spec(info):
                shape = None if info.tensor_shape.unknown_rank else [
                    d.size for d in info.tensor_shape.dim
                ]
                return tf.dtypes.as_dtype(info.dtype).name, shape

            self._metadata = {
                key: {
                    "inputs": {k: spec(v) for k, v in sig.inputs.items()},
                    "outputs": {k: spec(v) for k, v in sig.outputs.items()},
                }
                for key, sig in signature_map.signature_def.items()
            }
        return self._metadata

    def image_shape(self, signature="serving_default"):
        """(H, W, C) of the model's image input, from GetModelMetadata."""
        signatures = self.metadata()
        if signature not in signatures:
            raise ValueError(
                f"Model {self.model} has no signature {signature!r}; it has {sorted(signatures)}."
            )
        for dtype, shape in signatures[signature]["inputs"].values():
            if dtype == "float32" and shape is not None and len(shape) == 4:
                return tuple(shape[1:])
        raise ValueError(
            f"Signature {signature!r} of model {self.model} has no float32 (batch, H, W, C) "
            f"input: {signatures[signature]['inputs']}."
        )

    def predict(self, images, signature="serving_default", output_filter=None, input_key="images"):
        """Predict on float32 images `(N, H, W, C)` in [-1, 1]; returns {output: numpy}."""
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, signature)
        request.inputs[input_key].CopyFrom(
            tf.make_tensor_proto(np.asarray(images, dtype=np.float32))
        )
        if output_filter:
            request.output_filter.extend(output_filter)
        response = self.prediction.Predict(request, timeout=self.timeout)
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def ood(self, images, signature="ood_score"):
        """OOD scores of images: {"log_px", "max_softmax", "energy"[, "is_ood"]} as numpy."""
        return self.predict(images, signature=signature)

    def classify(self, images, signature="classify", feature_key=DEFAULT_FEATURE_KEY):
        """Classify images through the Classify API; per image a list of (label, score), best
        first."""
        request = classification_pb2.ClassificationRequest()
        self._spec(request.model_spec, signature)
        for image in np.asarray(images, dtype=np.float32):
            example = request.input.example_list.examples.add()
            example.features.feature[feature_key].float_list.value.extend(image.reshape(-1))
        response = self.prediction.Classify(request, timeout=self.timeout)
        return [
            sorted(((c.label, c.score) for c in result.classes), key=lambda t: -t[1])
            for result in response.result.classifications
        ]

    def close(self):
        if self._own_channel:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_images(paths, image_shape):
    """Read image files (Pillow formats or .npy) as float32 `(N, H, W, C)` in [-1, 1].

    Returns:
        (images, names): names has one entry per image ("file.npy[3]" for batches in .npy).
    """
    from PIL import Image

    height, width, channels = (int(d) for d in image_shape)
    images, names = [], []
    for path in paths:
        if path.lower().endswith(".npy"):
            array = np.load(path, allow_pickle=False)
            if array.ndim == 2 and channels == 1:
                array = array[..., np.newaxis]
            if array.ndim == 3:
                array = array[np.newaxis]
            if array.ndim != 4 or tuple(array.shape[1:]) != (height, width, channels):
                raise ValueError(
                    f"{path} holds an array of shape {array.shape}; expected (H, W, C), "
                    f"(N, H, W, C) or (H, W) with (H, W, C) = {(height, width, channels)}."
                )
            if array.dtype == np.uint8:
                array = array.astype(np.float32) / 127.5 - 1.0
            array = array.astype(np.float32)
            images.extend(array)
            names.extend([path] if len(array) == 1 else [f"{path}[{i}]" for i in range(len(array))])
            continue
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                if channels not in (1, 3):
                    raise ValueError(f"Models with {channels} channels take .npy inputs only.")
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.float32).reshape(height, width, channels)
        except OSError as e:
            raise ValueError(f"Could not read image {path}: {e}") from None
        images.append(array / 127.5 - 1.0)
        names.append(path)
    if not images:
        raise ValueError("No images given.")
    return np.stack(images).astype(np.float32), names


def _format_table(header, rows):
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m serving.client",
        description="Query a keras-jem model served over TF Serving's gRPC API.",
    )
    parser.add_argument("command", choices=["classify", "predict", "ood", "status", "metadata"])
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="PNG/JPEG/... or .npy files")
    parser.add_argument("--target", default="localhost:8500", help="gRPC host:port")
    parser.add_argument("--model", default="jem", help="served model name (default jem)")
    version = parser.add_mutually_exclusive_group()
    version.add_argument("--version", type=int, default=None, help="model version")
    version.add_argument("--version_label", default=None, help="model version label")
    parser.add_argument(
        "--signature", default=None,
        help="signature (default: classify for classify, serving_default for predict, "
        "ood_score for ood)",
    )
    parser.add_argument("--feature_key", default=DEFAULT_FEATURE_KEY,
                        help="tf.Example feature of the image for classify (default 'image')")
    parser.add_argument("--top_k", type=int, default=3, help="classes shown per image")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def run(args, out=sys.stdout):
    with ServingClient(
        args.target, args.model, version=args.version, version_label=args.version_label,
        timeout=args.timeout,
    ) as client:
        if args.command == "status":
            result = client.status()
            text = _format_table(
                ["version", "state", "error"],
                [[s["version"], s["state"], s["error_message"]] for s in result],
            )
            return result, text
        if args.command == "metadata":
            result = client.metadata()
            lines = []
            for key, sig in sorted(result.items()):
                lines.append(f"{key}:")
                for kind in ("inputs", "outputs"):
                    for name, (dtype, shape) in sorted(sig[kind].items()):
                        lines.append(f"  {kind[:-1]:6} {name}: {dtype} {shape}")
            return result, "\n".join(lines)
        if not args.images:
            raise ValueError(f"`{args.command}` needs at least one IMAGE.")
        default_signature = {"classify": "classify", "predict": "serving_default",
                             "ood": "ood_score"}[args.command]
        signature = args.signature or default_signature
        images, names = load_images(args.images, client.image_shape(signature if
                                    args.command != "classify" else "serving_default"))
        if args.command == "classify":
            results = client.classify(images, signature=signature, feature_key=args.feature_key)
            result = [
                {"image": name, "classes": [{"label": l, "score": s} for l, s in r[: args.top_k]]}
                for name, r in zip(names, results)
            ]
            rows = [
                [name] + [f"{l} ({s:.3f})" for l, s in r[: args.top_k]]
                for name, r in zip(names, results)
            ]
            k = max(len(r) - 1 for r in rows)
            return result, _format_table(["image"] + [f"top{i + 1}" for i in range(k)], rows)
        outputs = client.predict(images, signature=signature)
        keys = sorted(outputs)
        result = []
        for i, name in enumerate(names):
            entry = {"image": name}
            for key in keys:
                value = outputs[key][i]
                entry[key] = value.tolist() if hasattr(value, "tolist") else value
            result.append(entry)
        if args.command == "predict" and "probabilities" in outputs:
            rows = []
            for i, name in enumerate(names):
                p = outputs["probabilities"][i]
                top = np.argsort(-p)[: args.top_k]
                rows.append([name, int(np.argmax(p))] + [f"{j} ({p[j]:.3f})" for j in top])
            header = ["image", "class"] + [f"top{i + 1}" for i in range(len(rows[0]) - 2)]
            return result, _format_table(header, rows)
        scalar_keys = [k for k in keys if outputs[k].ndim == 1]
        rows = [
            [name] + [
                f"{outputs[k][i]:.4f}" if outputs[k].dtype.kind == "f" else outputs[k][i]
                for k in scalar_keys
            ]
            for i, name in enumerate(names)
        ]
        return result, _format_table(["image"] + scalar_keys, rows)


def main(argv=None):
    args = build_parser().parse_intermixed_args(argv)
    try:
        result, text = run(args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
