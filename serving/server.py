"""An embedded TensorFlow-Serving-compatible model server.

```
python -m serving.server --model_base_path models --port 8500 --rest_port 8501
python -m serving.server --model_base_path models --enable_batching --max_batch_size 32 \
    --batch_timeout_ms 2
python -m serving.server --model_config_file serving/configs/model_config.pbtxt
python -m serving.server --model_name jem --model_base_path models/jem   # TF Serving style
```

Every subdirectory of `--model_base_path` is a model, served under its directory name; every
integer-named subdirectory of a model is a version (a SavedModel, as written by
`python -m trainers.export`). The newest version that loads is served (or the versions chosen by a
`model_version_policy` in `--model_config_file`, the same text-proto file the official
`tensorflow_model_server` takes). The directories are polled every `--poll_seconds`: a new version
is loaded and then replaces the old one without a restart; a version that fails to load (corrupt
or half-written) is logged and skipped, and retried only when its files change.

gRPC: `tensorflow.serving.PredictionService` (`Predict`, `Classify`, `GetModelMetadata`;
`Regress` and `MultiInference` answer UNIMPLEMENTED) and `tensorflow.serving.ModelService`
(`GetModelStatus`), with the official `tensorflow-serving-api` messages, so clients written for
TF Serving work unchanged. REST (`--rest_port`): `GET /v1/models/<name>[/versions/<v>|/labels/<l>]`
(status), `GET .../metadata`, `POST ...:predict` and `POST ...:classify`, as in TF Serving.

Errors follow TF Serving's status codes: unknown model or version NOT_FOUND, unknown version label
INVALID_ARGUMENT, unknown signature FAILED_PRECONDITION, bad inputs (shape, dtype, channels,
non-finite pixels, empty batch, malformed tf.Example) INVALID_ARGUMENT, a batch larger than
`--max_request_batch_size` RESOURCE_EXHAUSTED, a full batching queue UNAVAILABLE; the message says
what was expected. A failing request never affects the others.

gRPC requests are received, decoded and answered by one asyncio event loop (`grpc.aio`), which
costs less per request than a thread per call. Without batching each request runs on a pool of
`--max_workers` threads. With batching on, concurrent requests to the same model version and
signature are concatenated into one batch of at most `--max_batch_size` rows, waiting at most
`--batch_timeout_ms` for more requests, run on one of `--num_batch_threads` batch threads (0: on
the event loop's own thread), and the results are split back to their requests.
"""

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import http.server
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.parse

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from google.protobuf import text_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

logger = logging.getLogger("serving.server")

DEFAULT_SIGNATURE = "serving_default"
WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000
_INIT_OP_KEY = "__saved_model_init_op"
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


# Numeric dtypes sent and received as raw `tensor_content` bytes (what `tf.make_tensor_proto`
# produces for numpy arrays), converted without going through TensorFlow.
_RAW_DTYPES = {
    types_pb2.DT_FLOAT: np.dtype(np.float32),
    types_pb2.DT_DOUBLE: np.dtype(np.float64),
    types_pb2.DT_HALF: np.dtype(np.float16),
    types_pb2.DT_INT8: np.dtype(np.int8),
    types_pb2.DT_INT16: np.dtype(np.int16),
    types_pb2.DT_INT32: np.dtype(np.int32),
    types_pb2.DT_INT64: np.dtype(np.int64),
    types_pb2.DT_UINT8: np.dtype(np.uint8),
    types_pb2.DT_BOOL: np.dtype(np.bool_),
}
_RAW_ENUMS = {dtype: enum for enum, dtype in _RAW_DTYPES.items()}


def tensor_proto_to_numpy(proto):
    """`tf.make_ndarray` with a fast path for `tensor_content` protos."""
    dtype = _RAW_DTYPES.get(proto.dtype)
    if dtype is not None and proto.tensor_content and not proto.tensor_shape.unknown_rank:
        shape = [d.size for d in proto.tensor_shape.dim]
        if all(d >= 0 for d in shape):
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if len(proto.tensor_content) != expected:
                raise ValueError(
                    f"tensor_content holds {len(proto.tensor_content)} bytes; shape {shape} of "
                    f"{dtype.name} needs {expected}"
                )
            return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)
    return tf.make_ndarray(proto)


def numpy_to_tensor_proto(array, proto):
    """Fill the TensorProto `proto` from a numpy array (like `tf.make_tensor_proto`)."""
    enum = _RAW_ENUMS.get(array.dtype)
    if enum is None:
        proto.CopyFrom(tf.make_tensor_proto(array))
        return proto
    proto.dtype = enum
    for size in array.shape:
        proto.tensor_shape.dim.add().size = size
    proto.tensor_content = np.ascontiguousarray(array).tobytes()
    return proto


