"""Tests of keras_jem.export and `python -m trainers.export`."""

import concurrent.futures
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_jem
from keras_jem import export
from trainers import export as export_cli

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
BUFFER_SIZE = 20000  # 20000 * 8 * 8 * 4 bytes = 5.1 MB, far above the tiny network's weights
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(seed=0, buffer_size=BUFFER_SIZE):
    keras.utils.set_random_seed(seed)
    model = keras_jem.JEM(
        backbone=keras_jem.backbones.SmallCNN(filters=(8, 16), feature_dim=16),
        num_classes=NUM_CLASSES,
        buffer_size=buffer_size,
    )
    model(np.zeros((1,) + IMAGE_SHAPE, "float32"))
    return model


def random_images(n, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n,) + IMAGE_SHAPE).astype("float32")


def expected_outputs(model, images):
    logits = keras.ops.convert_to_numpy(model(images, training=False)).astype("float64")
    log_px = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    probabilities = np.exp(logits - log_px[:, None])
    energy = keras.ops.convert_to_numpy(model.energy(images, training=False))
    return {
        "logits": logits,
        "probabilities": probabilities,
        "classes": logits.argmax(-1),
        "log_px": log_px,
        "max_softmax": probabilities.max(-1),
        "energy": energy,
    }


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / "jem"
    path = export.export_serving_model(
        model, base, ood_threshold=2.3, class_names=[f"digit_{i}" for i in range(NUM_CLASSES)]
    )
    return path


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported)


def test_writes_integer_version_with_endpoints(exported):
    assert os.path.basename(exported) == "1"
    assert os.path.isfile(os.path.join(exported, "saved_model.pb"))
    base = os.path.dirname(exported)
    assert sorted(os.listdir(base)) == ["1"]  # no temporary directory left behind


def test_serving_default_matches_model(model, loaded):
    images = random_images(5)
    outputs = loaded.signatures["serving_default"](images=tf.constant(images))
    expected = expected_outputs(model, images)
    assert sorted(outputs) == ["classes", "logits", "probabilities"]
    np.testing.assert_allclose(outputs["logits"].numpy(), expected["logits"], atol=1e-5)
    np.testing.assert_allclose(
        outputs["probabilities"].numpy(), expected["probabilities"], atol=1e-6
    )
    assert outputs["classes"].dtype == tf.int64
    np.testing.assert_array_equal(outputs["classes"].numpy(), expected["classes"])


def test_dynamic_batch_dimension(loaded):
    fn = loaded.signatures["serving_default"]
    for n in (1, 3, 17):
        assert fn(images=tf.constant(random_images(n)))["logits"].shape == (n, NUM_CLASSES)


def test_ood_score_matches_model(model, loaded):
    images = random_images(6, seed=2)
    outputs = loaded.signatures["ood_score"](images=tf.constant(images))
    expected = expected_outputs(model, images)
    assert sorted(outputs) == ["energy", "is_ood", "log_px", "max_softmax"]
    np.testing.assert_allclose(outputs["log_px"].numpy(), expected["log_px"], atol=1e-5)
    np.testing.assert_allclose(outputs["max_softmax"].numpy(), expected["max_softmax"], atol=1e-6)
    np.testing.assert_allclose(outputs["energy"].numpy(), expected["energy"], atol=1e-5)
    # JEM: energy(x) = -logsumexp(logits).
    np.testing.assert_allclose(outputs["energy"].numpy(), -expected["log_px"], atol=1e-5)
    assert outputs["is_ood"].dtype == tf.bool
    np.testing.assert_array_equal(outputs["is_ood"].numpy(), expected["log_px"] < 2.3)


