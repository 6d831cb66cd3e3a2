"""Smoke tests of the training benchmark (`python -m tools.bench`): CLI, JSON lines, table.

No timing is asserted: the numbers depend on the machine and its load.
"""

import contextlib
import io
import json
import os

import pytest

from tests import testing
from tools import bench


class BenchConfigTest(testing.TestCase):
    def test_expand_configs(self):
        args = bench.parse_args(
            ["--model", "jem,softmax,torch_jem", "--backbone", "small_cnn", "--jit_compile",
             "both", "--threads", "1,2"])
        configs = bench.expand_configs(args)
        # jem and softmax with jit off and on; the PyTorch baseline once.
        self.assertEqual(
            [(c["model"], c["jit_compile"]) for c in configs],
            [("jem", False), ("jem", True), ("softmax", False), ("softmax", True),
             ("torch_jem", None)],
        )
        self.assertEqual(configs[0]["num_steps"], 20)
        self.assertIsNone(configs[2]["num_steps"])
        self.assertEqual(configs[0]["threads"], [1, 2])
        self.assertEqual(configs[0]["norm"], "none")

    def test_all_models_and_default_norms(self):
        configs = bench.expand_configs(bench.parse_args(["--model", "all", "--jit_compile", "on"]))
        self.assertEqual([c["model"] for c in configs], list(bench.DEFAULT_MODELS))
        norms = {c["model"]: c["norm"] for c in configs}
        self.assertEqual(norms["jempp"], "batch")
        self.assertEqual(norms["jem"], "none")

    def test_unknown_model_is_rejected(self):
        with self.assertRaisesRegex(SystemExit, "unknown --model"):
            bench.expand_configs(bench.parse_args(["--model", "vae"]))

    def test_missing_torch_gives_not_available_row(self):
        args = bench.parse_args(
            ["--model", "torch_jem", "--torch_python", "/nonexistent/python"])
        row = bench.run_config(bench.expand_configs(args)[0], args)
        self.assertEqual(row["status"], "not available")
        self.assertIn("not available", bench.format_table([row]))

    def test_table_and_ratios(self):
        common = {"backbone": "wrn-28-10", "batch_size": 64, "image_size": 32, "channels": 3,
                  "status": "ok", "streams": "one", "num_steps": 20}
        rows = [
            dict(common, model="jem", jit_compile=False, iteration_s=2.0, images_per_s=32.0,
                 sampler_step_s=0.09, sampling_share=0.9, standalone_s=1.7,
                 classifier_step_s=0.2, sampler_ratio=1.06, iteration_ratio=1.0,
                 iteration_overhead_ratio=0.95, peak_rss_mb=1500.0, buffer_mb=117.2),
            dict(common, model="softmax", jit_compile=False, iteration_s=0.2,
                 images_per_s=320.0, peak_rss_mb=1000.0, num_steps=None),
            dict(common, model="gmmc", jit_compile=False, status="not available",
                 error="keras_jem.GMMC does not exist yet"),
        ]
        table = bench.format_table(rows)
        self.assertIn("s/iter", table)
        self.assertIn("1.06", table)
        self.assertIn("gmmc", table)
        self.assertIn("not available", table)
        self.assertIn("memory jem wrn-28-10", table)
        self.assertIn("= 1.34", table)  # 1500 / (1000 + 117.2)


class BenchCliTest(testing.TestCase):
    # Two `tools.bench` worker processes, about 35 s: large. Its first tracing check (one
    # train_step trace) also runs in the default suite, in tests/test_models.py
    # (TrainingTest.test_train_step_traced_once); the backbone graphs per trace only here.
    @pytest.mark.large
    def test_tiny_run_writes_json_lines_and_table(self):
        # The driver (`tools.bench.main`) runs in this process, which already imported
        # TensorFlow; each configuration still runs in its own `python -m tools.bench --_worker`
        # subprocess, as from the command line.
        path = os.path.join(self.get_temp_dir(), "bench.jsonl")
        argv = [
            "--model", "jem,softmax", "--backbone",
            "small_cnn", "--batch_size", "4", "--image_size", "8", "--channels", "1",
            "--num_steps", "2", "--jit_compile", "off", "--iterations", "2", "--warmup", "1",
            "--buffer_size", "20", "--streams", "two", "--json", path,
        ]
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = bench.main(argv)
        stdout = stdout.getvalue()
        self.assertEqual(code, 0, stdout[-3000:])
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        self.assertEqual([r["model"] for r in rows], ["jem", "softmax"])
        jem = rows[0]
        for row in rows:
            self.assertEqual(row["status"], "ok", row.get("error"))
            self.assertGreater(row["iteration_s"], 0)
            self.assertGreater(row["peak_rss_mb"], 0)
            # One trace of the training step, none after the first iteration.
            self.assertEqual(row["train_step_traces"], 1)
            self.assertEqual(row["retraces_after_warmup"], 0)
            self.assertIn("python -m tools.bench", row["command"])
        for key in ("sampler_s", "sampler_step_s", "sampling_share", "standalone_s",
                    "classifier_step_s", "classifier_step_loss_batch_s", "sampler_ratio",
                    "iteration_ratio", "iteration_overhead_ratio", "buffer_mb"):
            self.assertGreater(jem[key], 0, key)
        # The sampler loop is traced once (a tf.while_loop), not once per step: one backbone
        # graph for the sampler plus the loss's three passes (labelled batch, likelihood batch,
        # samples); a Python-unrolled sampler would add K - 1 = 1 more.
        self.assertLessEqual(jem["backbone_traces_per_step"], 4)
        self.assertEqual(jem["num_steps"], 2)
        self.assertIn("s/iter", stdout)
        self.assertIn("memory jem small_cnn", stdout)