class ServingError(Exception):
    """An error answered to the client with a gRPC status code and a message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _deadline_exceeded():
    return ServingError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "Deadline exceeded while the request waited for its batch or ran; raise the client's "
        "timeout, or lower --batch_timeout_ms.",
    )


def _dtype_name(enum_value):
    return types_pb2.DataType.Name(enum_value)


def _shape_str(shape):
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _tf_error_message(error):
    """The useful part of a TensorFlow runtime error message (no graph/stack boilerplate)."""
    lines = []
    for line in str(getattr(error, "message", error)).splitlines():
        stripped = line.strip()
        if (
            not stripped
            or stripped.startswith(
                ("Graph execution error", "Detected at node", "<stack traces", "[[")
            )
        ):
            continue
        lines.append(re.sub(r"\s*\[\[.*$|\s*\[Op:.*$", "", stripped))
    return " ".join(line for line in lines if line) or str(error)


class Signature:
    """One SignatureDef of a loaded SavedModel, with input validation and execution."""

    def __init__(self, key, signature_def, function):
        self.key = key
        self.signature_def = signature_def
        self.function = function
        self.inputs = {k: self._spec(v) for k, v in signature_def.inputs.items()}
        self.outputs = {k: self._spec(v) for k, v in signature_def.outputs.items()}
        self.batchable = bool(self.inputs) and all(
            shape is not None and len(shape) >= 1 and shape[0] == -1
            for _, shape in list(self.inputs.values()) + list(self.outputs.values())
        )

    @staticmethod
    def _spec(tensor_info):
        if tensor_info.tensor_shape.unknown_rank:
            shape = None
        else:
            shape = [d.size for d in tensor_info.tensor_shape.dim]
        return tensor_info.dtype, shape

    def describe_inputs(self):
        return ", ".join(
            f"'{k}': {_dtype_name(dtype)} "
            f"{_shape_str(shape) if shape is not None else '(any shape)'}"
            for k, (dtype, shape) in sorted(self.inputs.items())
        )

    def decode_inputs(self, tensor_protos, max_rows):
        """Validate request TensorProtos against the signature; returns (numpy dict, rows)."""
        expected, received = set(self.inputs), set(tensor_protos)
        if expected != received:
            raise _invalid(
                f"Request inputs do not match signature '{self.key}': sent "
                f"{sorted(received)}, expected exactly {sorted(expected)} "
                f"({self.describe_inputs()}). Sent extra: {sorted(received - expected)}. "
                f"Missing but required: {sorted(expected - received)}."
            )
        arrays, rows = {}, None
        for key, proto in tensor_protos.items():
            dtype, shape = self.inputs[key]
            if proto.dtype != dtype:
                raise _invalid(
                    f"Input '{key}' of signature '{self.key}' has dtype "
                    f"{_dtype_name(proto.dtype)}; expected {_dtype_name(dtype)} "
                    f"with shape {_shape_str(shape) if shape is not None else '(any)'}."
                    + (" Send float32 images in [-1, 1]." if dtype == types_pb2.DT_FLOAT else "")
                )
            try:
                array = tensor_proto_to_numpy(proto)
            except Exception as e:  # malformed TensorProto (content size vs shape, ...)
                raise _invalid(f"Input '{key}' is not a valid TensorProto: {e}") from None
            self._check_shape(key, array.shape, shape)
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise _invalid(
                    f"Input '{key}' holds NaN or infinite values; expected finite values "
                    "(images in [-1, 1])."
                )
            if array.ndim >= 1:
                if rows is None:
                    rows = array.shape[0]
                elif array.shape[0] != rows:
                    raise _invalid(
                        "Input tensors must have equal 0th-dimension (batch) size; received "
                        + ", ".join(f"'{k}': {a.shape[0]}" for k, a in arrays.items())
                        + f", '{key}': {array.shape[0]}."
                    )
            arrays[key] = array
        rows = rows or 0
        if self.batchable:
            self._check_rows(rows, max_rows)
        return arrays, rows

    def _check_shape(self, key, received, expected):
        if expected is None:
            return
        if len(received) != len(expected) or any(
            e != -1 and e != r for e, r in zip(expected, received)
        ):
            hint = ""
            if (
                len(expected) == 4
                and len(received) == 4
                and list(received[1:3]) == list(expected[1:3])
                and received[3] != expected[3]
            ):
                hint = (
                    f" The images have {received[3]} channels; the model takes {expected[3]} "
                    f"(1 = grayscale, 3 = RGB)."
                )
            elif len(expected) == 4 and len(received) == 3:
                hint = " Add the batch dimension: send a batch of one image as [1, H, W, C]."
            raise _invalid(
                f"Input '{key}' of signature '{self.key}' has shape {_shape_str(received)}; "
                f"expected {_shape_str(expected)} (-1 = any size).{hint}"
            )

    @staticmethod
    def _check_rows(rows, max_rows):
        if rows == 0:
            raise _invalid("The request holds an empty batch (0 rows); send at least one row.")
        if max_rows and rows > max_rows:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"The request holds {rows} rows; this server accepts at most {max_rows} per "
                "request (--max_request_batch_size). Split it into smaller requests.",
            )

    def run(self, arrays):
        """Run the signature on numpy inputs; returns a dict of numpy outputs."""
        try:
            outputs = self.function(**{k: tf.constant(v) for k, v in arrays.items()})
        except tf.errors.OpError as e:
            code = _GRPC_CODES.get(e.error_code, grpc.StatusCode.INTERNAL)
            raise ServingError(code, _tf_error_message(e)) from None
        except (TypeError, ValueError) as e:
            raise _invalid(str(e)) from None
        return {k: v.numpy() for k, v in outputs.items()}


class _Task:
    __slots__ = ("arrays", "future", "rows")

    def __init__(self, arrays, rows, future):
        self.arrays, self.rows, self.future = arrays, rows, future


def _run_signature(signature, arrays):
    """`signature.run`, with any failure turned into a ServingError (never raises)."""
    try:
        return signature.run(arrays)
    except ServingError as e:
        return e
    except Exception as e:
        return ServingError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


class Batcher:
    """Concatenates concurrent requests for one signature into batches, on an asyncio loop.

    A batch closes when it holds `max_batch_size` rows, or `timeout` seconds after its first
    request arrived (as TF Serving's `batch_timeout_micros`); it is run once, and each request
    gets its own rows of the outputs. While every batch thread is busy, the open batch keeps
    growing up to `max_batch_size` instead of closing: it could not run earlier anyway. If a
    batch fails, its requests are run one by one so that one bad request fails alone.

    Requests are queued with `submit` from the loop's thread (the gRPC handlers) or with
    `submit_threadsafe` from any other thread (the REST handlers, warmup).

    Args:
        signature: the `Signature` to run.
        max_batch_size: the largest number of rows in one batch.
        timeout: seconds to wait for more requests after the first of a batch.
        num_threads: batches run in parallel, each on its own thread; 0 runs every batch on the
            event loop's own thread (the least overhead per request, for small, fast models;
            the server reads no new request while a batch runs).
        max_enqueued_rows: rows waiting beyond which requests get UNAVAILABLE (None: no limit).
        loop: the running asyncio event loop that owns the batcher.

    Example:

    ```python
    batcher = Batcher(signature, max_batch_size=32, timeout=0.002, loop=loop)
    outputs = await batcher.submit({"images": images}, rows=len(images))   # on the loop
    outputs = batcher.submit_threadsafe({"images": images}, len(images)).result()  # elsewhere
    ```
    """

    def __init__(self, signature, max_batch_size, timeout, num_threads=1, max_enqueued_rows=None,
                 loop=None):
        if loop is None:
            raise ValueError("Batcher needs the asyncio event loop it runs on (`loop=`).")
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1; received {max_batch_size}.")
        if int(num_threads) < 0:
            raise ValueError(f"num_threads must be >= 0; received {num_threads}.")
        self.signature = signature
        self.max_batch_size = int(max_batch_size)
        self.timeout = float(timeout)
        self.num_threads = int(num_threads)
        self.max_enqueued_rows = max_enqueued_rows
        self.loop = loop
        self.num_batches = 0
        self.num_rows = 0
        self._executor = None
        if self.num_threads:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.num_threads, thread_name_prefix=f"batch-{signature.key}"
            )
        self._open, self._open_rows = [], 0
        self._ready = collections.deque()  # closed batches waiting for a thread
        self._waiting_rows = 0  # rows in the open and the closed batches
        self._running = 0
        self._timer = None
        self._expired = False
        self._stopped = False
        self._drained = None

    # --- queueing (event-loop thread) ---

    def submit(self, arrays, rows):
        """Queue a request; returns an asyncio future of its outputs (a dict of arrays).

        Must be called on the batcher's loop. The future raises the request's `ServingError`.
        """
        future = self.loop.create_future()
        if self._stopped:  # after `stop`: run alone, on the loop (the batch threads are gone)
            self._finish([_Task(arrays, rows, future)], [_run_signature(self.signature, arrays)])
            return future
        if self.max_enqueued_rows and self._waiting_rows + rows > self.max_enqueued_rows:
            raise ServingError(
                grpc.StatusCode.UNAVAILABLE,
                f"The batching queue of signature '{self.signature.key}' is full "
                f"({self._waiting_rows} rows waiting); retry later.",
            )
        if self._open_rows + rows > self.max_batch_size:
            self._close()
        self._open.append(_Task(arrays, rows, future))
        self._open_rows += rows
        self._waiting_rows += rows
        if self._open_rows >= self.max_batch_size:
            self._close()
        elif len(self._open) == 1:
            self._expired = False
            self._timer = self.loop.call_later(self.timeout, self._on_timeout)
        self._dispatch()
        return future

    def submit_threadsafe(self, arrays, rows):
        """`submit` from any thread but the loop's; returns a `concurrent.futures.Future`."""

        async def submit_and_wait():
            return await self.submit(arrays, rows)

        return asyncio.run_coroutine_threadsafe(submit_and_wait(), self.loop)

    def _on_timeout(self):
        self._timer = None
        self._expired = True
        self._dispatch()

    def _close(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._open:
            self._ready.append(self._open)
        self._open, self._open_rows, self._expired = [], 0, False

    def _has_thread(self):
        return self.num_threads == 0 or self._running < self.num_threads

    def _dispatch(self):
        while self._has_thread():
            if not self._ready and self._open and (self._expired or self._stopped):
                self._close()
            if not self._ready:
                break
            self._start(self._ready.popleft())
        if self._drained is not None and not (self._ready or self._open or self._running):
            self._drained.set()

    # --- execution ---

    def _start(self, batch):
        rows = sum(task.rows for task in batch)
        self._waiting_rows -= rows
        self.num_batches += 1
        self.num_rows += rows
        if self._executor is None:
            self._finish(batch, self._execute(batch))
            return
        self._running += 1
        done = self._executor.submit(self._execute, batch)
        done.add_done_callback(
            lambda f: self.loop.call_soon_threadsafe(self._finished, batch, f)
        )

    def _finished(self, batch, done):
        self._running -= 1
        try:
            results = done.result()
        except Exception as e:  # never leave a request waiting
            results = [ServingError(grpc.StatusCode.INTERNAL, f"Batch failed: {e}")] * len(batch)
        self._finish(batch, results)
        self._dispatch()

    @staticmethod
    def _finish(batch, results):
        for task, result in zip(batch, results):
            if task.future.done():  # the client went away or its deadline passed
                continue
            if isinstance(result, ServingError):
                task.future.set_exception(result)
            else:
                task.future.set_result(result)

    def _execute(self, batch):
        """Runs one batch (on a batch thread or the loop); returns one result per task."""
        if len(batch) == 1:
            return [_run_signature(self.signature, batch[0].arrays)]
        try:
            arrays = {
                key: np.concatenate([task.arrays[key] for task in batch], axis=0)
                for key in batch[0].arrays
            }
        except Exception as e:
            return [ServingError(grpc.StatusCode.INTERNAL, f"Batch failed: {e}")] * len(batch)
        outputs = _run_signature(self.signature, arrays)
        if isinstance(outputs, ServingError):
            if outputs.code == grpc.StatusCode.INTERNAL:
                return [outputs] * len(batch)
            # One bad request (e.g. a graph-side check) must fail alone.
            return [_run_signature(self.signature, task.arrays) for task in batch]
        results, start = [], 0
        for task in batch:
            stop = start + task.rows
            results.append({key: value[start:stop] for key, value in outputs.items()})
            start = stop
        return results

    # --- shutdown ---

    async def _drain(self):
        self._stopped = True
        self._drained = asyncio.Event()
        self._dispatch()
        await self._drained.wait()

    def stop(self, timeout=30.0):
        """Answer every queued request, then stop (from any thread but the loop's).

        Requests submitted afterwards are run alone.
        """
        if not self.loop.is_closed() and self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._drain(), self.loop).result(timeout)
            except Exception as e:  # a stuck model must not block the shutdown
                logger.warning("Signature %s: batcher did not drain: %r", self.signature.key, e)
        else:
            self._stopped = True
        if self._executor is not None:
            self._executor.shutdown(wait=False)


