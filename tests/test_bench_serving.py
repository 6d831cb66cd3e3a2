"""Smoke tests of the serving benchmark (`tools/bench_serving.py`, `tools/grpc_load.py`).

No timing is asserted: the numbers depend on the machine and its load.
"""

import contextlib
import json
import subprocess
import sys

import pytest

from tools import bench_serving

GRPC_LOAD = bench_serving.GRPC_LOAD


def _row(mode, batch, clients, img_per_s, p50_ms, img_per_cpu_s=None, client_ms=0.2):
    return {"mode": mode, "batch": batch, "clients": clients, "req_per_s": img_per_s / batch,
            "img_per_s": img_per_s, "p50_ms": p50_ms, "p99_ms": 2 * p50_ms,
            "img_per_cpu_s": img_per_cpu_s, "client_ms_per_req": client_ms}


@contextlib.contextmanager
def floor_server(response_file, tmp_path, **kwargs):
    """`grpc_load.py floor` on a free port (`bench_serving.start_floor`); yields the port."""
    process, port = bench_serving.start_floor(str(response_file), str(tmp_path / "floor.log"),
                                              **kwargs)
    try:
        yield port
    finally:
        bench_serving.stop_processes(process)


def run_load(port, request_file, *extra):
    out = subprocess.run(
        [sys.executable, GRPC_LOAD, "load", "--target", f"127.0.0.1:{port}", "--request",
         str(request_file), *extra], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.splitlines()


def test_summary_ratios():
    rows = [
        _row("in-process", 32, 1, 1280.0, 25.0, 700.0),
        _row("server", 32, 1, 1150.0, 27.5, 640.0),
        _row("server", 1, 32, 400.0, 80.0, 200.0),
        _row("server+batching", 1, 32, 1000.0, 30.0, 500.0),
        _row("gRPC floor", 1, 32, 4000.0, 8.0, 4000.0),
    ]
    summary, lines = bench_serving.summarize_targets(rows)
    assert summary["overhead_batch32"] == pytest.approx(0.10)
    assert summary["cpu_overhead_batch32"] == pytest.approx(700.0 / 640.0 - 1)
    assert summary["batching_gain"] == pytest.approx(2.5)
    assert summary["cpu_batching_gain"] == pytest.approx(2.5)
    assert summary["floor_over_unbatched"] == pytest.approx(10.0)
    assert any("2.50x (target >= 3x)" in line for line in lines)
    table = bench_serving.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| gRPC floor | 1 | 32 |" in table


def test_summary_against_the_in_process_ceiling():
    rows = [
        _row("in-process", 1, 1, 400.0, 2.5, 250.0),
        _row("in-process", 32, 1, 800.0, 40.0, 400.0),
        _row("server", 1, 32, 300.0, 100.0, 200.0),
        _row("server+batching", 1, 32, 480.0, 60.0, 300.0, client_ms=0.5),
        _row("gRPC floor", 1, 32, 4000.0, 8.0, 2000.0),
    ]
    summary, lines = bench_serving.summarize_targets(rows, num_cores=2)
    # By hand: the ceiling is 800 / 400 = 2x; the gain 480 / 300 = 1.6x, 80% of it; 85% of
    # the ceiling needs 0.85 * 2 * 300 = 510 img/s; per image 1/400 + 1/2000 + 0.5/1000 s of
    # CPU = 3.5 ms, so two cores allow 2 / 0.0035 = 571 img/s.
    assert summary["batching_ceiling"] == pytest.approx(2.0)
    assert summary["batching_of_ceiling"] == pytest.approx(0.8)
    assert summary["issue15_needed_img_per_s"] == pytest.approx(510.0)
    assert summary["cpu_bound_img_per_s"] == pytest.approx(2 / 0.0035)
    assert any("80% (issue 15: >= 85%, i.e. 510 img/s" in line for line in lines)
    assert any("at most 571 img/s batched on 2 cores" in line for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["--clients", "1,x"], "comma-separated integers"),
    (["--batch_sizes", "0"], "must be >= 1"),
    (["--seconds", "0"], "--seconds > 0"),
])
def test_bad_arguments_stop_before_any_work(capsys, argv, message):
    with pytest.raises(SystemExit):
        bench_serving.parse_args(argv)
    assert message in capsys.readouterr().err


