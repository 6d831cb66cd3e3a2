"""TensorProto <-> numpy, with every size checked before anything is allocated.

`tf.make_ndarray` fills the shape a TensorProto declares before looking at its values: a 20-byte
message declaring `[2**32]` floats with one `float_val` asks for 16 GB. `declared_shape` and
`tensor_proto_to_numpy` read the declaration first, refuse what exceeds the limits, and only then
build the array (TensorFlow's legal short forms, fewer typed values than elements repeating the
last one, included, within the same limits). The conversion is written here rather than taken
from `tf.make_ndarray` because that function offers no way to check before it allocates.

Outputs are written as typed fields (`float_val`, `int64_val`, ...), as TF Serving answers by
default, or as raw `tensor_content` bytes when asked (smaller and faster for large outputs).
"""

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from serving.errors import exhausted
from serving.errors import invalid

MAX_RANK = 32
DEFAULT_MAX_TENSOR_BYTES = 64 * 1024 * 1024

NUMPY_DTYPES = {
    types_pb2.DT_FLOAT: np.dtype(np.float32),
    types_pb2.DT_DOUBLE: np.dtype(np.float64),
    types_pb2.DT_HALF: np.dtype(np.float16),
    types_pb2.DT_INT8: np.dtype(np.int8),
    types_pb2.DT_INT16: np.dtype(np.int16),
    types_pb2.DT_INT32: np.dtype(np.int32),
    types_pb2.DT_INT64: np.dtype(np.int64),
    types_pb2.DT_UINT8: np.dtype(np.uint8),
    types_pb2.DT_UINT16: np.dtype(np.uint16),
    types_pb2.DT_UINT32: np.dtype(np.uint32),
    types_pb2.DT_UINT64: np.dtype(np.uint64),
    types_pb2.DT_BOOL: np.dtype(np.bool_),
    types_pb2.DT_STRING: np.dtype(object),
}
_ENUMS = {dtype: enum for enum, dtype in NUMPY_DTYPES.items() if enum != types_pb2.DT_STRING}
# TensorProto's typed field per dtype (tensor.proto: DT_HALF as int bit patterns in half_val,
# the small integers in int_val).
TYPED_FIELDS = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_HALF: "half_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_STRING: "string_val",
}
_POINTER_BYTES = 8  # a string element costs at least one object pointer


def dtype_name(enum_value):
    try:
        return types_pb2.DataType.Name(enum_value)
    except ValueError:
        return f"<unknown dtype {enum_value}>"


def shape_str(shape):
    return "[" + ", ".join(str(d) for d in shape) + "]"


def declared_shape(proto, name):
    """The shape a TensorProto declares, checked to be a concrete shape of sane rank."""
    if proto.tensor_shape.unknown_rank:
        raise invalid(f"Input '{name}' declares an unknown rank; send a concrete shape.")
    shape = [d.size for d in proto.tensor_shape.dim]
    if len(shape) > MAX_RANK:
        raise invalid(f"Input '{name}' declares rank {len(shape)}; at most {MAX_RANK} is accepted.")
    if any(d < 0 for d in shape):
        raise invalid(
            f"Input '{name}' declares shape {shape_str(shape)}; every dimension of a request "
            "tensor must be >= 0."
        )
    return shape


def num_elements(shape):
    count = 1
    for d in shape:
        count *= int(d)  # Python ints: no overflow on hostile shapes
    return count