class ServableVersion:
    """One loaded version of a model: its signatures and (optionally) their batchers.

    Args:
        name, version, path: the model name, integer version and SavedModel directory.
        loaded: the object `tf.saved_model.load` returned.
        signature_defs: the MetaGraph's SignatureDefs by key.
        batching: None, or a dict with max_batch_size, batch_timeout_ms, num_batch_threads and
            max_enqueued_batches: batch the batchable signatures.
        loop: the asyncio event loop the batchers run on (required with `batching`).
    """

    def __init__(self, name, version, path, loaded, signature_defs, batching=None, loop=None):
        self.name = name
        self.version = version
        self.path = path
        self.loaded = loaded  # keeps the restored variables alive
        self.signature_defs = signature_defs
        self.signatures = {
            key: Signature(key, signature_defs[key], loaded.signatures[key])
            for key in signature_defs
        }
        self.batchers = {}
        if batching:
            if loop is None:
                raise ValueError("Batching needs the server's asyncio event loop (`loop=`).")
            for key, signature in self.signatures.items():
                if signature.batchable:
                    self.batchers[key] = Batcher(
                        signature,
                        batching["max_batch_size"],
                        batching["batch_timeout_ms"] / 1000.0,
                        num_threads=batching["num_batch_threads"],
                        max_enqueued_rows=batching["max_batch_size"]
                        * batching["max_enqueued_batches"],
                        loop=loop,
                    )

    @classmethod
    def load(cls, name, version, path, batching=None, loop=None):
        pb_path = os.path.join(path, "saved_model.pb")
        if not os.path.isfile(pb_path):
            raise FileNotFoundError(f"no saved_model.pb in {path}")
        saved_model = saved_model_pb2.SavedModel()
        with open(pb_path, "rb") as f:
            saved_model.ParseFromString(f.read())
        meta_graphs = [m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags]
        if not meta_graphs:
            raise ValueError(f"{pb_path} has no MetaGraph tagged 'serve'")
        signature_defs = {
            key: sig
            for key, sig in meta_graphs[0].signature_def.items()
            if key != _INIT_OP_KEY
        }
        if not signature_defs:
            raise ValueError(f"{pb_path} has no serving signatures")
        loaded = tf.saved_model.load(path, tags=["serve"])
        return cls(name, version, path, loaded, signature_defs, batching, loop)

    def signature(self, key):
        key = key or DEFAULT_SIGNATURE
        if key not in self.signatures:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{key}" not found in model {self.name} version '
                f"{self.version}. Available signatures: {sorted(self.signatures)}.",
            )
        return self.signatures[key]

    def _batcher(self, signature, rows):
        batcher = self.batchers.get(signature.key)
        if batcher is None or rows >= batcher.max_batch_size:
            # A request that fills a batch by itself gains nothing from waiting for one: it
            # runs at once, alone (TF Serving would refuse one larger than a batch).
            return None
        return batcher

    def run(self, signature, arrays, rows, timeout=None):
        """Runs one request from any thread but the event loop's (REST handlers, warmup)."""
        batcher = self._batcher(signature, rows)
        if batcher is None or not batcher.loop.is_running():
            return signature.run(arrays)
        try:
            return batcher.submit_threadsafe(arrays, rows).result(timeout)
        except concurrent.futures.TimeoutError:
            raise _deadline_exceeded() from None

    async def run_async(self, signature, arrays, rows, timeout=None, executor=None):
        """Runs one request from the event loop: in a batch, or alone on `executor`."""
        batcher = self._batcher(signature, rows)
        if batcher is None:
            pending = asyncio.get_running_loop().run_in_executor(
                executor, signature.run, arrays
            )
        else:
            pending = batcher.submit(arrays, rows)
        try:
            return await asyncio.wait_for(pending, timeout)
        except asyncio.TimeoutError:
            raise _deadline_exceeded() from None

    def unload(self):
        for key, batcher in self.batchers.items():
            batcher.stop()
            if batcher.num_batches:
                logger.info(
                    "Model %s version %d signature %s: %d rows in %d batches (%.1f rows per "
                    "batch).", self.name, self.version, key, batcher.num_rows,
                    batcher.num_batches, batcher.num_rows / batcher.num_batches,
                )


def _version_fingerprint(path):
    entries = []
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                stat = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


class _ModelState:
    def __init__(self, config):
        self.config = config
        self.served = {}  # version -> ServableVersion
        self.failed = {}  # version -> (fingerprint, error message)
        self.ended = set()  # versions unloaded after having been served