def test_ood_energy_of_a_model_with_its_own_energy(tmp_path):
    class ScaledEnergyJEM(keras_jem.JEM):
        def energy(self, x, y=None, training=False):
            return 2.0 * super().energy(x, y=y, training=training) + 1.0

    keras.utils.set_random_seed(3)
    model = ScaledEnergyJEM(
        backbone=keras_jem.backbones.SmallCNN(filters=(8,), feature_dim=8),
        num_classes=NUM_CLASSES,
        buffer_size=10,
    )
    model(np.zeros((1,) + IMAGE_SHAPE, "float32"))
    path = export.export_serving_model(model, tmp_path, warmup=False)
    images = random_images(3, seed=8)
    outputs = tf.saved_model.load(path).signatures["ood_score"](images=tf.constant(images))
    expected = keras.ops.convert_to_numpy(model.energy(images))
    np.testing.assert_allclose(outputs["energy"].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(
        outputs["energy"].numpy(), -2.0 * outputs["log_px"].numpy() + 1.0, atol=1e-4
    )


def test_no_threshold_no_is_ood(model, tmp_path):
    path = export.export_serving_model(model, tmp_path, warmup=False)
    outputs = tf.saved_model.load(path).signatures["ood_score"](images=random_images(2))
    assert sorted(outputs) == ["energy", "log_px", "max_softmax"]


def test_classify_contract(model, exported, loaded):
    """TF Serving's Classify contract: one DT_STRING input `inputs`, `classes` DT_STRING [B, K]
    and `scores` DT_FLOAT [B, K]."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(exported, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    signature = saved_model.meta_graphs[0].signature_def["classify"]
    assert list(signature.inputs) == ["inputs"]
    assert signature.inputs["inputs"].dtype == tf.string.as_datatype_enum
    assert [d.size for d in signature.inputs["inputs"].tensor_shape.dim] == [-1]
    assert sorted(signature.outputs) == ["classes", "scores"]
    assert signature.outputs["classes"].dtype == tf.string.as_datatype_enum
    assert signature.outputs["scores"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in signature.outputs["classes"].tensor_shape.dim] == [-1, NUM_CLASSES]
    assert [d.size for d in signature.outputs["scores"].tensor_shape.dim] == [-1, NUM_CLASSES]

    images = random_images(4, seed=3)
    serialized = [export.make_example(image).SerializeToString() for image in images]
    outputs = loaded.signatures["classify"](inputs=tf.constant(serialized))
    expected = expected_outputs(model, images)
    classes = outputs["classes"].numpy()
    assert classes.shape == (4, NUM_CLASSES)
    assert [c.decode() for c in classes[2]] == [f"digit_{i}" for i in range(NUM_CLASSES)]
    np.testing.assert_allclose(outputs["scores"].numpy(), expected["probabilities"], atol=1e-6)


def test_classify_accepts_encoded_png(loaded):
    pixels = np.random.default_rng(4).integers(0, 256, (8, 8), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    as_float = (pixels.astype("float32") / 127.5 - 1.0)[..., None]
    serialized = [
        export.make_example(buffer.getvalue()).SerializeToString(),
        export.make_example(as_float).SerializeToString(),
    ]
    scores = loaded.signatures["classify"](inputs=tf.constant(serialized))["scores"].numpy()
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)
    # A larger RGB PNG is resized and converted to the model's grayscale.
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(buffer, format="PNG")
    example = export.make_example(buffer.getvalue()).SerializeToString()
    flat = export.make_example(np.full(IMAGE_SHAPE, 200 / 127.5 - 1, np.float32))
    scores = loaded.signatures["classify"](
        inputs=tf.constant([example, flat.SerializeToString()])
    )["scores"].numpy()
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)


@pytest.mark.parametrize(
    "example, message",
    [
        (b"not a tf.Example", "Could not parse example"),
        (export.make_example(np.zeros(5)).SerializeToString(), "exactly 64 values"),
        (tf.train.Example().SerializeToString(), "exactly 64 values"),
        (
            tf.train.Example(
                features=tf.train.Features(
                    feature={"image": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))}
                )
            ).SerializeToString(),
            "Data types don't match",
        ),
        (export.make_example(b"not an image").SerializeToString(), "image"),
    ],
)
def test_classify_rejects_malformed_examples(loaded, example, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded.signatures["classify"](inputs=tf.constant([example]))


def png_bytes(height, width, declared=None):
    """A grayscale PNG of zeros, `height` x `width`, compressed as it is written (a 16000 x
    16000 one is about 250 KB but would decode to 256 MB). `declared=(h, w)` writes a
    header-only PNG that claims that size (no pixel data at all)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF
        )

    h, w = declared or (height, width)
    out = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))]
    if declared is None:
        compressor, row, parts = zlib.compressobj(9), b"\x00" * (width + 1), []
        rows_per_chunk = max(1, (1 << 20) // (width + 1))
        for start in range(0, height, rows_per_chunk):
            parts.append(compressor.compress(row * min(rows_per_chunk, height - start)))
        parts.append(compressor.flush())
        out.append(chunk(b"IDAT", b"".join(parts)))
    out.append(chunk(b"IEND", b""))
    return b"".join(out)


def test_png_bytes_is_a_real_png():
    image = Image.open(io.BytesIO(png_bytes(30, 20)))
    assert image.size == (20, 30) and np.asarray(image).max() == 0


def _encoded(data):
    return tf.constant([export.make_example(data).SerializeToString()])


def test_classify_refuses_decompression_bombs_before_decoding(loaded):
    """The size is read from the header and checked against the export's limit (4096 x 4096
    by default) before `decode_image`: a header-only PNG claiming 16000 x 16000 gets the size
    message (decoding it would fail differently), and a real 5000 x 5000 PNG (25 MB decoded)
    is refused as fast as a tiny one is answered."""
    classify = loaded.signatures["classify"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"at most 4096 x 4096 pixels"):
        classify(inputs=_encoded(png_bytes(0, 0, declared=(16000, 16000))))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"at most 4096 x 4096 pixels"):
        classify(inputs=_encoded(png_bytes(0, 0, declared=(10, 5000))))
    real = png_bytes(5000, 5000)
    assert len(real) < 100_000
    start = time.perf_counter()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"at most 4096 x 4096 pixels"):
        classify(inputs=_encoded(real))
    assert time.perf_counter() - start < 1.0
    # Within the limit, the same PNG format decodes (4096 wide is allowed).
    assert classify(inputs=_encoded(png_bytes(8, 4096)))["scores"].shape == (1, NUM_CLASSES)


