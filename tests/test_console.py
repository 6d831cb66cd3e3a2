"""trainers.console: TensorFlow's C++ log lines hidden by default, the progress-bar policy, and
a CLI run (trainers.sample --sampler mala on a tiny JEM) whose whole output is keras-jem's own."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests import testing
from trainers import console

# What must never reach the user by default: absl's C++ log lines and Python UserWarnings.
NOISE = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|UserWarning", re.MULTILINE)


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


class ProgressVerbosityTest(testing.TestCase):
    def test_policy(self):
        self.assertEqual(console.progress_verbosity(stream=_Stream(True)), 1)
        self.assertEqual(console.progress_verbosity(stream=_Stream(False)), 2)
        self.assertEqual(console.progress_verbosity("auto", stream=io.BytesIO()), 2)
        self.assertEqual(console.progress_verbosity("0", stream=_Stream(True)), 0)
        self.assertEqual(console.progress_verbosity(2, stream=_Stream(True)), 2)
        with self.assertRaisesRegex(ValueError, "Received: verbose='loud'"):
            console.progress_verbosity("loud")


class FilterTest(testing.TestCase):
    def test_absl_lines_are_noise_and_the_rest_is_kept(self):
        captured = [
            ("WARNING: All log messages before absl::InitializeLog() is called are written to "
            "STDERR\n"),
            "I0000 00:00:1796225318.342682    6325 port.cc:153] oneDNN custom operations are on.\n",
            "W0000 00:00:1796225318.3    6325 some.cc:1] a warning\n",
            "E0000 00:00:1796225331.254501    6325 cuda_platform.cc:52] failed call to cuInit\n",
            "To enable the following instructions: AVX2 FMA, in other operations, rebuild.\n",
            "Traceback (most recent call last):\n",
            "ImportError: libfoo.so: cannot open shared object file\n",
        ]
        kept = [line for line in captured if not console._is_noise(line)]
        self.assertEqual(kept, captured[-2:])

    def test_users_own_level_and_verbose_are_respected(self):
        saved = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
        try:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
            self.assertFalse(console.setup())
            self.assertEqual(os.environ["TF_CPP_MIN_LOG_LEVEL"], "0")
            del os.environ["TF_CPP_MIN_LOG_LEVEL"]
            self.assertFalse(console.setup(verbose=True))
            self.assertNotIn("TF_CPP_MIN_LOG_LEVEL", os.environ)
            self.assertTrue(console.setup())
            self.assertEqual(os.environ["TF_CPP_MIN_LOG_LEVEL"], "3")
        finally:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
            if saved is not None:
                os.environ["TF_CPP_MIN_LOG_LEVEL"] = saved


class QuietCLITest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model_dir = tempfile.mkdtemp(prefix="console_jem_")
        images, labels = testing.load_digits("train", 64)
        model = testing.make_model(adapt=(images, labels))
        model.save(os.path.join(cls.model_dir, "model.keras"))
        with open(os.path.join(cls.model_dir, "config.json"), "w") as f:
            json.dump({"model": "jem", "dataset": "digits"}, f)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.model_dir, ignore_errors=True)
        super().tearDownClass()

    def run_sample(self, *extra):
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        env["PYTHONPATH"] = testing.REPO + os.pathsep + env.get("PYTHONPATH", "")
        output = os.path.join(self.model_dir, "mala.png")
        command = [sys.executable, "-m", "trainers.sample", "--model_dir", self.model_dir,
                   "--task", "cond", "--labels", "1,7", "--num_samples", "2", "--sampler",
                   "mala", "--num_steps", "12", "--num_adaptation_steps", "4",
                   "--output", output, *extra]
        result = subprocess.run(command, cwd=testing.REPO, env=env, capture_output=True,
                                text=True, timeout=300, check=False)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        return result

    def test_default_run_prints_only_keras_jem_lines(self):
        result = self.run_sample()
        self.assertIsNone(NOISE.search(result.stdout + result.stderr), result.stderr)
        for line in result.stderr.splitlines():
            self.assertTrue(line.startswith("[trainers.sample] "), line)
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertEqual(summary["sampler"], "mala")
        self.assertEqual(summary["mala"]["num_adaptation_steps"], 4)
        self.assertAllInRange([summary["acceptance_rate"]], 0.0, 1.0)
        self.assertIn("MALA acceptance rate", result.stderr)
        self.assertTrue(os.path.isfile(summary["output"]))

    @pytest.mark.large
    def test_verbose_shows_tensorflow_lines(self):
        # The same run with --verbose: TensorFlow's lines exist here, so the quiet run's
        # silence is the console's doing, not the machine's.
        result = self.run_sample("--verbose")
        self.assertRegex(result.stderr, re.compile(r"^[IWE]0000 ", re.MULTILINE))

    def test_mala_on_other_tasks_is_bad_input(self):
        from trainers import sample

        parser = sample.build_parser()
        args = parser.parse_args(["--model_dir", self.model_dir, "--task", "inpaint",
                                  "--sampler", "mala"])
        with self.assertRaisesRegex(sample.SampleError, "uncond or cond only"):
            sample.validate_args(args)
        args = parser.parse_args(["--model_dir", self.model_dir, "--task", "cond", "--sampler",
                                  "mala", "--num_steps", "10", "--num_adaptation_steps", "10"])
        with self.assertRaisesRegex(sample.SampleError, "num_adaptation_steps"):
            sample.validate_args(args)
