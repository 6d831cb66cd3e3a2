"""`python -m serving.server`'s flags: each reaches `ModelServer` / `BatchingOptions`, with the
defaults written down here by hand (TF Serving's where it has one), and bad values are refused."""

import functools
import types

import pytest

from serving import cli
from serving import server as server_lib
from serving.batching import BatchingOptions


def _server_kwargs(monkeypatch, argv):
    """The keyword arguments `cli.main(argv)` hands to `ModelServer` (which is not started)."""
    received = {}

    @functools.wraps(server_lib.ModelServer)  # the parser reads its defaults from the signature
    def fake_server(**kwargs):
        received.update(kwargs)
        raise ValueError("stop here")  # main prints it and returns 2 before serving

    monkeypatch.setattr(server_lib, "ModelServer", fake_server)
    assert cli.main(argv) == 2
    return received


def test_default_flags_reach_the_server(monkeypatch):
    kwargs = _server_kwargs(monkeypatch, ["--model_base_path", "models"])
    expected = {
        "model_base_path": "models", "model_name": None, "model_config_file": None,
        "port": 8500, "rest_port": None, "host": "127.0.0.1", "max_request_batch_size": 1024,
        "poll_seconds": 2.0, "max_num_load_retries": 5, "load_retry_interval_seconds": 2.0,
        "unload_after_missed_polls": 3, "max_workers": 64, "max_queued_requests": 256,
        "max_concurrent_rpcs": 512, "max_concurrent_streams": 100, "rest_max_connections": 64,
        "rest_timeout_seconds": 30.0, "max_message_mb": 64, "tensor_content_outputs": False,
        "reuse_port": False, "ssl_cert_file": None, "ssl_key_file": None,
        "ssl_client_ca_file": None, "ssl_config_file": None, "batching": None,
        "enable_model_warmup": True,
    }
    assert kwargs == expected


def test_every_flag_and_alias_reaches_the_server(monkeypatch):
    kwargs = _server_kwargs(monkeypatch, [
        "--model_name", "jem", "--model_base_path", "m/jem", "--port", "9000",
        "--rest_api_port", "9001", "--host", "0.0.0.0", "--max_request_batch_size", "7",
        "--file_system_poll_wait_seconds", "0.5", "--max_num_load_retries", "1",
        "--load_retry_interval_seconds", "0.25", "--unload_after_missed_polls", "9",
        "--max_workers", "3", "--max_queued_requests", "4", "--max_concurrent_rpcs", "5",
        "--max_concurrent_streams", "6", "--rest_max_connections", "8",
        "--rest_timeout_seconds", "1.5", "--max_message_mb", "0.5", "--tensor_content_outputs",
        "--reuse_port", "--ssl_cert_file", "c.pem", "--ssl_key_file", "k.pem",
        "--ssl_client_ca_file", "ca.pem", "--no_warmup",
    ])
    assert kwargs == {
        "model_base_path": "m/jem", "model_name": "jem", "model_config_file": None,
        "port": 9000, "rest_port": 9001, "host": "0.0.0.0", "max_request_batch_size": 7,
        "poll_seconds": 0.5, "max_num_load_retries": 1, "load_retry_interval_seconds": 0.25,
        "unload_after_missed_polls": 9, "max_workers": 3, "max_queued_requests": 4,
        "max_concurrent_rpcs": 5, "max_concurrent_streams": 6, "rest_max_connections": 8,
        "rest_timeout_seconds": 1.5, "max_message_mb": 0.5, "tensor_content_outputs": True,
        "reuse_port": True, "ssl_cert_file": "c.pem", "ssl_key_file": "k.pem",
        "ssl_client_ca_file": "ca.pem", "ssl_config_file": None, "batching": None,
        "enable_model_warmup": False,
    }


def test_threading_flags_set_tensorflow_thread_pools(monkeypatch):
    import tensorflow as tf

    # The table holds TensorFlow's own setters (TensorFlow refuses them once it has run, as in
    # this process, so recorders stand in for them below).
    assert cli.THREADING_FLAGS["tensorflow_intra_op_parallelism"][1] is (
        tf.config.threading.set_intra_op_parallelism_threads)
    assert cli.THREADING_FLAGS["tensorflow_inter_op_parallelism"][1] is (
        tf.config.threading.set_inter_op_parallelism_threads)
    calls = []
    monkeypatch.setattr(cli, "THREADING_FLAGS", {
        name: (text, functools.partial(lambda name, n: calls.append((name, n)), name))
        for name, (text, _) in cli.THREADING_FLAGS.items()})
    _server_kwargs(monkeypatch, ["--model_base_path", "models"])
    assert calls == []  # 0: TensorFlow's default, nothing set
    _server_kwargs(monkeypatch, ["--model_base_path", "models",
                                 "--tensorflow_intra_op_parallelism", "3",
                                 "--tensorflow_inter_op_parallelism", "2"])
    assert calls == [("tensorflow_intra_op_parallelism", 3),
                     ("tensorflow_inter_op_parallelism", 2)]


