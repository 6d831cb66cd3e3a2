"""Loopback load benchmark of the embedded model server (`serving.server`).

```
python tools/bench_serving.py                      # WRN-16-2 JEM on 32x32x3, random weights
python tools/bench_serving.py --model digits       # SmallCNN JEM on 8x8x1
python tools/bench_serving.py --export_dir models/jem --seconds 3 --json bench.json
```

Measures requests/s, images/s and p50/p99 latency of `Predict` on `serving_default` at each batch
size (1 and 32) with 1, 8 and 32 concurrent clients (one gRPC channel and thread each), against
the server started as a subprocess on 127.0.0.1 without and with server-side batching, next to
calling the SavedModel's signature directly in-process (one caller: the model's own compute time).
Every cell is bounded by `--seconds` and `--max_requests`.

The `img/CPU-s` column divides the images answered by the CPU time the server process (or, for
in-process rows, this process) used in the window: unlike wall-clock rates it barely moves when
other processes load the machine.

Two figures are checked against the targets of issue 5:
- server overhead at batch 32, one client: p50 latency through the server vs in-process (< 10%);
- batching gain: images/s of 32 concurrent batch-1 clients with batching vs without (>= 3x).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
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
from tensorflow_serving.apis import prediction_service_pb2_grpc


def build_export(kind, base):
    import keras

    import keras_jem
    from keras_jem import export

    if kind == "wrn":
        backbone, shape = keras_jem.backbones.WideResNet(depth=16, width=2), (32, 32, 3)
    else:
        backbone, shape = keras_jem.backbones.SmallCNN(), (8, 8, 1)
    keras.utils.set_random_seed(0)
    model = keras_jem.JEM(backbone=backbone, num_classes=10, buffer_size=100)
    model(np.zeros((1,) + shape, "float32"))
    return export.export_serving_model(model, os.path.join(base, "jem"), warmup=True)


class InProcess:
    """Calls the SavedModel's `serving_default` signature directly (one caller)."""

    def __init__(self, path):
        self.function = tf.saved_model.load(path).signatures["serving_default"]

    def run(self, batch_size, seconds, max_requests, image_shape):
        images = tf.constant(
            np.random.default_rng(0).uniform(-1, 1, (batch_size,) + image_shape).astype("float32")
        )
        for _ in range(2):
            self.function(images=images)
        latencies = []
        cpu = time.process_time()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds and len(latencies) < max_requests:
            t = time.perf_counter()
            self.function(images=images)["probabilities"].numpy()
            latencies.append(time.perf_counter() - t)
        return latencies, time.perf_counter() - start, [], time.process_time() - cpu