def _jpeg(height, width):
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _bmp(height, width):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="BMP")
    return buffer.getvalue()


def test_encoded_image_size_reads_headers():
    """Height and width from the headers, compared with Pillow's sizes; other formats -1."""
    cases = {
        "png": (png_bytes(37, 301), (37, 301)),
        "png_claim": (png_bytes(0, 0, declared=(70000, 3)), (70000, 3)),
        "jpeg": (_jpeg(45, 123), (45, 123)),
        "bmp": (_bmp(19, 260), (19, 260)),
        "gif": (b"GIF89a\x10\x00\x10\x00" + b"\x00" * 20, (-1, -1)),
        "garbage": (b"hello", (-1, -1)),
        "empty": (b"", (-1, -1)),
    }
    for name, (data, expected) in cases.items():
        height, width = export.encoded_image_size(tf.constant(data))
        assert (int(height), int(width)) == expected, name


def test_max_encoded_image_size_is_set_at_export(model, tmp_path):
    path = export.export_serving_model(model, tmp_path, warmup=False,
                                       max_encoded_image_size=(40, 64))
    classify = tf.saved_model.load(path).signatures["classify"]
    assert classify(inputs=_encoded(png_bytes(40, 64)))["scores"].shape == (1, NUM_CLASSES)
    assert classify(inputs=_encoded(_jpeg(40, 64)))["scores"].shape == (1, NUM_CLASSES)
    for data in (png_bytes(41, 64), png_bytes(40, 65), _jpeg(41, 10), _jpeg(10, 65)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"at most 40 x 64 pixels"):
            classify(inputs=_encoded(data))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a PNG, JPEG or BMP"):
        classify(inputs=_encoded(b"GIF89a\x10\x00\x10\x00" + b"\x00" * 20))
    with open(os.path.join(path, "assets.extra", "keras_jem_export.json")) as f:
        assert json.load(f)["max_encoded_image_size"] == [40, 64]
    with pytest.raises(ValueError, match="max_encoded_image_size"):
        export.build_export_archive(model, max_encoded_image_size=0)


def test_rejects_non_finite_pixels(loaded):
    images = random_images(2)
    images[1, 0, 0, 0] = np.nan
    for name in ("serving_default", "ood_score"):
        with pytest.raises(tf.errors.InvalidArgumentError, match="must be finite"):
            loaded.signatures[name](images=tf.constant(images))


def test_export_holds_no_replay_buffer(model, exported):
    from tensorflow.core.protobuf import saved_model_pb2

    buffer_shape = tuple(model.buffer.images.shape)
    assert buffer_shape == (BUFFER_SIZE,) + IMAGE_SHAPE
    checkpoint = tf.train.list_variables(os.path.join(exported, "variables", "variables"))
    shapes = [tuple(shape) for _, shape in checkpoint]
    assert buffer_shape not in shapes
    assert all(int(np.prod(shape)) < BUFFER_SIZE for shape in shapes)
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(exported, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    saved_variables = [
        node.variable for node in saved_model.meta_graphs[0].object_graph_def.nodes
        if node.WhichOneof("kind") == "variable"
    ]
    assert saved_variables, "expected the network's variables in the export"
    assert not [v.name for v in saved_variables if "buffer" in v.name]
    # Exactly the variables the forward pass reads: the trainable ones (no BatchNorm here).
    assert len(saved_variables) == len(model.trainable_variables)
    size = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(exported)
        for name in names
    )
    assert size < model.buffer.images.numpy().nbytes / 5