class ModelManager:
    """Loads, serves and retires model versions found under the configured base paths.

    Args:
        model_configs: list of `tensorflow.serving.ModelConfig` protos (name, base_path,
            model_version_policy, version_labels), or None to discover the models as the
            subdirectories of `model_base_path` at every poll.
        model_base_path: the directory of models when `model_configs` is None.
        batching: None, or a dict with max_batch_size, batch_timeout_ms, num_batch_threads and
            max_enqueued_batches.
        warmup: a callable(servable) replaying the version's warmup requests, or None.
        loop: the asyncio event loop the batchers run on (required with `batching`).
    """

    def __init__(self, model_configs=None, model_base_path=None, batching=None, warmup=None,
                 loop=None):
        if model_configs is None and model_base_path is None:
            raise ValueError("Pass `model_configs` or `model_base_path`.")
        self._static_configs = model_configs
        self._model_base_path = model_base_path
        self._batching = batching
        self.warmup = warmup
        self.loop = loop
        self._models = {}
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()

    def _configs(self):
        if self._static_configs is not None:
            return list(self._static_configs)
        configs = []
        if os.path.isdir(self._model_base_path):
            for name in sorted(os.listdir(self._model_base_path)):
                path = os.path.join(self._model_base_path, name)
                if not name.startswith(".") and os.path.isdir(path):
                    configs.append(
                        model_server_config_pb2.ModelConfig(
                            name=name, base_path=path, model_platform="tensorflow"
                        )
                    )
        return configs

    def poll(self):
        """Scan the base paths once; load new versions and retire replaced ones."""
        with self._poll_lock:
            configs = self._configs()
            names = {c.name for c in configs}
            with self._lock:
                removed = [self._models.pop(n) for n in list(self._models) if n not in names]
            for state in removed:
                logger.info("Model %s is gone; unloading it.", state.config.name)
                for servable in state.served.values():
                    servable.unload()
            for config in configs:
                with self._lock:
                    state = self._models.get(config.name)
                    if state is None:
                        state = self._models[config.name] = _ModelState(config)
                    state.config = config
                try:
                    self._sync(state)
                except Exception:  # one model's trouble never stops the others
                    logger.exception("Error while polling model %s", config.name)

    def _sync(self, state):
        config = state.config
        base = config.base_path
        on_disk = []
        if os.path.isdir(base):
            for entry in os.listdir(base):
                if entry.isascii() and entry.isdigit() and os.path.isdir(os.path.join(base, entry)):
                    on_disk.append(int(entry))
        on_disk.sort(reverse=True)
        policy = config.model_version_policy.WhichOneof("policy_choice")
        if policy == "all":
            wanted, limit = on_disk, None
        elif policy == "specific":
            pinned = set(config.model_version_policy.specific.versions)
            wanted, limit = [v for v in on_disk if v in pinned], None
        else:
            limit = config.model_version_policy.latest.num_versions or 1
            wanted = on_disk

        keep = []
        for version in wanted:
            if limit is not None and len(keep) >= limit:
                break
            if version in state.served:
                keep.append(version)
                continue
            path = os.path.join(base, str(version))
            fingerprint = _version_fingerprint(path)
            failed = state.failed.get(version)
            if failed is not None and failed[0] == fingerprint:
                continue
            servable = self._load(config.name, version, path, fingerprint, state)
            if servable is not None:
                with self._lock:
                    state.served[version] = servable
                    state.failed.pop(version, None)
                    state.ended.discard(version)
                keep.append(version)
        retired = [v for v in state.served if v not in keep]
        with self._lock:
            retired_servables = [state.served.pop(v) for v in retired]
            state.ended.update(retired)
        for servable in retired_servables:
            logger.info("Unloading model %s version %d.", servable.name, servable.version)
            servable.unload()
        for version in list(state.failed):
            if version not in on_disk:
                del state.failed[version]

    def _load(self, name, version, path, fingerprint, state):
        start = time.monotonic()
        servable = None
        try:
            servable = ServableVersion.load(name, version, path, self._batching, self.loop)
            if self.warmup is not None:
                self.warmup(servable)
        except Exception as e:  # any failure to load only skips this version
            if servable is not None:
                servable.unload()
            message = f"{type(e).__name__}: {_tf_error_message(e)}"
            logger.error(
                "Skipping model %s version %d at %s: it does not load (%s). The versions already "
                "served stay up; this one is retried when its files change.",
                name,
                version,
                path,
                message[:500],
            )
            state.failed[version] = (fingerprint, message)
            return None
        logger.info(
            "Serving model %s version %d from %s (signatures: %s) after %.1f s.",
            name,
            version,
            path,
            ", ".join(sorted(servable.signatures)),
            time.monotonic() - start,
        )
        return servable

    def model_names(self):
        with self._lock:
            return sorted(self._models)

    def resolve(self, model_spec):
        """The ServableVersion a request's ModelSpec asks for, or a ServingError."""
        name = model_spec.name
        if not name:
            raise _invalid("model_spec.name is empty; set it to the name of a served model.")
        choice = model_spec.WhichOneof("version_choice")
        with self._lock:
            state = self._models.get(name)
            if state is not None and choice is None and state.served:
                return state.served[max(state.served)]  # the common case, kept cheap
            served = dict(state.served) if state is not None else {}
            labels = dict(state.config.version_labels) if state is not None else {}
        if state is None or (not served and choice is None):
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({name}). Served models: "
                f"{self.served_summary()}.",
            )
        if choice == "version":
            version = model_spec.version.value
            request = f"Specific({name}, {version})"
        elif choice == "version_label":
            label = model_spec.version_label
            if label not in labels:
                raise _invalid(
                    f"Unrecognized servable version label: {label}. Labels of model {name}: "
                    f"{labels or 'none (set version_labels in --model_config_file)'}."
                )
            version = labels[label]
            request = f"Specific({name}, {version}) (label '{label}')"
        if version not in served:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: {request}. Served versions of {name}: "
                f"{sorted(served)}.",
            )
        return served[version]

    def served_summary(self):
        with self._lock:
            return {name: sorted(s.served) for name, s in self._models.items()}

    def version_states(self, name, version=None):
        """[(version, state name, error code, message)] for GetModelStatus."""
        with self._lock:
            state = self._models.get(name)
            if state is None:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find any versions of model {name}. Served models: "
                    f"{sorted(self._models)}.",
                )
            rows = {v: ("AVAILABLE", error_codes_pb2.OK, "") for v in state.served}
            for v in state.ended:
                rows.setdefault(v, ("END", error_codes_pb2.OK, ""))
            for v, (_, message) in state.failed.items():
                rows.setdefault(v, ("END", error_codes_pb2.UNKNOWN, message))
        if version is not None:
            if version not in rows:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {version} of model {name}. Known versions: "
                    f"{sorted(rows)}.",
                )
            rows = {version: rows[version]}
        if not rows:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}."
            )
        return [(v,) + rows[v] for v in sorted(rows, reverse=True)]

    def labels(self, name):
        with self._lock:
            state = self._models.get(name)
            return dict(state.config.version_labels) if state is not None else {}

    def stop(self):
        with self._poll_lock, self._lock:
            for state in self._models.values():
                for servable in state.served.values():
                    servable.unload()