def tensor_proto_to_numpy(proto, name="tensor", max_bytes=DEFAULT_MAX_TENSOR_BYTES):
    """Convert a TensorProto to numpy after checking its declared size against `max_bytes`.

    Args:
        proto: a `tensorflow.TensorProto`.
        name: the input's name, for error messages.
        max_bytes: the largest array (`num_elements * itemsize`) this may allocate.

    Returns:
        A numpy array (`object` dtype of bytes for DT_STRING).

    Raises:
        ServingError: INVALID_ARGUMENT for malformed protos, RESOURCE_EXHAUSTED for ones whose
            declared size exceeds `max_bytes`.

    Example:

    ```python
    array = tensor_proto_to_numpy(request.inputs["images"], "images", max_bytes=2**26)
    ```
    """
    dtype = NUMPY_DTYPES.get(proto.dtype)
    if dtype is None:
        raise invalid(
            f"Input '{name}' has dtype {dtype_name(proto.dtype)}, which this server does not "
            f"decode; use one of {sorted(dtype_name(e) for e in NUMPY_DTYPES)}."
        )
    shape = declared_shape(proto, name)
    count = num_elements(shape)
    itemsize = _POINTER_BYTES if dtype.kind == "O" else dtype.itemsize
    if count * itemsize > max_bytes:
        raise exhausted(
            f"Input '{name}' declares shape {shape_str(shape)} of {dtype_name(proto.dtype)}: "
            f"{count * itemsize} bytes, more than the {max_bytes} this server accepts per tensor. "
            "Send smaller requests."
        )
    if proto.tensor_content:
        if dtype.kind == "O":
            raise invalid(f"Input '{name}' is DT_STRING; send its values in string_val.")
        if len(proto.tensor_content) != count * itemsize:
            raise invalid(
                f"Input '{name}' is not a valid TensorProto: tensor_content holds "
                f"{len(proto.tensor_content)} bytes; shape {shape_str(shape)} of "
                f"{dtype_name(proto.dtype)} needs {count * itemsize}."
            )
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)
    values = getattr(proto, TYPED_FIELDS[proto.dtype])
    if len(values) > count:
        raise invalid(
            f"Input '{name}' is not a valid TensorProto: it holds {len(values)} values for shape "
            f"{shape_str(shape)} ({count} elements)."
        )
    if dtype.kind == "O":
        flat = np.empty(len(values), dtype=object)
        flat[:] = list(values)
    elif proto.dtype == types_pb2.DT_HALF:
        flat = np.array(values, dtype=np.uint16).view(np.float16)
    elif dtype.kind in "iu" and dtype.itemsize < 4 and len(values):
        wide = np.array(values, dtype=np.int64)  # int_val is int32: check the narrow types
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise invalid(
                f"Input '{name}' holds values out of range for {dtype_name(proto.dtype)} "
                f"([{info.min}, {info.max}])."
            )
        flat = wide.astype(dtype)
    else:
        flat = np.array(values, dtype=dtype)
    if len(flat) < count:  # TensorFlow's short forms: no values = zeros, else repeat the last
        fill = flat[-1] if len(flat) else (b"" if dtype.kind == "O" else 0)
        full = np.empty(count, dtype=dtype)
        full[: len(flat)] = flat
        full[len(flat):] = fill
        flat = full
    return flat.reshape(shape)


def numpy_to_tensor_proto(array, proto, tensor_content=False):
    """Fill the TensorProto `proto` from a numpy array.

    Args:
        array: the numpy array.
        proto: the (empty) TensorProto to fill.
        tensor_content: write numbers as raw `tensor_content` bytes instead of typed fields
            (`float_val`, `int64_val`, ...; TF Serving's default answer).

    Returns:
        `proto`.
    """
    array = np.asarray(array)
    if array.dtype.kind in "OSU":
        proto.dtype = types_pb2.DT_STRING
        values = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.ravel()]
        proto.string_val.extend(values)
    else:
        enum = _ENUMS.get(array.dtype)
        if enum is None:
            proto.CopyFrom(tf.make_tensor_proto(array))
            return proto
        proto.dtype = enum
        if tensor_content:
            proto.tensor_content = np.ascontiguousarray(array).tobytes()
        elif enum == types_pb2.DT_HALF:
            proto.half_val.extend(array.ravel().view(np.uint16).tolist())
        else:
            getattr(proto, TYPED_FIELDS[enum]).extend(array.ravel().tolist())
    for size in array.shape:
        proto.tensor_shape.dim.add().size = size
    return proto
