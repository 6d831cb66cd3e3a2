"""Loopback load benchmark of the embedded model server (`serving.server`).

```
python tools/bench_serving.py                      # WRN-16-2 JEM on 32x32x3, random weights
python tools/bench_serving.py --model digits       # SmallCNN JEM on 8x8x1
python tools/bench_serving.py --export_dir models/jem --seconds 3 --json bench.json
```

Measures requests/s, images/s and p50/p99 latency of `Predict` on `serving_default` at each batch
size (1 and 32) with 1, 8 and 32 concurrent clients, for:

- `in-process`: the SavedModel's signature called directly in this process, one caller (the
  model's own compute time; one-client cells only);
- `server`: `python -m serving.server` on 127.0.0.1, without server-side batching;
- `server+batching`: the same with `--enable_batching --max_batch_size 32 --batch_timeout_ms 2`;
- `gRPC floor`: a server that answers every request with the same pre-serialized response
  without reading it (`tools/grpc_load.py floor`): what Python gRPC alone costs here, the
  ceiling of any Python server that does work per request.

The clients are `tools/grpc_load.py load`, a separate process: coroutines on one asyncio loop,
each with its own channel (connection), sending a pre-serialized request back to back, so that
the load generator takes as little as it can from the two cores it shares with the server.
Every response is checked once against the in-process outputs before the load starts, and calls
that fail are counted and reported. Every cell is bounded by `--seconds` and `--max_requests`
and measured in `--rounds` windows that alternate between the modes, so that load from other
processes hits every mode alike.

`img/CPU-s` divides the images answered by the CPU seconds the server process (in-process rows:
this process) used in the window; `client ms/req` is the load generator's CPU per request.

Checked against the targets of issues 5 and 15 (which the summary lines name):
- server overhead at batch 32, one client: p50 latency through the server vs in-process
  (issue 5: < 10%; issue 15: <= 5%);
- batching gain: images/s of 32 concurrent batch-1 clients with batching vs without (issue 5:
  >= 3x; issue 15: >= 85% of the in-process batch-32 / batch-1 images/s ratio), next to the
  gRPC floor's images/s over the unbatched server's (the most any Python server could gain
  over it on this machine) and a CPU bound: the images/s that two cores' worth of model,
  gRPC floor and load generator CPU allows.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2

from tools.grpc_load import MESSAGE_OPTIONS
from tools.grpc_load import PREDICT_METHOD

GRPC_LOAD = os.path.join(REPO, "tools", "grpc_load.py")


def build_model(kind):
    """A built JEM with random weights (`wrn`: WRN-16-2 on 32x32x3; `digits`: SmallCNN on
    8x8x1) and its image shape."""
    import keras

    import keras_jem

    if kind == "wrn":
        backbone, shape = keras_jem.backbones.WideResNet(depth=16, width=2), (32, 32, 3)
    else:
        backbone, shape = keras_jem.backbones.SmallCNN(), (8, 8, 1)
    keras.utils.set_random_seed(0)
    model = keras_jem.JEM(backbone=backbone, num_classes=10, buffer_size=100)
    model(np.zeros((1,) + shape, "float32"))
    return model, shape


def build_export(kind, base):
    """Exports `build_model(kind)` under `base/jem`."""
    from keras_jem import export

    model, _ = build_model(kind)
    return export.export_serving_model(model, os.path.join(base, "jem"), warmup=True)


def make_images(batch_size, image_shape):
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (batch_size,) + tuple(image_shape)).astype("float32")


class InProcess:
    """Calls the SavedModel's `serving_default` signature directly (one caller)."""

    def __init__(self, path):
        self.function = tf.saved_model.load(path).signatures["serving_default"]

    def outputs(self, images):
        return {k: v.numpy() for k, v in self.function(images=tf.constant(images)).items()}

    def run(self, batch_size, seconds, max_requests, image_shape):
        images = tf.constant(make_images(batch_size, image_shape))
        for _ in range(2):
            self.function(images=images)
        latencies = []
        cpu = time.process_time()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds and len(latencies) < max_requests:
            t = time.perf_counter()
            self.function(images=images)["probabilities"].numpy()
            latencies.append(time.perf_counter() - t)
        return {"latencies_ms": [1000.0 * t for t in latencies],
                "seconds": time.perf_counter() - start, "errors": [], "num_errors": 0,
                "server_cpu_s": time.process_time() - cpu, "client_cpu_s": None}