class ServingCore:
    """The request handling shared by the gRPC services and the REST endpoint.

    The gRPC handlers run on the server's asyncio loop and use the `*_async` methods; the REST
    handlers and warmup run on their own threads and use the plain ones.

    Args:
        manager: the `ModelManager`.
        max_request_batch_size: the most rows accepted in one request (0 = unlimited).
        executor: the thread pool that runs unbatched requests for the gRPC handlers (None:
            the loop's default executor).
    """

    def __init__(self, manager, max_request_batch_size=1024, executor=None):
        self.manager = manager
        self.max_request_batch_size = max_request_batch_size
        self.executor = executor
        self.num_requests = 0

    def predict(self, request, timeout=None):
        servable = self.manager.resolve(request.model_spec)
        return self.predict_on(servable, request, timeout)

    def predict_on(self, servable, request, timeout=None):
        signature, output_keys, arrays, rows = self._predict_inputs(servable, request)
        outputs = servable.run(signature, arrays, rows, timeout)
        return self._predict_response(servable, signature, output_keys, outputs)

    async def predict_async(self, request, timeout=None):
        servable = self.manager.resolve(request.model_spec)
        signature, output_keys, arrays, rows = self._predict_inputs(servable, request)
        outputs = await servable.run_async(signature, arrays, rows, timeout, self.executor)
        return self._predict_response(servable, signature, output_keys, outputs)

    def _predict_inputs(self, servable, request):
        signature = servable.signature(request.model_spec.signature_name)
        output_keys = list(request.output_filter) or sorted(signature.outputs)
        for key in output_keys:
            if key not in signature.outputs:
                raise _invalid(
                    f"output tensor alias not found in signature: {key}. Outputs expected to be "
                    f"in the set {sorted(signature.outputs)}."
                )
        if len(set(output_keys)) != len(output_keys):
            raise _invalid(f"duplicate output tensor alias in output_filter: {output_keys}")
        arrays, rows = signature.decode_inputs(request.inputs, self.max_request_batch_size)
        return signature, output_keys, arrays, rows

    def _predict_response(self, servable, signature, output_keys, outputs):
        self.num_requests += 1
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature.key
        for key in output_keys:
            numpy_to_tensor_proto(outputs[key], response.outputs[key])
        return response

    def classify(self, request, timeout=None):
        servable = self.manager.resolve(request.model_spec)
        return self.classify_on(servable, request, timeout)

    def classify_on(self, servable, request, timeout=None):
        signature, arrays, rows = self._classify_inputs(servable, request)
        outputs = servable.run(signature, arrays, rows, timeout)
        return self._classify_response(servable, signature, rows, outputs)

    async def classify_async(self, request, timeout=None):
        servable = self.manager.resolve(request.model_spec)
        signature, arrays, rows = self._classify_inputs(servable, request)
        outputs = await servable.run_async(signature, arrays, rows, timeout, self.executor)
        return self._classify_response(servable, signature, rows, outputs)

    def _classify_inputs(self, servable, request):
        signature = servable.signature(request.model_spec.signature_name)
        inputs = signature.inputs
        if len(inputs) != 1 or next(iter(inputs.values()))[0] != types_pb2.DT_STRING:
            raise _invalid(
                f"Signature '{signature.key}' does not follow the Classify contract (exactly one "
                f"DT_STRING input of serialized tf.Example, outputs 'classes' and/or 'scores'); "
                f"it takes {signature.describe_inputs()}. Set model_spec.signature_name to a "
                "classification signature (keras-jem exports name it 'classify'), or use Predict."
            )
        if "classes" not in signature.outputs and "scores" not in signature.outputs:
            raise _invalid(
                f"Signature '{signature.key}' has neither a 'classes' nor a 'scores' output; "
                "expected a classification signature (keras-jem exports name it 'classify')."
            )
        serialized = self._serialize_examples(request.input)
        Signature._check_rows(len(serialized), self.max_request_batch_size)
        input_key = next(iter(inputs))
        arrays = {input_key: np.array(serialized, dtype=object)}
        return signature, arrays, len(serialized)

    def _classify_response(self, servable, signature, num, outputs):
        classes, scores = outputs.get("classes"), outputs.get("scores")
        for key, value in (("classes", classes), ("scores", scores)):
            if value is not None and (value.ndim != 2 or value.shape[0] != num):
                raise ServingError(
                    grpc.StatusCode.INTERNAL,
                    f"Classification output '{key}' has shape {list(value.shape)}; expected "
                    f"[{num}, K] for {num} examples.",
                )
        if classes is not None and scores is not None and classes.shape != scores.shape:
            raise ServingError(
                grpc.StatusCode.INTERNAL,
                f"'classes' {list(classes.shape)} and 'scores' {list(scores.shape)} differ in "
                "shape.",
            )
        self.num_requests += 1
        response = classification_pb2.ClassificationResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature.key
        num_classes = (classes if classes is not None else scores).shape[1]
        for i in range(num):
            result = response.result.classifications.add()
            for j in range(num_classes):
                entry = result.classes.add()
                if classes is not None:
                    label = classes[i, j]
                    entry.label = label.decode("utf-8", "replace") if isinstance(
                        label, bytes
                    ) else str(label)
                if scores is not None:
                    entry.score = float(scores[i, j])
        return response

    @staticmethod
    def _serialize_examples(request_input):
        kind = request_input.WhichOneof("kind")
        if kind == "example_list":
            examples = list(request_input.example_list.examples)
            context = None
        elif kind == "example_list_with_context":
            examples = list(request_input.example_list_with_context.examples)
            context = request_input.example_list_with_context.context
        else:
            raise _invalid(
                "ClassificationRequest.input is empty: set input.example_list.examples to one "
                "tf.Example per image."
            )
        if not examples:
            raise _invalid("The request holds an empty batch (0 examples); send at least one.")
        serialized = []
        for example in examples:
            if context is not None:
                merged = tf.train.Example()
                merged.CopyFrom(context)
                for key, feature in example.features.feature.items():
                    merged.features.feature[key].CopyFrom(feature)
                example = merged
            serialized.append(example.SerializeToString())
        return serialized

    def get_model_metadata(self, request):
        servable = self.manager.resolve(request.model_spec)
        if not request.metadata_field:
            raise _invalid(
                "GetModelMetadataRequest must specify at least one metadata_field; the "
                "supported one is 'signature_def'."
            )
        for field in request.metadata_field:
            if field != "signature_def":
                raise _invalid(
                    f"Metadata field {field} is not supported; the supported one is "
                    "'signature_def'."
                )
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def get_model_status(self, request):
        spec = request.model_spec
        if not spec.name:
            raise _invalid("model_spec.name is empty; set it to the name of a served model.")
        choice = spec.WhichOneof("version_choice")
        version = None
        if choice == "version":
            version = spec.version.value
        elif choice == "version_label":
            labels = self.manager.labels(spec.name)
            if spec.version_label not in labels:
                raise _invalid(f"Unrecognized servable version label: {spec.version_label}")
            version = labels[spec.version_label]
        response = get_model_status_pb2.GetModelStatusResponse()
        for v, state, code, message in self.manager.version_states(spec.name, version):
            status = response.model_version_status.add()
            status.version = v
            status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
            status.status.error_code = code
            status.status.error_message = message
        return response

    def warmup(self, servable):
        """Replay `assets.extra/tf_serving_warmup_requests` of a freshly loaded version."""
        path = os.path.join(servable.path, WARMUP_PATH)
        if not os.path.isfile(path):
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            kind = log.WhichOneof("log_type")
            if kind == "predict_log":
                self.predict_on(servable, log.predict_log.request)
            elif kind == "classify_log":
                self.classify_on(servable, log.classify_log.request)
            else:
                logger.warning("Ignoring a %s warmup record (not supported).", kind)
                continue
            count += 1
        logger.info("Model %s version %d: replayed %d warmup requests.", servable.name,
                    servable.version, count)
        return count