def process_cpu_seconds(pid):
    """User + system CPU seconds of a process (Linux /proc), or None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def bench_server(server, batch_size, clients, seconds, max_requests, image_shape, warmup=0.5):
    """`clients` threads, each with its own channel, send Predict requests back to back."""
    process, port = server
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "jem"
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size,) + image_shape)
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images.astype("float32")))
    latencies, errors = [], []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    state = {}

    def client():
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
        )
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            barrier.wait(timeout=60)
            while True:
                t = time.perf_counter()
                if t >= state["stop_at"]:
                    break
                stub.Predict(request, timeout=60)
                done = time.perf_counter()
                if t >= state["measure_from"]:
                    with lock:
                        if len(latencies) >= max_requests:
                            break
                        latencies.append(done - t)
        except Exception as e:  # reported in the result
            errors.append(repr(e))
        finally:
            channel.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    now = time.perf_counter()
    state["measure_from"] = now + warmup
    state["stop_at"] = now + warmup + seconds
    barrier.wait(timeout=60)
    time.sleep(max(0.0, state["measure_from"] - time.perf_counter()))
    cpu = process_cpu_seconds(process.pid)
    for thread in threads:
        thread.join(timeout=warmup + seconds + 120)
    elapsed = min(time.perf_counter(), state["stop_at"]) - state["measure_from"]
    cpu_end = process_cpu_seconds(process.pid)
    cpu = None if cpu is None or cpu_end is None else cpu_end - cpu
    return latencies, elapsed, errors, cpu


def summarize(latencies, elapsed, batch_size, cpu_seconds):
    values = np.asarray(latencies) * 1000.0
    return {
        "cpu_s": cpu_seconds,
        "img_per_cpu_s": len(latencies) * batch_size / cpu_seconds if cpu_seconds else None,
        "requests": len(latencies),
        "req_per_s": len(latencies) / elapsed,
        "img_per_s": len(latencies) * batch_size / elapsed,
        "p50_ms": float(np.percentile(values, 50)) if len(values) else float("nan"),
        "p99_ms": float(np.percentile(values, 99)) if len(values) else float("nan"),
    }


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base, batching, args, log_path):
    port = free_port()
    command = [sys.executable, "-m", "serving.server", "--model_base_path", base,
               "--host", "127.0.0.1", "--port", str(port), "--poll_seconds", "0",
               "--max_workers", str(max(64, 2 * max(args.clients)))] + args.server_args.split()
    if batching:
        command += ["--enable_batching", "--max_batch_size", str(args.max_batch_size),
                    "--batch_timeout_ms", str(args.batch_timeout_ms),
                    "--num_batch_threads", str(args.num_batch_threads)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "jem"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited; see {log_path}")
        try:
            if stub.GetModelStatus(request, timeout=2).model_version_status:
                channel.close()
                return process, port
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"The server did not come up within 180 s; see {log_path}")


def stop_server(process):
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def run_cells(args, in_process, servers, image_shape):
    """Every (mode, batch, clients) cell, measured in `--rounds` windows that alternate between
    the modes, so that load from other processes on the machine hits every mode alike."""
    cells = []
    for batch in args.batch_sizes:
        for clients in args.clients:
            modes = ["in-process"] if clients == 1 else []
            cells.append((batch, clients, modes + list(servers)))
    rows = []
    window = args.seconds / args.rounds
    budget = args.max_requests // args.rounds
    for batch, clients, modes in cells:
        collected = {mode: ([], 0.0, [], 0.0) for mode in modes}
        for _ in range(args.rounds):
            for mode in modes:
                if mode == "in-process":
                    result = in_process.run(batch, window, budget, image_shape)
                else:
                    result = bench_server(servers[mode], batch, clients, window, budget,
                                          image_shape)
                latencies, elapsed, errors, cpu = collected[mode]
                cpu = None if cpu is None or result[3] is None else cpu + result[3]
                collected[mode] = (latencies + result[0], elapsed + result[1],
                                   errors + result[2], cpu)
        for mode in modes:
            latencies, elapsed, errors, cpu = collected[mode]
            if errors:
                print(f"{mode} errors: {errors[:3]}", file=sys.stderr)
            row = {"mode": mode, "batch": batch, "clients": clients,
                   **summarize(latencies, elapsed, batch, cpu), "errors": errors[:3]}
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
    return rows


def format_table(rows):
    header = ["mode", "batch", "clients", "req/s", "img/s", "p50 ms", "p99 ms", "img/CPU-s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        per_cpu = f"{r['img_per_cpu_s']:.0f}" if r["img_per_cpu_s"] else "n/a"
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['clients']} | {r['req_per_s']:.1f} | "
            f"{r['img_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {per_cpu} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["wrn", "digits"], default="wrn",
                        help="model built with random weights: wrn = WRN-16-2 on 32x32x3, "
                        "digits = SmallCNN on 8x8x1 (ignored with --export_dir)")
    parser.add_argument("--export_dir", help="benchmark this exported model base path instead")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--max_requests", type=int, default=2000, help="requests per cell")
    parser.add_argument("--batch_sizes", default="1,32")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--batch_timeout_ms", type=float, default=2.0)
    parser.add_argument("--num_batch_threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2,
                        help="windows per cell, alternating between the modes")
    parser.add_argument("--server_args", default="",
                        help='extra server flags, e.g. "--tensorflow_inter_op_parallelism 1"')
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.clients = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        if args.export_dir:
            base = os.path.join(tmp, "models")
            os.makedirs(base)
            os.symlink(os.path.abspath(args.export_dir), os.path.join(base, "jem"))
            versions = sorted(int(v) for v in os.listdir(args.export_dir) if v.isdigit())
            path = os.path.join(args.export_dir, str(versions[-1]))
        else:
            base = os.path.join(tmp, "models")
            path = build_export(args.model, base)
        in_process = InProcess(path)
        spec = in_process.function.structured_input_signature[1]["images"]
        image_shape = tuple(spec.shape[1:])
        servers = {}
        try:
            servers["server"] = start_server(base, False, args, os.path.join(tmp, "server.log"))
            servers["server+batching"] = start_server(
                base, True, args, os.path.join(tmp, "batching.log")
            )
            rows = run_cells(args, in_process, servers, image_shape)
        finally:
            for process, _ in servers.values():
                stop_server(process)

    def find(mode, batch, clients):
        for r in rows:
            if (r["mode"], r["batch"], r["clients"]) == (mode, batch, clients):
                return r
        return None

    print()
    print(format_table(rows))
    summary = {}
    direct, served = find("in-process", 32, 1), find("server", 32, 1)
    if direct and served:
        summary["overhead_batch32"] = served["p50_ms"] / direct["p50_ms"] - 1.0
        print(f"\nserver overhead at batch 32, 1 client (p50 vs in-process): "
              f"{100 * summary['overhead_batch32']:+.1f}% (target < 10%)")
        if direct["img_per_cpu_s"] and served["img_per_cpu_s"]:
            summary["cpu_overhead_batch32"] = direct["img_per_cpu_s"] / served["img_per_cpu_s"] - 1
            print(f"server overhead at batch 32, 1 client (CPU time per image): "
                  f"{100 * summary['cpu_overhead_batch32']:+.1f}%")
    unbatched, batched = find("server", 1, 32), find("server+batching", 1, 32)
    if unbatched and batched:
        summary["batching_gain_32_clients"] = batched["img_per_s"] / unbatched["img_per_s"]
        print(f"batching gain, 32 clients at batch 1 (img/s): "
              f"{summary['batching_gain_32_clients']:.2f}x (target >= 3x)")
        if unbatched["img_per_cpu_s"] and batched["img_per_cpu_s"]:
            summary["cpu_batching_gain_32_clients"] = (
                batched["img_per_cpu_s"] / unbatched["img_per_cpu_s"]
            )
            print(f"batching gain, 32 clients at batch 1 (images per server CPU-second): "
                  f"{summary['cpu_batching_gain_32_clients']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary, "args": vars(args)}, f, indent=2)
    return rows, summary


if __name__ == "__main__":
    main()