def process_cpu_seconds(pid):
    """User + system CPU seconds of a process (Linux /proc), or None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_load(server, request_file, clients, seconds, max_requests, warmup=0.5):
    """Runs `grpc_load.py load` against `server` = (processes, port); reads the server
    processes' CPU time as the load generator's window opens and closes."""
    processes, port = server
    command = [sys.executable, GRPC_LOAD, "load", "--target", f"127.0.0.1:{port}",
               "--request", request_file, "--clients", str(clients), "--seconds", str(seconds),
               "--warmup", str(warmup), "--max_requests", str(max_requests)]
    load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    cpu_start = cpu_end = None
    result = None
    for line in load.stdout:
        if line.startswith("WINDOW_START"):
            cpu_start = _cpu_seconds(processes)
        elif line.startswith("WINDOW_END"):
            cpu_end = _cpu_seconds(processes)
        elif line.startswith("{"):
            result = json.loads(line)
    if load.wait() != 0 or result is None:
        raise RuntimeError(f"The load generator failed: {' '.join(command)}")
    result["server_cpu_s"] = (
        None if cpu_start is None or cpu_end is None else cpu_end - cpu_start
    )
    return result


def _cpu_seconds(processes):
    seconds = [process_cpu_seconds(process.pid) for process in processes]
    return None if None in seconds else sum(seconds)


def summarize(results, batch_size):
    latencies = np.concatenate([np.asarray(r["latencies_ms"], dtype=float) for r in results])
    elapsed = sum(r["seconds"] for r in results)
    count = len(latencies)
    server_cpu = [r["server_cpu_s"] for r in results]
    client_cpu = [r["client_cpu_s"] for r in results]
    server_cpu = None if None in server_cpu else sum(server_cpu)
    client_cpu = None if None in client_cpu else sum(client_cpu)
    return {
        "requests": count,
        "req_per_s": count / elapsed,
        "img_per_s": count * batch_size / elapsed,
        "p50_ms": float(np.percentile(latencies, 50)) if count else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if count else float("nan"),
        "img_per_cpu_s": count * batch_size / server_cpu if server_cpu else None,
        "client_ms_per_req": 1000.0 * client_cpu / count if client_cpu and count else None,
        "num_errors": sum(r["num_errors"] for r in results),
        "errors": sorted({e for r in results for e in r["errors"]})[:3],
    }


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_model(process, port, log_path, timeout=180):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "jem"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"The server exited; see {log_path}")
            try:
                if stub.GetModelStatus(request, timeout=2).model_version_status:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    finally:
        channel.close()
    process.kill()
    raise RuntimeError(f"The server did not come up within {timeout} s; see {log_path}")


def start_server(base, batching, args, log_path):
    """`--processes` server processes on one port (SO_REUSEPORT when more than one); returns
    (processes, port)."""
    port = free_port()
    command = [sys.executable, "-m", "serving.server", "--model_base_path", base,
               "--host", "127.0.0.1", "--port", str(port), "--poll_seconds", "0",
               "--max_workers", str(max(64, 2 * max(args.clients)))] + args.server_args.split()
    if args.processes > 1:
        command.append("--reuse_port")
    if batching:
        command += ["--enable_batching", "--max_batch_size", str(args.max_batch_size),
                    "--batch_timeout_ms", str(args.batch_timeout_ms),
                    "--num_batch_threads", str(args.num_batch_threads)] + args.batching_args.split()
    processes = []
    try:
        paths = [log_path] + [f"{log_path}.{index}" for index in range(1, args.processes)]
        for path in paths:  # started together: they load their models in parallel
            with open(path, "w") as log:
                processes.append(subprocess.Popen(
                    command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}))
        # A server binds its port once its models are loaded, so the load must not start
        # before every process listens: until then the port reaches only some of them.
        for process, path in zip(processes, paths):
            wait_for_log(process, path, "gRPC server listening")
        wait_for_model(processes[0], port, log_path)
    except BaseException:
        stop_processes(*processes)  # the caller never sees them: stop them here
        raise
    return processes, port


def wait_for_log(process, log_path, text, timeout=180):
    """Waits until `text` appears in `log_path`; raises if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path) as f:
            if text in f.read():
                return
        if process.poll() is not None:
            raise RuntimeError(f"The server exited; see {log_path}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"The server did not come up within {timeout} s; see {log_path}")


def start_floor(response_file, log_path, method=PREDICT_METHOD):
    """`grpc_load.py floor` answering `method` on a free port; returns (process, port)."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, GRPC_LOAD, "floor", "--port", str(port), "--response",
             response_file, "--method", method], stdout=subprocess.PIPE, stderr=log, text=True)
    line = process.stdout.readline()
    if not line.startswith("FLOOR_READY"):
        process.kill()
        raise RuntimeError(f"The gRPC floor server did not start; see {log_path}")
    return process, port


def stop_processes(*processes):
    """Stops `processes` together: SIGTERM to all (each server drains for up to its grace
    period), then wait, then SIGKILL whatever is still running after 30 s."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + 30
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def prepare_requests(in_process, server, batch_sizes, image_shape, tmp):
    """Writes one serialized PredictRequest and its PredictResponse per batch size; checks that
    the server's answer equals the in-process outputs."""
    files = {}
    channel = grpc.insecure_channel(f"127.0.0.1:{server[1]}", options=MESSAGE_OPTIONS)
    predict = channel.unary_unary(PREDICT_METHOD)
    try:
        for batch in batch_sizes:
            images = make_images(batch, image_shape)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "jem"
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
            payload = request.SerializeToString()
            reply = predict(payload, timeout=120)
            response = predict_pb2.PredictResponse.FromString(reply)
            served = tf.make_ndarray(response.outputs["probabilities"])
            expected = in_process.outputs(images)["probabilities"]
            if served.shape != expected.shape or not np.allclose(served, expected, atol=1e-5):
                raise RuntimeError(
                    f"The server's probabilities for batch {batch} differ from the in-process "
                    f"ones (max |diff| {np.max(np.abs(served - expected)):.3g})."
                )
            request_file = os.path.join(tmp, f"request_{batch}.bin")
            response_file = os.path.join(tmp, f"response_{batch}.bin")
            with open(request_file, "wb") as f:
                f.write(payload)
            with open(response_file, "wb") as f:
                f.write(reply)
            files[batch] = (request_file, response_file)
    finally:
        channel.close()
    return files


def run_cells(args, in_process, servers, floors, files, image_shape):
    """Every (mode, batch, clients) cell, in `--rounds` windows alternating between modes."""
    rows = []
    window = args.seconds / args.rounds
    budget = max(1, args.max_requests // args.rounds)
    for batch in args.batch_sizes:
        for clients in args.clients:
            modes = (["in-process"] if clients == 1 else []) + list(servers) + ["gRPC floor"]
            collected = {mode: [] for mode in modes}
            for _ in range(args.rounds):
                for mode in modes:
                    if mode == "in-process":
                        result = in_process.run(batch, window, budget, image_shape)
                    else:
                        if mode == "gRPC floor":
                            server = ([floors[batch][0]], floors[batch][1])
                        else:
                            server = servers[mode]
                        result = run_load(server, files[batch][0], clients, window, budget)
                    collected[mode].append(result)
            for mode in modes:
                row = {"mode": mode, "batch": batch, "clients": clients,
                       **summarize(collected[mode], batch)}
                if row["num_errors"]:
                    print(f"{mode}: {row['num_errors']} failed calls: {row['errors']}",
                          file=sys.stderr)
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
    return rows


def format_table(rows):
    header = ["mode", "batch", "clients", "req/s", "img/s", "p50 ms", "p99 ms", "img/CPU-s",
              "client ms/req"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        per_cpu = f"{r['img_per_cpu_s']:.0f}" if r["img_per_cpu_s"] else "n/a"
        client = f"{r['client_ms_per_req']:.2f}" if r["client_ms_per_req"] else "-"
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['clients']} | {r['req_per_s']:.1f} | "
            f"{r['img_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {per_cpu} | "
            f"{client} |"
        )
    return "\n".join(lines)


def summarize_targets(rows, num_cores=None):
    """The issue-5 and issue-15 figures, as a dict and as printable lines.

    Besides the ratios, it bounds what any server on this machine could reach with batching:
    each image costs the model's CPU at batch 32 (in-process), and each batch-1 request the
    gRPC floor's CPU and the load generator's, all on the same `num_cores` cores.
    """
    num_cores = num_cores or os.cpu_count()

    def find(mode, batch, clients):
        return next((r for r in rows if (r["mode"], r["batch"], r["clients"])
                     == (mode, batch, clients)), None)

    summary, lines = {}, []
    direct, served = find("in-process", 32, 1), find("server", 32, 1)
    if direct and served:
        summary["overhead_batch32"] = served["p50_ms"] / direct["p50_ms"] - 1.0
        lines.append(f"server overhead at batch 32, 1 client (p50 vs in-process): "
                     f"{100 * summary['overhead_batch32']:+.1f}% (issue 5: < 10%; "
                     "issue 15: <= 5%)")
        if direct["img_per_cpu_s"] and served["img_per_cpu_s"]:
            summary["cpu_overhead_batch32"] = direct["img_per_cpu_s"] / served["img_per_cpu_s"] - 1
            lines.append(f"server overhead at batch 32, 1 client (CPU time per image): "
                         f"{100 * summary['cpu_overhead_batch32']:+.1f}%")
    clients = max((r["clients"] for r in rows if r["batch"] == 1), default=None)
    unbatched, batched = find("server", 1, clients), find("server+batching", 1, clients)
    floor = find("gRPC floor", 1, clients)
    if unbatched and batched:
        summary["batching_gain"] = batched["img_per_s"] / unbatched["img_per_s"]
        lines.append(f"batching gain, {clients} clients at batch 1 (img/s): "
                     f"{summary['batching_gain']:.2f}x (target >= 3x)")
        if unbatched["img_per_cpu_s"] and batched["img_per_cpu_s"]:
            summary["cpu_batching_gain"] = batched["img_per_cpu_s"] / unbatched["img_per_cpu_s"]
            lines.append(f"batching gain, {clients} clients at batch 1 (images per server "
                         f"CPU-second): {summary['cpu_batching_gain']:.2f}x")
        if floor:
            summary["floor_over_unbatched"] = floor["img_per_s"] / unbatched["img_per_s"]
            lines.append(f"gRPC floor over the unbatched server, {clients} clients at batch 1: "
                         f"{summary['floor_over_unbatched']:.2f}x (no Python server doing work "
                         "can gain more here)")
        single = find("in-process", 1, 1)
        if direct and single:
            ceiling = direct["img_per_s"] / single["img_per_s"]
            summary["batching_ceiling"] = ceiling
            summary["batching_of_ceiling"] = summary["batching_gain"] / ceiling
            needed = 0.85 * ceiling * unbatched["img_per_s"]
            summary["issue15_needed_img_per_s"] = needed
            lines.append(
                f"batching gain over the in-process batch-32 / batch-1 ratio ({ceiling:.2f}x): "
                f"{100 * summary['batching_of_ceiling']:.0f}% (issue 15: >= 85%, i.e. "
                f"{needed:.0f} img/s batched; in-process batch 32 gives "
                f"{direct['img_per_s']:.0f} img/s)"
            )
            if floor and floor["img_per_cpu_s"] and direct["img_per_cpu_s"] and \
                    batched["client_ms_per_req"]:
                cpu_per_image = (1.0 / direct["img_per_cpu_s"] + 1.0 / floor["img_per_cpu_s"]
                                 + batched["client_ms_per_req"] / 1000.0)
                summary["cpu_bound_img_per_s"] = num_cores / cpu_per_image
                lines.append(
                    f"at most {summary['cpu_bound_img_per_s']:.0f} img/s batched on "
                    f"{num_cores} cores: {1000 * cpu_per_image:.2f} CPU-ms per image (model "
                    "at batch 32 + gRPC floor + load generator), with no other server work"
                )
    return summary, lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["wrn", "digits"], default="wrn",
                        help="model built with random weights: wrn = WRN-16-2 on 32x32x3, "
                        "digits = SmallCNN on 8x8x1 (ignored with --export_dir)")
    parser.add_argument("--export_dir", help="benchmark this exported model base path instead")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--max_requests", type=int, default=100000, help="requests per cell")
    parser.add_argument("--batch_sizes", default="1,32")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--batch_timeout_ms", type=float, default=2.0)
    parser.add_argument("--num_batch_threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2,
                        help="windows per cell, alternating between the modes")
    parser.add_argument("--server_args", default="",
                        help='extra server flags, e.g. "--tensorflow_inter_op_parallelism 1"')
    parser.add_argument("--processes", type=int, default=1,
                        help="server processes per mode, sharing the port with --reuse_port")
    parser.add_argument("--batching_args", default="",
                        help='extra flags for the batching server only, e.g. '
                        '"--allowed_batch_sizes 8,16,32" or "--batch_close_when_idle"')
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        parser.error("--batch_sizes and --clients take comma-separated integers, e.g. 1,8,32")
    if (min(args.batch_sizes + args.clients) < 1 or args.seconds <= 0 or args.rounds < 1
            or args.processes < 1):
        parser.error("batch sizes, clients, --rounds and --processes must be >= 1 and "
                     "--seconds > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    processes = []
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "models")
        if args.export_dir:
            os.makedirs(base)
            os.symlink(os.path.abspath(args.export_dir), os.path.join(base, "jem"))
            versions = sorted(int(v) for v in os.listdir(args.export_dir) if v.isdigit())
            if not versions:
                raise SystemExit(f"No integer version directory in {args.export_dir}.")
            path = os.path.join(args.export_dir, str(versions[-1]))
        else:
            path = build_export(args.model, base)
        in_process = InProcess(path)
        image_shape = tuple(in_process.function.structured_input_signature[1]["images"].shape[1:])
        try:
            servers = {}
            for mode, batching in (("server", False), ("server+batching", True)):
                servers[mode] = start_server(base, batching, args,
                                             os.path.join(tmp, f"{mode}.log"))
                processes.extend(servers[mode][0])
            files = prepare_requests(in_process, servers["server"], args.batch_sizes,
                                     image_shape, tmp)
            floors = {}
            for batch, (_, response_file) in files.items():
                floors[batch] = start_floor(response_file, os.path.join(tmp, f"floor{batch}.log"))
                processes.append(floors[batch][0])
            rows = run_cells(args, in_process, servers, floors, files, image_shape)
        finally:
            stop_processes(*processes)

    print()
    print(format_table(rows))
    summary, lines = summarize_targets(rows)
    print()
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary, "args": vars(args)}, f, indent=2)
    return rows, summary


if __name__ == "__main__":
    main()