def _timeout(context, cap=3600.0):
    """Seconds left before the client's deadline (gRPC reports a huge number when none)."""
    remaining = context.time_remaining()
    return cap if remaining is None else max(0.0, min(remaining, cap))


def _grpc_call(method):
    """Wraps an async servicer method: a ServingError becomes the call's gRPC status."""

    async def handler(self, request, context):
        try:
            return await method(self, request, context)
        except ServingError as e:
            await context.abort(e.code, e.message)
        except Exception as e:  # a cancelled call (client gone) is not an Exception
            logger.exception("Unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    handler.__name__ = method.__name__
    return handler


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`tensorflow.serving.PredictionService` over a `ServingCore` (asyncio handlers)."""

    def __init__(self, core):
        self.core = core

    @_grpc_call
    async def Predict(self, request, context):
        return await self.core.predict_async(request, _timeout(context))

    @_grpc_call
    async def Classify(self, request, context):
        return await self.core.classify_async(request, _timeout(context))

    @_grpc_call
    async def GetModelMetadata(self, request, context):
        return self.core.get_model_metadata(request)

    @_grpc_call
    async def Regress(self, request, context):
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED,
            "Regress is not implemented: keras-jem models are classifiers. Use Classify or "
            "Predict.",
        )

    @_grpc_call
    async def MultiInference(self, request, context):
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED,
            "MultiInference is not implemented by this server; send Classify or Predict "
            "requests.",
        )


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """`tensorflow.serving.ModelService` (GetModelStatus) over a `ServingCore`."""

    def __init__(self, core):
        self.core = core

    @_grpc_call
    async def GetModelStatus(self, request, context):
        return self.core.get_model_status(request)

    @_grpc_call
    async def HandleReloadConfigRequest(self, request, context):
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED,
            "HandleReloadConfigRequest is not implemented; the server polls the model "
            "directories instead (--poll_seconds).",
        )


class _EventLoopThread:
    """An asyncio event loop running forever on a daemon thread."""

    def __init__(self, name="grpc-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coroutine, timeout=None):
        """Runs a coroutine on the loop from another thread and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, timeout=10.0):
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


# ------------------------------------------------------------------------------------------------
# REST (TF Serving's JSON API)


def _json_value(value):
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    return value


def _to_json(array):
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SU":
        flat = [_json_value(v) for v in array.reshape(-1)]
        return np.array(flat, dtype=object).reshape(array.shape).tolist() if array.ndim else flat[0]
    return array.tolist()


def _from_json(value, dtype_enum, name):
    """JSON value (nested lists, {"b64": ...}) -> numpy array of the signature's dtype."""
    dtype = tf.dtypes.as_dtype(dtype_enum)
    if dtype == tf.string:

        def convert(v):
            if isinstance(v, list):
                return [convert(x) for x in v]
            if isinstance(v, dict) and set(v) == {"b64"}:
                return base64.b64decode(v["b64"])
            if isinstance(v, str):
                return v.encode("utf-8")
            raise _invalid(f"Input '{name}' expects strings or {{\"b64\": ...}}; received {v!r}.")

        return np.array(convert(value), dtype=object)
    try:
        array = np.array(value, dtype=dtype.as_numpy_dtype)
    except (TypeError, ValueError) as e:
        raise _invalid(
            f"Input '{name}' could not be read as a {dtype.name} tensor (ragged or non-numeric "
            f"JSON?): {e}"
        ) from None
    return array


def _feature_from_json(value, key):
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, dict) and set(v) == {"b64"} for v in values):
        data = [base64.b64decode(v["b64"]) for v in values]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=data))
    if all(isinstance(v, str) for v in values):
        data = [v.encode("utf-8") for v in values]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=data))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))
    raise _invalid(
        f"Feature '{key}' must be a number, a string, {{\"b64\": ...}} or a flat list of one of "
        f"these; received {str(value)[:100]}."
    )


def _example_from_json(obj, index):
    if not isinstance(obj, dict):
        raise _invalid(f"examples[{index}] must be a JSON object of features; received {obj!r}.")
    example = tf.train.Example()
    for key, value in obj.items():
        example.features.feature[key].CopyFrom(_feature_from_json(value, key))
    return example


class RestApi:
    """TF Serving's REST API (`/v1/models/...`) over a `ServingCore`."""

    _PATH = re.compile(
        r"^/v1/models/(?P<name>[^/:]+)"
        r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
        r"(?:(?P<metadata>/metadata)|:(?P<verb>predict|classify|regress))?/?$"
    )

    def __init__(self, core):
        self.core = core

    def handle(self, method, path, body):
        """Returns (HTTP status, JSON-serializable body)."""
        try:
            return 200, self._dispatch(method, urllib.parse.unquote(path.split("?")[0]), body)
        except ServingError as e:
            return _HTTP_STATUS.get(e.code, 500), {"error": e.message}
        except Exception as e:
            logger.exception("Unexpected error in REST %s %s", method, path)
            return 500, {"error": f"{type(e).__name__}: {e}"}

    def _model_spec(self, spec, match):
        spec.name = match["name"]
        if match["version"] is not None:
            spec.version.value = int(match["version"])
        elif match["label"] is not None:
            spec.version_label = match["label"]

    def _dispatch(self, method, path, body):
        match = self._PATH.match(path)
        if match is None:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Malformed request: {method} {path}. Expected GET /v1/models/<name>"
                "[/versions/<v>|/labels/<l>][/metadata] or POST .../<name>[...]:predict|:classify.",
            )
        verb = match["verb"]
        if method == "GET" and verb is None:
            if match["metadata"]:
                return self._metadata(match)
            return self._status(match)
        if method == "POST" and verb is not None:
            try:
                payload = json.loads(body or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _invalid(f"The request body is not valid JSON: {e}") from None
            if not isinstance(payload, dict):
                raise _invalid("The request body must be a JSON object.")
            if verb == "predict":
                return self._predict(match, payload)
            if verb == "classify":
                return self._classify(match, payload)
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED, "Regress is not implemented.")
        raise ServingError(
            grpc.StatusCode.NOT_FOUND,
            f"Unsupported method {method} for {path}: GET status/metadata, POST :predict or "
            ":classify.",
        )

    def _status(self, match):
        request = get_model_status_pb2.GetModelStatusRequest()
        self._model_spec(request.model_spec, match)
        response = self.core.get_model_status(request)
        return _message_to_dict(response)

    def _metadata(self, match):
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._model_spec(request.model_spec, match)
        response = self.core.get_model_metadata(request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {
            "model_spec": {
                "name": response.model_spec.name,
                "signature_name": "",
                "version": str(response.model_spec.version.value),
            },
            "metadata": {
                "signature_def": json_format.MessageToDict(
                    signature_map, preserving_proto_field_name=True
                )
            },
        }

    def _predict(self, match, payload):
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, match)
        request.model_spec.signature_name = payload.get("signature_name", "") or ""
        servable = self.core.manager.resolve(request.model_spec)
        signature = servable.signature(request.model_spec.signature_name)
        if ("instances" in payload) == ("inputs" in payload):
            raise _invalid(
                'The request must hold exactly one of "instances" (row format) or "inputs" '
                "(columnar format)."
            )
        row_format = "instances" in payload
        data = payload["instances"] if row_format else payload["inputs"]
        keys = sorted(signature.inputs)
        if row_format:
            if not isinstance(data, list):
                raise _invalid('"instances" must be a list with one entry per row.')
            if len(keys) == 1 and not (data and isinstance(data[0], dict)):
                columns = {keys[0]: data}
            else:
                if not all(isinstance(row, dict) for row in data):
                    raise _invalid(
                        f'Each entry of "instances" must be an object with keys {keys}.'
                    )
                columns = {k: [row.get(k) for row in data] for k in {k for r in data for k in r}}
        else:
            if isinstance(data, dict):
                columns = data
            elif len(keys) == 1:
                columns = {keys[0]: data}
            else:
                raise _invalid(f'"inputs" must be an object with keys {keys}.')
        for key, value in columns.items():
            if key not in signature.inputs:
                raise _invalid(
                    f"Unknown input '{key}' for signature '{signature.key}'; expected "
                    f"{signature.describe_inputs()}."
                )
            array = _from_json(value, signature.inputs[key][0], key)
            request.inputs[key].CopyFrom(tf.make_tensor_proto(array))
        response = self.core.predict_on(servable, request)
        outputs = {k: tensor_proto_to_numpy(v) for k, v in response.outputs.items()}
        if not row_format:
            if len(outputs) == 1:
                return {"outputs": _to_json(next(iter(outputs.values())))}
            return {"outputs": {k: _to_json(v) for k, v in outputs.items()}}
        if len(outputs) == 1:
            return {"predictions": _to_json(next(iter(outputs.values())))}
        rows = len(next(iter(outputs.values())))
        return {
            "predictions": [{k: _to_json(v[i]) for k, v in outputs.items()} for i in range(rows)]
        }

    def _classify(self, match, payload):
        request = classification_pb2.ClassificationRequest()
        self._model_spec(request.model_spec, match)
        request.model_spec.signature_name = payload.get("signature_name", "") or ""
        examples = payload.get("examples")
        if not isinstance(examples, list):
            raise _invalid('The request must hold "examples": a list of feature objects.')
        if "context" in payload:
            target = request.input.example_list_with_context
            target.context.CopyFrom(_example_from_json(payload["context"], "context"))
        else:
            target = request.input.example_list
        for i, obj in enumerate(examples):
            target.examples.append(_example_from_json(obj, i))
        response = self.core.classify(request)
        return {
            "results": [
                [[c.label, c.score] for c in result.classes]
                for result in response.result.classifications
            ]
        }