@pytest.mark.parametrize("argv, expected", [
    (["--enable_batching"], BatchingOptions(32, 2.0, 1, 100, (), False)),
    (["--max_batch_size", "8"], BatchingOptions(8, 2.0, 1, 100, (), False)),
    (["--batch_timeout_ms", "0.5", "--num_batch_threads", "0", "--max_enqueued_batches", "3",
      "--allowed_batch_sizes", "2,8", "--max_batch_size", "8"],
     BatchingOptions(8, 0.5, 0, 3, (2, 8), False)),
    (["--enable_batching", "--batch_close_when_idle"], BatchingOptions(32, 2.0, 1, 100, (), True)),
    # A policy alone does not turn batching on.
    (["--batch_close_when_idle"], None),
])
def test_batching_flags(monkeypatch, argv, expected):
    kwargs = _server_kwargs(monkeypatch, ["--model_base_path", "models", *argv])
    assert kwargs["batching"] == expected


def test_batching_file_with_flags_on_top(monkeypatch, tmp_path):
    path = tmp_path / "batching.pbtxt"
    path.write_text("max_batch_size { value: 16 }\nbatch_timeout_micros { value: 500 }\n"
                    "num_batch_threads { value: 2 }\n")
    kwargs = _server_kwargs(monkeypatch, [
        "--model_base_path", "models", "--batching_parameters_file", str(path),
        "--num_batch_threads", "3",
    ])
    # 500 microseconds = 0.5 ms; the flag wins over the file's 2 threads.
    assert kwargs["batching"] == BatchingOptions(16, 0.5, 3, 100, (), False)


@pytest.mark.parametrize("argv, message", [
    (["--max_workers", "many"], "invalid int value: 'many'"),
    (["--allowed_batch_sizes", "8,x"], "takes integers like 8,16,32; received '8,x'"),
])
def test_bad_flag_values_stop_the_cli(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(server_lib, "ModelServer", functools.wraps(server_lib.ModelServer)(
        lambda **kwargs: pytest.fail("built")))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model_base_path", "models", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch_size": 0}, "max_batch_size must be >= 1; received 0"),
    ({"num_batch_threads": -1}, "num_batch_threads must be >= 0; received -1"),
    ({"batch_timeout_ms": -1}, "batch_timeout_ms must be >= 0; received -1"),
    ({"max_enqueued_batches": 0}, "max_enqueued_batches must be >= 1; received 0"),
    ({"max_batch_size": 8, "allowed_batch_sizes": (2, 4)},
     r"must increase and end with max_batch_size \(8\); received \[2, 4\]"),
    ({"max_batch_size": 8, "allowed_batch_sizes": (4, 2, 8)}, r"received \[4, 2, 8\]"),
])
def test_batching_options_refuse_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchingOptions(**kwargs)


def test_batching_options_normalise_and_build_their_batcher():
    options = BatchingOptions(max_batch_size="8", batch_timeout_ms=5, num_batch_threads=2.0,
                              max_enqueued_batches=3, allowed_batch_sizes=[4, 8],
                              close_when_idle=1)
    assert options == BatchingOptions(8, 5.0, 2, 3, (4, 8), True)
    assert options.allowed_batch_sizes == (4, 8)
    loop = object()
    batcher = options.batcher(types.SimpleNamespace(key="serving_default"), loop=loop)
    assert (batcher.max_batch_size, batcher.timeout, batcher.num_threads) == (8, 0.005, 2)
    assert batcher.max_enqueued_rows == 24  # 3 batches of 8 rows
    assert (batcher.allowed_batch_sizes, batcher.close_when_idle, batcher.loop) == ([4, 8], True,
                                                                                     loop)


@pytest.mark.parametrize("batching, expected", [
    (True, BatchingOptions()),
    ({"max_batch_size": 4}, BatchingOptions(max_batch_size=4)),
    (BatchingOptions(num_batch_threads=0), BatchingOptions(num_batch_threads=0)),
    (None, None),
    (False, None),
])
def test_model_server_takes_batching_in_any_form(tmp_path, batching, expected):
    server = server_lib.ModelServer(str(tmp_path), port=0, batching=batching)
    assert server.manager._batching == expected


def test_model_server_refuses_other_batching_values(tmp_path):
    with pytest.raises(ValueError, match=r"`batching` takes a BatchingOptions.*Received: 'yes'"):
        server_lib.ModelServer(str(tmp_path), batching="yes")


def test_bad_batching_values_stop_the_cli_before_the_server(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(server_lib, "ModelServer", functools.wraps(server_lib.ModelServer)(
        lambda **kwargs: pytest.fail("built")))
    assert cli.main(["--model_base_path", "models", "--max_batch_size", "0"]) == 2
    assert "error: max_batch_size must be >= 1; received 0." in capsys.readouterr().err
    path = tmp_path / "batching.pbtxt"
    path.write_text("max_batch_sise { value: 8 }\n")
    assert cli.main(["--model_base_path", "models", "--batching_parameters_file", str(path)]) == 2
    assert "max_batch_sise" in capsys.readouterr().err
