"""The command line of `python -m serving.server`."""

import argparse
import logging
import signal
import sys
import threading

import tensorflow as tf
from google.protobuf import text_format

logger = logging.getLogger("serving.server")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="Serve keras-jem SavedModels over TF Serving's gRPC (and REST) API.",
    )
    add = parser.add_argument
    add("--model_base_path",
        help="directory of models: <model_base_path>/<name>/<version>/ (with --model_name: the "
        "directory of that one model's versions)")
    add("--model_name", help="serve --model_base_path as this single model")
    add("--model_config_file",
        help="TF Serving model config (text ModelServerConfig: names, base paths, version "
        "policies and labels); replaces --model_base_path")
    add("--port", type=int, default=8500, help="gRPC port (default 8500)")
    add("--rest_port", "--rest_api_port", type=int, default=None,
        help="REST port (TF Serving uses 8501); off by default")
    add("--host", default="127.0.0.1",
        help="interface to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes the "
        "server on every interface: use TLS then)")
    add("--enable_batching", action="store_true",
        help="batch concurrent requests (implied by any batching option below)")
    add("--max_batch_size", type=int, default=None, help="rows per batch (default 32)")
    add("--batch_timeout_ms", type=float, default=None,
        help="wait for more requests at most this long (default 2)")
    add("--num_batch_threads", type=int, default=None,
        help="batches run in parallel per signature, each on its own thread (default 1); 0 runs "
        "batches on the event loop's thread, the least overhead for small, fast models")
    add("--max_enqueued_batches", type=int, default=None,
        help="queued batches beyond which requests get UNAVAILABLE (default 100)")
    add("--allowed_batch_sizes", default=None,
        help="comma-separated batch sizes to pad batches to, the last = --max_batch_size")
    add("--batch_close_when_idle", action="store_true",
        help="run the open batch as soon as no batch is running instead of waiting "
        "--batch_timeout_ms (less latency at low load; needs --num_batch_threads >= 1)")
    add("--batching_parameters_file", help="TF Serving batching parameters file (text proto)")
    add("--max_request_batch_size", type=int, default=1024,
        help="most rows in one request; more gets RESOURCE_EXHAUSTED (0 = unlimited; "
        "default 1024)")
    add("--poll_seconds", "--file_system_poll_wait_seconds", type=float, default=2.0,
        help="seconds between scans for new versions (0 = never)")
    add("--max_num_load_retries", type=int, default=5,
        help="retries of a version that failed to load (default 5, as TF Serving)")
    add("--load_retry_interval_seconds", type=float, default=2.0,
        help="seconds before the first load retry, doubling at each next one (default 2)")
    add("--unload_after_missed_polls", type=int, default=3,
        help="polls that cannot list a base path before its versions unload (default 3)")
    add("--no_warmup", action="store_true",
        help="do not replay assets.extra/tf_serving_warmup_requests at load")
    add("--max_workers", type=int, default=64,
        help="threads that run unbatched requests (default 64)")
    add("--max_queued_requests", type=int, default=256,
        help="unbatched requests waiting for a thread; more get RESOURCE_EXHAUSTED (default 256)")
    add("--max_concurrent_rpcs", type=int, default=512,
        help="gRPC calls in progress; more get RESOURCE_EXHAUSTED (default 512)")
    add("--max_concurrent_streams", type=int, default=100,
        help="concurrent gRPC calls per client connection (default 100)")
    add("--rest_max_connections", type=int, default=64,
        help="open REST connections; more get 429 (default 64)")
    add("--rest_timeout_seconds", type=float, default=30.0,
        help="REST connections idle this long are closed (default 30)")
    add("--max_message_mb", type=float, default=64,
        help="largest request (and request tensor) accepted, in MB (default 64)")
    add("--tensor_content_outputs", action="store_true",
        help="answer Predict outputs as raw tensor_content bytes instead of TF Serving's typed "
        "fields (float_val, int64_val, ...)")
    add("--reuse_port", action="store_true",
        help="set SO_REUSEPORT so that several server processes can share --port and "
        "--rest_port (the kernel spreads connections over them)")
    add("--ssl_cert_file", help="PEM certificate (chain): serve gRPC and REST over TLS")
    add("--ssl_key_file", help="PEM private key of --ssl_cert_file")
    add("--ssl_client_ca_file", help="PEM CA bundle: require client certificates signed by it")
    add("--ssl_config_file",
        help="TF Serving SSL config (text SSLConfig with server_key, server_cert, custom_ca, "
        "client_verify)")
    add("--shutdown_grace_seconds", type=float, default=10.0,
        help="on SIGTERM, seconds in-flight requests get to finish (default 10)")
    add("--tensorflow_intra_op_parallelism", type=int, default=0,
        help="threads per TensorFlow op (0 = TensorFlow's default)")
    add("--tensorflow_inter_op_parallelism", type=int, default=0,
        help="TensorFlow ops run in parallel (0 = TensorFlow's default)")
    add("--log_level", default="INFO", help="logging level (default INFO)")
    return parser


def _batching(args, parser):
    from serving.config import read_batching_parameters_file

    batching = {}
    if args.batching_parameters_file:
        values = read_batching_parameters_file(args.batching_parameters_file)
        renames = {"max_batch_size": "max_batch_size", "num_batch_threads": "num_batch_threads",
                   "max_enqueued_batches": "max_enqueued_batches",
                   "allowed_batch_sizes": "allowed_batch_sizes"}
        batching = {renames[k]: v for k, v in values.items() if k in renames}
        if "batch_timeout_micros" in values:
            batching["batch_timeout_ms"] = values["batch_timeout_micros"] / 1000.0
    for key in ("max_batch_size", "batch_timeout_ms", "num_batch_threads", "max_enqueued_batches"):
        if getattr(args, key) is not None:
            batching[key] = getattr(args, key)
    if args.allowed_batch_sizes:
        try:
            batching["allowed_batch_sizes"] = [int(v) for v in args.allowed_batch_sizes.split(",")]
        except ValueError:
            parser.error(f"--allowed_batch_sizes takes integers like 8,16,32; received "
                         f"{args.allowed_batch_sizes!r}")
    enable = args.enable_batching or bool(batching)
    from serving.server import BATCHING_DEFAULTS

    # A policy flag, not a batching parameter: it does not turn batching on by itself.
    batching["batch_close_when_idle"] = args.batch_close_when_idle
    return enable, {**BATCHING_DEFAULTS, **batching}


def main(argv=None):
    from serving.server import ModelServer

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.model_base_path and not args.model_config_file:
        parser.error("pass --model_base_path DIR or --model_config_file FILE")
    # Must happen before TensorFlow runs anything (i.e. before the models load).
    if args.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)
    try:
        enable_batching, batching = _batching(args, parser)
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
            tensor_content_outputs=args.tensor_content_outputs,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            max_concurrent_streams=args.max_concurrent_streams,
            max_queued_requests=args.max_queued_requests,
            rest_max_connections=args.rest_max_connections,
            rest_timeout_seconds=args.rest_timeout_seconds,
            ssl_cert_file=args.ssl_cert_file,
            ssl_key_file=args.ssl_key_file,
            ssl_client_ca_file=args.ssl_client_ca_file,
            ssl_config_file=args.ssl_config_file,
            max_num_load_retries=args.max_num_load_retries,
            load_retry_interval_seconds=args.load_retry_interval_seconds,
            unload_after_missed_polls=args.unload_after_missed_polls,
            reuse_port=args.reuse_port,
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
    server.stop(grace=args.shutdown_grace_seconds)
    return 0