def _message_to_dict(message):
    try:
        return json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except TypeError:  # protobuf < 5.26
        return json_format.MessageToDict(
            message, preserving_proto_field_name=True, including_default_value_fields=True
        )


def _make_http_handler(api, max_body_bytes):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status, body):
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply(*api.handle("GET", self.path, None))

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > max_body_bytes:
                self.close_connection = True
                self._reply(
                    413,
                    {"error": f"Request body must be 0..{max_body_bytes} bytes; "
                     f"Content-Length is {self.headers.get('Content-Length')}."},
                )
                return
            body = self.rfile.read(length)
            self._reply(*api.handle("POST", self.path, body))

        def log_message(self, fmt, *args):
            logger.debug("REST %s - %s", self.address_string(), fmt % args)

    return Handler


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client that disconnects mid-request is routine, not a server error.
        logger.debug("REST connection from %s ended: %s", client_address, sys.exc_info()[1])


# ------------------------------------------------------------------------------------------------


def read_model_config_file(path):
    """Parse a TF Serving `--model_config_file` (text `ModelServerConfig`) into ModelConfigs.

    Relative base paths are resolved against the config file's directory.
    """
    with open(path) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError(f"{path} must hold a model_config_list.")
    configs = []
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise ValueError(f"{path}: every config needs a name and a base_path; got {model}")
        copy = model_server_config_pb2.ModelConfig()
        copy.CopyFrom(model)
        model = copy
        if not os.path.isabs(model.base_path):
            model.base_path = os.path.join(os.path.dirname(os.path.abspath(path)), model.base_path)
        configs.append(model)
    return configs


def read_batching_parameters_file(path):
    """Read `max_batch_size`, `batch_timeout_micros`, `max_enqueued_batches` and
    `num_batch_threads` from a TF Serving `--batching_parameters_file` (text proto)."""
    with open(path) as f:
        text = "\n".join(line.split("#", 1)[0] for line in f)
    values = {
        key: int(value)
        for key, value in re.findall(r"(\w+)\s*\{\s*value\s*:\s*(\d+)\s*\}", text)
    }
    return values


