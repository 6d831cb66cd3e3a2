"""One SignatureDef of a loaded SavedModel: request validation and execution."""

import logging
import re

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from serving.errors import GRPC_CODES
from serving.errors import ServingError
from serving.errors import exhausted
from serving.errors import internal
from serving.errors import invalid
from serving.tensors import DEFAULT_MAX_TENSOR_BYTES
from serving.tensors import declared_shape
from serving.tensors import dtype_name
from serving.tensors import shape_str
from serving.tensors import tensor_proto_to_numpy

logger = logging.getLogger("serving.signatures")

DEFAULT_SIGNATURE = "serving_default"
# TensorFlow errors whose text describes the client's input; any other code is the server's
# business (its text stays in the server log).
_CLIENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def tf_error_message(error):
    """The useful part of a TensorFlow runtime error message (no graph/stack boilerplate)."""
    lines = []
    for line in str(getattr(error, "message", error)).splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(
            ("Graph execution error", "Detected at node", "<stack traces", "[[")
        ):
            continue
        lines.append(re.sub(r"\s*\[\[.*$|\s*\[Op:.*$", "", stripped))
    return " ".join(line for line in lines if line) or str(error)


def check_rows(rows, max_rows):
    """Refuse an empty batch, or one above `max_rows` (0 = no limit)."""
    if rows == 0:
        raise invalid("The request holds an empty batch (0 rows); send at least one row.")
    if max_rows and rows > max_rows:
        raise exhausted(
            f"The request holds {rows} rows; this server accepts at most {max_rows} per "
            "request (--max_request_batch_size). Split it into smaller requests."
        )


class Signature:
    """One SignatureDef of a loaded SavedModel, with input validation and execution.

    Args:
        key: the signature's key (e.g. "serving_default").
        signature_def: its `SignatureDef` proto.
        function: the concrete function `tf.saved_model.load(...).signatures[key]`.

    Example:

    ```python
    signature = Signature("serving_default", signature_def, loaded.signatures["serving_default"])
    arrays, rows = signature.decode_inputs(request.inputs, max_rows=1024)
    outputs = signature.run(arrays)
    ```
    """

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
            f"'{k}': {dtype_name(dtype)} "
            f"{shape_str(shape) if shape is not None else '(any shape)'}"
            for k, (dtype, shape) in sorted(self.inputs.items())
        )

    def decode_inputs(self, tensor_protos, max_rows, max_bytes=DEFAULT_MAX_TENSOR_BYTES):
        """Validate request TensorProtos against the signature; returns (numpy dict, rows).

        Dtype, rank, fixed dimensions, row count and size are checked on the declaration,
        before any array is built.
        """
        expected, received = set(self.inputs), set(tensor_protos)
        if expected != received:
            raise invalid(
                f"Request inputs do not match signature '{self.key}': sent "
                f"{sorted(received)[:16]}, expected exactly {sorted(expected)} "
                f"({self.describe_inputs()}). Sent extra: {sorted(received - expected)[:16]}. "
                f"Missing but required: {sorted(expected - received)}."
            )
        shapes, rows = {}, None
        for key, proto in tensor_protos.items():
            dtype, shape = self.inputs[key]
            if proto.dtype != dtype:
                raise invalid(
                    f"Input '{key}' of signature '{self.key}' has dtype "
                    f"{dtype_name(proto.dtype)}; expected {dtype_name(dtype)} "
                    f"with shape {shape_str(shape) if shape is not None else '(any)'}."
                    + (" Send float32 images in [-1, 1]." if dtype == types_pb2.DT_FLOAT else "")
                )
            received_shape = declared_shape(proto, key)
            self._check_shape(key, received_shape, shape)
            if received_shape:
                if rows is None:
                    rows = received_shape[0]
                elif received_shape[0] != rows:
                    raise invalid(
                        "Input tensors must have equal 0th-dimension (batch) size; received "
                        + ", ".join(f"'{k}': {s[0]}" for k, s in shapes.items())
                        + f", '{key}': {received_shape[0]}."
                    )
            shapes[key] = received_shape
        rows = rows or 0
        if self.batchable:
            check_rows(rows, max_rows)
        arrays = {}
        for key, proto in tensor_protos.items():
            array = tensor_proto_to_numpy(proto, key, max_bytes)
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise invalid(
                    f"Input '{key}' holds NaN or infinite values; expected finite values "
                    "(images in [-1, 1])."
                )
            arrays[key] = array
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
            raise invalid(
                f"Input '{key}' of signature '{self.key}' has shape {shape_str(received)}; "
                f"expected {shape_str(expected)} (-1 = any size).{hint}"
            )

    def run(self, arrays):
        """Run the signature on numpy inputs; returns a dict of numpy outputs."""
        try:
            outputs = self.function(**{k: tf.constant(v) for k, v in arrays.items()})
        except tf.errors.OpError as e:
            code = GRPC_CODES.get(e.error_code, grpc.StatusCode.INTERNAL)
            if code not in _CLIENT_CODES:
                raise internal(e, f"signature {self.key}") from None
            raise ServingError(code, tf_error_message(e)) from None
        except (TypeError, ValueError) as e:
            raise invalid(f"The inputs do not fit signature '{self.key}': {e}") from None
        return {k: v.numpy() for k, v in outputs.items()}