def test_load_generator_against_the_floor_server(tmp_path):
    response = tmp_path / "response.bin"
    response.write_bytes(b"\x0a\x03abc")
    request = tmp_path / "request.bin"
    request.write_bytes(b"\x0a\x01x" * 100)
    with floor_server(response, tmp_path) as port:
        out = run_load(port, request, "--clients", "3", "--seconds", "0.5", "--warmup", "0.1")
    assert out[:2] == ["WINDOW_START", "WINDOW_END"]
    result = json.loads(out[-1])
    assert result["num_errors"] == 0 and result["requests"] > 0
    assert result["latencies_ms"] == sorted(result["latencies_ms"])
    assert 0.4 < result["seconds"] <= 0.5 + 1e-6
    assert result["client_cpu_s"] > 0


def test_load_generator_reports_failed_calls_and_unreachable_servers(tmp_path):
    request = tmp_path / "request.bin"
    request.write_bytes(b"")
    with floor_server(request, tmp_path, method="/other.Service/Call") as port:
        out = run_load(port, request, "--clients", "2", "--seconds", "0.3", "--warmup", "0")
    result = json.loads(out[-1])
    # The floor answers only /other.Service/Call: every Predict is UNIMPLEMENTED, and counted.
    assert result["requests"] == 0 and result["num_errors"] > 0
    assert result["errors"][0].startswith("UNIMPLEMENTED")

    closed = subprocess.run(
        [sys.executable, GRPC_LOAD, "load", "--target", f"127.0.0.1:{bench_serving.free_port()}",
         "--request", str(request), "--seconds", "0.3", "--connect_timeout", "1"],
        capture_output=True, text=True, timeout=120, check=False)
    assert closed.returncode != 0 and "could not connect" in closed.stderr


@pytest.mark.large  # four server processes, about 40 s; the pieces are tested above
def test_tiny_benchmark_run_checks_answers_and_writes_json(tmp_path, capsys):
    # Two server processes per mode sharing a port (--reuse_port): the multi-process path, of
    # which one process is the special case. The driver (`bench_serving.main`: export, the
    # in-process mode, the load) runs in this process, which already imported TensorFlow; the
    # servers, the gRPC floor and the load generator are subprocesses, as from the command line.
    out = tmp_path / "bench.json"
    bench_serving.main(
        ["--model", "digits", "--seconds", "0.4", "--rounds", "1", "--batch_sizes", "1",
         "--clients", "1,2", "--processes", "2", "--json", str(out)])
    stdout = capsys.readouterr().out
    data = json.loads(out.read_text())
    cells = {(r["mode"], r["clients"]) for r in data["rows"]}
    assert cells == {("in-process", 1), ("server", 1), ("server+batching", 1),
                     ("gRPC floor", 1), ("server", 2), ("server+batching", 2),
                     ("gRPC floor", 2)}
    for row in data["rows"]:
        assert row["requests"] > 0 and row["num_errors"] == 0, row
        assert row["img_per_cpu_s"] is not None, row  # every server process's CPU was read
    assert data["args"]["processes"] == 2
    assert "batching_gain" in data["summary"] and "floor_over_unbatched" in data["summary"]
    assert "batching gain, 2 clients at batch 1" in stdout


def test_bench_xla_compares_both_functions_on_the_same_outputs(capsys):
    from tools import bench_xla

    with pytest.raises(SystemExit):
        bench_xla.main(["--batch_sizes", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err
    bench_xla.main(["--model", "digits", "--batch_sizes", "2", "--seconds", "0.05",
                    "--rounds", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("2", "plain"), ("2", "xla")]
    assert float(rows[1][4]) < 1e-5  # XLA computes the same softmax