class ModelServer:
    """The embedded model server: gRPC services, optional REST endpoint and a version poller.

    Args:
        model_base_path: directory whose subdirectories are models (or, with `model_name`, the
            directory of that single model's versions, as in TF Serving).
        model_name: serve `model_base_path` itself as one model of this name.
        model_config_file: a TF Serving model config file (overrides the two above).
        port: gRPC port (0 picks a free one; see `.port` after `start()`).
        rest_port: REST port, or None for no REST endpoint (0 picks a free one).
        host: interface to bind (e.g. "127.0.0.1" for loopback only).
        enable_batching: batch concurrent requests per model version and signature.
        max_batch_size, batch_timeout_ms, num_batch_threads, max_enqueued_batches: batching
            (`num_batch_threads=0` runs each batch on the gRPC event loop's thread; see
            `Batcher`).
        max_request_batch_size: the most rows one request may hold (0 = unlimited).
        poll_seconds: seconds between scans for new versions (0 = load once, never poll).
        enable_model_warmup: replay each version's warmup requests before serving it.
        max_workers: threads that run unbatched requests (gRPC requests are received and
            answered by one asyncio event loop).
        max_message_mb: the largest gRPC message or REST body accepted.

    Example:

    ```python
    with ModelServer("models", port=0, host="127.0.0.1") as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        ...
    ```
    """

    def __init__(
        self,
        model_base_path=None,
        model_name=None,
        model_config_file=None,
        port=8500,
        rest_port=None,
        host="0.0.0.0",
        enable_batching=False,
        max_batch_size=32,
        batch_timeout_ms=2.0,
        num_batch_threads=1,
        max_enqueued_batches=100,
        max_request_batch_size=1024,
        poll_seconds=2.0,
        enable_model_warmup=True,
        max_workers=64,
        max_message_mb=64,
    ):
        if model_config_file:
            configs, base = read_model_config_file(model_config_file), None
        elif model_base_path is None:
            raise ValueError("Pass model_base_path (a directory of models) or model_config_file.")
        elif model_name:
            configs = [
                model_server_config_pb2.ModelConfig(
                    name=model_name, base_path=os.path.abspath(model_base_path),
                    model_platform="tensorflow",
                )
            ]
            base = None
        else:
            configs, base = None, os.path.abspath(model_base_path)
            if not os.path.isdir(base):
                raise ValueError(
                    f"--model_base_path {model_base_path} is not a directory. Expected "
                    "<model_base_path>/<model name>/<integer version>/saved_model.pb, as written "
                    "by `python -m trainers.export --export_dir <model_base_path>/<model name>`."
                )
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; received {max_batch_size}.")
        if num_batch_threads < 0:
            raise ValueError(
                f"num_batch_threads must be >= 0 (0 = run batches on the event loop's thread); "
                f"received {num_batch_threads}."
            )
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1; received {max_workers}.")
        batching = None
        if enable_batching:
            batching = {
                "max_batch_size": int(max_batch_size),
                "batch_timeout_ms": float(batch_timeout_ms),
                "num_batch_threads": int(num_batch_threads),
                "max_enqueued_batches": int(max_enqueued_batches),
            }
        self.manager = ModelManager(configs, base, batching)
        self.core = ServingCore(self.manager, max_request_batch_size)
        if enable_model_warmup:
            self.manager.warmup = self.core.warmup
        self.host = host
        self.port = port
        self.rest_port = rest_port
        self.poll_seconds = poll_seconds
        self.max_workers = max_workers
        self.max_message_bytes = int(max_message_mb * 1024 * 1024)
        self._loop = None
        self._grpc_server = None
        self._http_server = None
        self._threads = []
        self._stop = threading.Event()

    def start(self):
        """Load the models, then start serving; returns self."""
        self._loop = _EventLoopThread()
        self.manager.loop = self._loop.loop
        self.core.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_workers, thread_name_prefix="predict"
        )
        try:
            self.manager.poll()
            if not any(self.manager.served_summary().values()):
                logger.warning("No model version could be loaded yet; waiting for one to appear.")
            self.port = self._loop.call(self._start_grpc(), timeout=60)
        except BaseException:
            self._shutdown_runtime()
            raise
        logger.info("gRPC server listening on %s:%d", self.host, self.port)
        if self.rest_port is not None:
            api = RestApi(self.core)
            self._http_server = _HTTPServer(
                (self.host, self.rest_port), _make_http_handler(api, self.max_message_bytes)
            )
            self.rest_port = self._http_server.server_address[1]
            thread = threading.Thread(
                target=self._http_server.serve_forever, name="rest", daemon=True
            )
            thread.start()
            self._threads.append(thread)
            logger.info("REST server listening on %s:%d", self.host, self.rest_port)
        if self.poll_seconds and self.poll_seconds > 0:
            thread = threading.Thread(target=self._poll_loop, name="poller", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    async def _start_grpc(self):
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.core), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.core), server)
        address = f"{self.host}:{self.port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise OSError(f"Could not bind the gRPC port {address}.")
        await server.start()
        self._grpc_server = server
        return bound

    def _poll_loop(self):
        while not self._stop.wait(self.poll_seconds):
            self.manager.poll()

    def stop(self, grace=5.0):
        """Stop accepting requests, let in-flight ones finish (up to `grace` s), then unload."""
        self._stop.set()
        if self._grpc_server is not None:
            try:
                self._loop.call(self._grpc_server.stop(grace), timeout=grace + 5)
            except Exception as e:
                logger.warning("The gRPC server did not stop cleanly: %r", e)
            self._grpc_server = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        for thread in self._threads:
            thread.join(timeout=grace + 5)
        self._threads = []
        self._shutdown_runtime()
        logger.info("Server stopped.")

    def _shutdown_runtime(self):
        self.manager.stop()  # drains the batchers, on the still-running loop
        if self.core.executor is not None:
            self.core.executor.shutdown(wait=False)
            self.core.executor = None
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    def stats(self):
        """Counters: requests answered, and per batcher the batches and rows it ran."""
        batchers = {}
        with self.manager._lock:
            for name, state in self.manager._models.items():
                for version, servable in state.served.items():
                    for key, batcher in servable.batchers.items():
                        batchers[f"{name}/{version}/{key}"] = {
                            "batches": batcher.num_batches,
                            "rows": batcher.num_rows,
                        }
        return {"requests": self.core.num_requests, "batchers": batchers}

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="Serve keras-jem SavedModels over TF Serving's gRPC (and REST) API.",
    )
    parser.add_argument(
        "--model_base_path",
        help="directory of models: <model_base_path>/<name>/<version>/ (with --model_name: the "
        "directory of that one model's versions)",
    )
    parser.add_argument("--model_name", help="serve --model_base_path as this single model")
    parser.add_argument(
        "--model_config_file",
        help="TF Serving model config (text ModelServerConfig: names, base paths, version "
        "policies and labels); replaces --model_base_path",
    )
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500)")
    parser.add_argument("--rest_port", "--rest_api_port", type=int, default=None,
                        help="REST port (TF Serving uses 8501); off by default")
    parser.add_argument("--host", default="0.0.0.0", help="interface to bind (default 0.0.0.0)")
    parser.add_argument(
        "--enable_batching", action="store_true",
        help="batch concurrent requests (implied by any batching option below)",
    )
    parser.add_argument("--max_batch_size", type=int, default=None,
                        help="rows per batch (default 32)")
    parser.add_argument("--batch_timeout_ms", type=float, default=None,
                        help="wait for more requests at most this long (default 2)")
    parser.add_argument("--num_batch_threads", type=int, default=None,
                        help="batches run in parallel per signature, each on its own thread "
                        "(default 1); 0 runs batches on the event loop's thread, the least "
                        "overhead for small, fast models")
    parser.add_argument("--max_enqueued_batches", type=int, default=None,
                        help="queued batches beyond which requests get UNAVAILABLE (default 100)")
    parser.add_argument("--batching_parameters_file",
                        help="TF Serving batching parameters file (text proto)")
    parser.add_argument("--max_request_batch_size", type=int, default=1024,
                        help="most rows in one request; more gets RESOURCE_EXHAUSTED "
                        "(0 = unlimited; default 1024)")
    parser.add_argument("--poll_seconds", "--file_system_poll_wait_seconds", type=float,
                        default=2.0, help="seconds between scans for new versions (0 = never)")
    parser.add_argument("--no_warmup", action="store_true",
                        help="do not replay assets.extra/tf_serving_warmup_requests at load")
    parser.add_argument("--max_workers", type=int, default=64,
                        help="threads that run unbatched requests (default 64)")
    parser.add_argument("--max_message_mb", type=float, default=64,
                        help="largest request accepted, in MB (default 64)")
    parser.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0,
                        help="threads per TensorFlow op (0 = TensorFlow's default)")
    parser.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0,
                        help="TensorFlow ops run in parallel (0 = TensorFlow's default)")
    parser.add_argument("--log_level", default="INFO", help="logging level (default INFO)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.model_base_path and not args.model_config_file:
        build_parser().error("pass --model_base_path DIR or --model_config_file FILE")
    # Must happen before TensorFlow runs anything (i.e. before the models load).
    if args.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)
    batching = {}
    if args.batching_parameters_file:
        values = read_batching_parameters_file(args.batching_parameters_file)
        batching = {
            "max_batch_size": values.get("max_batch_size", 32),
            "batch_timeout_ms": values.get("batch_timeout_micros", 2000) / 1000.0,
            "num_batch_threads": values.get("num_batch_threads", 1),
            "max_enqueued_batches": values.get("max_enqueued_batches", 100),
        }
    for key in ("max_batch_size", "batch_timeout_ms", "num_batch_threads", "max_enqueued_batches"):
        if getattr(args, key) is not None:
            batching[key] = getattr(args, key)
    enable_batching = args.enable_batching or bool(batching)
    defaults = {"max_batch_size": 32, "batch_timeout_ms": 2.0, "num_batch_threads": 1,
                "max_enqueued_batches": 100}
    batching = {**defaults, **batching}
    try:
        server = ModelServer(
            model_base_path=args.model_base_path,
            model_name=args.model_name,
            model_config_file=args.model_config_file,
            port=args.port,
            rest_port=args.rest_port,
            host=args.host,
            enable_batching=enable_batching,
            max_request_batch_size=args.max_request_batch_size,
            poll_seconds=args.poll_seconds,
            enable_model_warmup=not args.no_warmup,
            max_workers=args.max_workers,
            max_message_mb=args.max_message_mb,
            **batching,
        )
    except (ValueError, OSError, text_format.ParseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if enable_batching:
        logger.info("Batching on: %s", batching)
    stop = threading.Event()

    def on_signal(signum, frame):
        logger.info("Received %s; shutting down.", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    while not stop.wait(1.0):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