def test_warmup_requests_replay(exported, loaded):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(exported, "assets.extra", "tf_serving_warmup_requests")
    records = [
        prediction_log_pb2.PredictionLog.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(path)
    ]
    kinds = sorted({r.WhichOneof("log_type") for r in records})
    assert kinds == ["classify_log", "predict_log"]
    assert len(records) <= 1000
    for record in records:
        if record.WhichOneof("log_type") == "predict_log":
            request = record.predict_log.request
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            loaded.signatures[request.model_spec.signature_name](**inputs)
        else:
            request = record.classify_log.request
            serialized = [e.SerializeToString() for e in request.input.example_list.examples]
            loaded.signatures[request.model_spec.signature_name](inputs=tf.constant(serialized))
    with open(os.path.join(exported, "assets.extra", "keras_jem_export.json")) as f:
        info = json.load(f)
    assert info["image_shape"] == list(IMAGE_SHAPE) and info["ood_threshold"] == 2.3


def _saved_model_cli(*args):
    return subprocess.Popen(
        ["saved_model_cli", "run", "--tag_set", "serve", "--overwrite", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def test_session_style_loader_saved_model_cli(model, exported, tmp_path):
    """`saved_model_cli run` loads through the TF1 session loader, like TF Serving's C++ server."""
    images = random_images(3, seed=5)
    np.save(tmp_path / "images.npy", images)
    runs = {
        name: _saved_model_cli(
            "--dir", exported, "--signature_def", name, "--outdir", str(tmp_path / name),
            "--inputs", f"images={tmp_path / 'images.npy'}",
        )
        for name in ("serving_default", "ood_score")
    }
    bomb = png_bytes(0, 0, declared=(16000, 16000))
    runs["bomb"] = _saved_model_cli(
        "--dir", exported, "--signature_def", "classify", "--outdir", str(tmp_path / "bomb"),
        "--input_examples", f"inputs=[{{'image/encoded': [{bomb!r}]}}]",
    )
    bomb_output, _ = runs.pop("bomb").communicate(timeout=180)
    assert b"at most 4096 x 4096 pixels" in bomb_output, bomb_output.decode()[-3000:]
    for name, process in runs.items():
        output, _ = process.communicate(timeout=180)
        assert process.returncode == 0, f"{name}:\n{output.decode()[-3000:]}"

    def out(name, key):
        return np.load(tmp_path / name / f"{key}.npy")

    expected = expected_outputs(model, images)
    np.testing.assert_allclose(out("serving_default", "logits"), expected["logits"], atol=1e-5)
    np.testing.assert_allclose(
        out("serving_default", "probabilities"), expected["probabilities"], atol=1e-6
    )
    np.testing.assert_array_equal(out("serving_default", "classes"), expected["classes"])
    np.testing.assert_allclose(out("ood_score", "log_px"), expected["log_px"], atol=1e-5)
    np.testing.assert_allclose(out("ood_score", "max_softmax"), expected["max_softmax"], atol=1e-6)
    np.testing.assert_allclose(out("ood_score", "energy"), expected["energy"], atol=1e-5)
    np.testing.assert_array_equal(out("ood_score", "is_ood"), expected["log_px"] < 2.3)


def test_session_style_loader_in_process(model, exported):
    """All endpoints, classify included, through `tf.compat.v1.saved_model.loader.load`."""
    images = random_images(3, seed=7)
    serialized = [export.make_example(image).SerializeToString() for image in images]
    expected = expected_outputs(model, images)
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], exported)

        def run(name, feed):
            signature = meta_graph.signature_def[name]
            fetches = {k: v.name for k, v in signature.outputs.items()}
            feed = {signature.inputs[k].name: v for k, v in feed.items()}
            return session.run(fetches, feed)

        default = run("serving_default", {"images": images})
        ood = run("ood_score", {"images": images})
        classify = run("classify", {"inputs": serialized})
        bomb = export.make_example(png_bytes(0, 0, declared=(16000, 16000))).SerializeToString()
        with pytest.raises(tf.errors.InvalidArgumentError, match="at most 4096 x 4096 pixels"):
            run("classify", {"inputs": [bomb]})
    np.testing.assert_allclose(default["logits"], expected["logits"], atol=1e-5)
    np.testing.assert_allclose(ood["energy"], expected["energy"], atol=1e-5)
    np.testing.assert_allclose(classify["scores"], expected["probabilities"], atol=1e-6)
    assert classify["classes"][0, 3] == b"digit_3"


