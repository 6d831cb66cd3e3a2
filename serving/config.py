"""The configuration files TF Serving reads, parsed as the text protos they are.

- `--model_config_file`: `tensorflow.serving.ModelServerConfig` (from tensorflow-serving-api).
- `--batching_parameters_file`: `tensorflow.serving.BatchingParameters`.
- `--ssl_config_file`: `tensorflow.serving.SSLConfig`.

The pip package `tensorflow-serving-api` does not ship the last two messages, so they are declared
here with the same field names and numbers as TF Serving's `session_bundle_config.proto` and
`ssl_config.proto`; `text_format` then parses them exactly as the official server does (a typo is
an error naming the line, never a silently ignored setting).
"""

import os

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import text_format
from google.protobuf import wrappers_pb2  # noqa: F401 (registers the wrappers in the pool)
from tensorflow_serving.config import model_server_config_pb2

_F = descriptor_pb2.FieldDescriptorProto


def _messages():
    pool = descriptor_pool.Default()
    try:
        return (
            message_factory.GetMessageClass(
                pool.FindMessageTypeByName("keras_jem.serving.BatchingParameters")
            ),
            message_factory.GetMessageClass(
                pool.FindMessageTypeByName("keras_jem.serving.SSLConfig")
            ),
        )
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="keras_jem/serving/config.proto",
        package="keras_jem.serving",
        dependency=["google/protobuf/wrappers.proto"],
        syntax="proto3",
    )
    batching = file.message_type.add(name="BatchingParameters")
    for number, name, kind in (
        (1, "max_batch_size", "Int64Value"),
        (2, "batch_timeout_micros", "Int64Value"),
        (3, "max_enqueued_batches", "Int64Value"),
        (4, "num_batch_threads", "Int64Value"),
        (5, "thread_pool_name", "StringValue"),
        (7, "pad_variable_length_inputs", "BoolValue"),
        (8, "enable_large_batch_splitting", "BoolValue"),
        (9, "max_execution_batch_size", "Int64Value"),
    ):
        batching.field.add(name=name, number=number, type=_F.TYPE_MESSAGE,
                           label=_F.LABEL_OPTIONAL, type_name=f".google.protobuf.{kind}")
    batching.field.add(name="allowed_batch_sizes", number=6, type=_F.TYPE_INT64,
                       label=_F.LABEL_REPEATED)
    ssl = file.message_type.add(name="SSLConfig")
    for number, name in ((1, "server_key"), (2, "server_cert"), (3, "custom_ca")):
        ssl.field.add(name=name, number=number, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    ssl.field.add(name="client_verify", number=4, type=_F.TYPE_BOOL, label=_F.LABEL_OPTIONAL)
    pool.Add(file)
    return _messages()


BatchingParameters, SSLConfig = _messages()


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
        if not os.path.isabs(copy.base_path):
            copy.base_path = os.path.join(os.path.dirname(os.path.abspath(path)), copy.base_path)
        configs.append(copy)
    return configs


def read_batching_parameters_file(path):
    """Read a TF Serving `--batching_parameters_file` (text `BatchingParameters`).

    Returns:
        A dict of the fields that are set: `max_batch_size`, `batch_timeout_micros`,
        `max_enqueued_batches`, `num_batch_threads` (ints) and `allowed_batch_sizes` (a list).
        The other fields parse but have no effect here.
    """
    with open(path) as f:
        params = text_format.Parse(f.read(), BatchingParameters())
    values = {}
    for key in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                "num_batch_threads"):
        if params.HasField(key):
            values[key] = int(getattr(params, key).value)
    if params.allowed_batch_sizes:
        values["allowed_batch_sizes"] = [int(v) for v in params.allowed_batch_sizes]
    return values


def read_ssl_config_file(path):
    """Read a TF Serving `--ssl_config_file` (text `SSLConfig`: PEM strings inline).

    Returns:
        dict with `server_key`, `server_cert`, `custom_ca` (PEM text, "" when unset) and
        `client_verify` (bool).
    """
    with open(path) as f:
        config = text_format.Parse(f.read(), SSLConfig())
    if not config.server_key or not config.server_cert:
        raise ValueError(f"{path}: an SSLConfig needs server_key and server_cert (PEM text).")
    return {
        "server_key": config.server_key,
        "server_cert": config.server_cert,
        "custom_ca": config.custom_ca,
        "client_verify": config.client_verify,
    }