def test_versions_increment_and_explicit_version(model, tmp_path):
    first = export.export_serving_model(model, tmp_path, warmup=False)
    second = export.export_serving_model(model, tmp_path, warmup=False)
    assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]
    assert export.list_versions(tmp_path) == [1, 2]
    tenth = export.export_serving_model(model, tmp_path, version=10, warmup=False)
    assert os.path.basename(tenth) == "10"
    assert os.path.basename(export.export_serving_model(model, tmp_path, warmup=False)) == "11"
    with pytest.raises(FileExistsError, match="Version 2 already exists"):
        export.export_serving_model(model, tmp_path, version=2, warmup=False)
    assert sorted(os.listdir(tmp_path)) == ["1", "10", "11", "2"]


def test_concurrent_exports_get_distinct_versions(model, tmp_path):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(
            lambda _: export.export_serving_model(model, tmp_path, warmup=False), range(2)
        ))
    assert sorted(os.path.basename(p) for p in paths) == ["1", "2"]


def test_failed_export_leaves_no_version(model, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export.serving_model, "write_warmup_requests", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_serving_model(model, tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_names": ["a", "b"]}, "Expected 10 class names"),
        ({"ood_threshold": float("nan")}, "finite"),
        ({"image_feature_key": "image/encoded"}, "reserved"),
        ({"version": -1}, "non-negative integer"),
    ],
)
def test_argument_errors(model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export.export_serving_model(model, tmp_path, **kwargs)


def test_unbuilt_model_error(tmp_path):
    model = keras_jem.JEM(
        backbone=keras_jem.backbones.SmallCNN(filters=(8,), feature_dim=8), num_classes=3,
        buffer_size=30,
    )
    with pytest.raises(ValueError, match="must be built"):
        export.export_serving_model(model, tmp_path)


def test_export_cli(model, tmp_path, capsys):
    model_dir = tmp_path / "runs" / "jem"
    model_dir.mkdir(parents=True)
    model.save(model_dir / "model.keras")
    (model_dir / "eval.json").write_text(
        json.dumps({"ood": {"noise": {"logsumexp": {"auroc": 0.9, "threshold_at_95_tpr": 1.5}}}})
    )
    export_dir = tmp_path / "models" / "jem"
    path = export_cli.main([
        "--model_dir", str(model_dir), "--export_dir", str(export_dir),
        "--ood_threshold_from", str(model_dir / "eval.json"),
    ])
    assert capsys.readouterr().out.strip() == path == str(export_dir / "1")
    images = random_images(4, seed=6)
    outputs = tf.saved_model.load(path).signatures["ood_score"](images=tf.constant(images))
    expected = expected_outputs(model, images)
    np.testing.assert_allclose(outputs["log_px"].numpy(), expected["log_px"], atol=1e-5)
    np.testing.assert_array_equal(outputs["is_ood"].numpy(), expected["log_px"] < 1.5)
    with open(os.path.join(path, "assets.extra", "keras_jem_export.json")) as f:
        info = json.load(f)
    assert info["ood_threshold"] == 1.5
    assert info["max_encoded_image_size"] == [4096, 4096]
    assert export_cli.parse_max_size("2048x1024") == (2048, 1024)
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        export_cli.parse_max_size("big")


def test_export_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="no trained model"):
        export_cli.main(["--model_dir", str(tmp_path), "--export_dir", str(tmp_path / "m")])
    assert export_cli.find_ood_threshold({"ood": {"logsumexp": {"threshold": -2.0}}}) == -2.0
    assert export_cli.find_ood_threshold({"a": {"b": 3}}, key="a.b") == 3.0
    with pytest.raises(ValueError, match="no log p"):
        export_cli.find_ood_threshold({"ood": {"max_softmax": {"threshold": 0.5}}})
    with pytest.raises(ValueError, match="several"):
        export_cli.find_ood_threshold(
            {"x": {"logsumexp": {"threshold": 1.0}}, "y": {"logsumexp": {"threshold": 2.0}}}
        )


def test_export_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "trainers.export", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0 and "--ood_threshold_from" in result.stdout
