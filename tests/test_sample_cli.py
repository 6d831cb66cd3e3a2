"""`python -m trainers.sample` end to end on a tiny conditional IGEBM trained on digits."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
from PIL import Image

from keras_jem import sampling
from keras_jem.backbones import SNResNet
from keras_jem.models.igebm import IGEBM
from tests import testing
from trainers import sample as sample_cli


def run_cli(*argv):
    """Runs `trainers.sample.main` in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sample_cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


class SampleCLITest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Train a tiny model with model.fit and write the trainers.fit layout by hand.
        keras.utils.set_random_seed(0)
        cls.model_dir = tempfile.mkdtemp(prefix="igebm_digits_")
        images, labels = testing.load_digits("train", 64)
        model = IGEBM(
            SNResNet(filters=8, num_blocks=1, num_classes=10), buffer_size=100, seed=0,
            sampler=sampling.SGLD(1, 10.0, 0.005, 0.01, (-1.0, 1.0)),
        )
        model.compile(optimizer=keras.optimizers.Adam(3e-4, beta_1=0.0))
        # Built first, as trainers/fit.py does: fit then traces its step once, not twice.
        model.build((None, 8, 8, 1))
        model.optimizer.build(model.trainable_variables)
        model.fit(images, labels, batch_size=32, epochs=1, steps_per_epoch=2, verbose=0)
        model.save(os.path.join(cls.model_dir, "model.keras"))
        cls.test_images = testing.load_digits("test", 8)[0]
        cls.logits = testing.to_numpy(model(cls.test_images))
        config = {"model": "igebm", "dataset": "digits", "image_shape": [8, 8, 1],
                  "num_classes": 10, "data_dir": None}
        with open(os.path.join(cls.model_dir, "config.json"), "w") as f:
            json.dump(config, f)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.model_dir, ignore_errors=True)
        super().tearDownClass()

    def png_shape(self, path):
        with Image.open(path) as image:
            return image.size[1], image.size[0]  # rows, cols

    def test_compose_in_a_fresh_process(self):
        output = os.path.join(self.model_dir, "compose.png")
        env = dict(os.environ, PYTHONPATH=testing.REPO, TF_CPP_MIN_LOG_LEVEL="3")
        result = subprocess.run(
            [sys.executable, "-m", "trainers.sample", "--model_dir", self.model_dir,
             "--task", "compose", "--labels", "3,8", "--num_samples", "4", "--num_steps", "10",
             "--output", output],
            cwd=testing.REPO, env=env, capture_output=True, text=True, timeout=240, check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertEqual(summary["labels"], [3, 8])
        self.assertLess(summary["summed_energy_composed"], summary["summed_energy_start"])
        # Rows: label 3, label 8, both; 4 columns of 32x32 tiles with 1-pixel padding.
        self.assertEqual(self.png_shape(output), (3 * 33 - 1, 4 * 33 - 1))

    def test_tasks_in_process(self):
        for task, extra, rows, cols in (
            ("uncond", ["--num_samples", "6"], 2, 3),
            ("cond", ["--labels", "1,7", "--num_samples", "3"], 2, 3),
            ("inpaint", ["--num_samples", "5", "--mask", "left"], 3, 5),
            ("denoise", ["--num_samples", "4", "--num_rounds", "2", "--conditional"], 3, 4),
        ):
            code, out, err = run_cli("--model_dir", self.model_dir, "--task", task,
                                     "--num_steps", "2", *extra)
            self.assertEqual(code, 0, err)
            summary = json.loads(out.strip().splitlines()[-1])
            path = os.path.join(self.model_dir, f"samples_{task}.png")
            self.assertEqual(summary["output"], path)
            self.assertEqual(self.png_shape(path), (rows * 33 - 1, cols * 33 - 1), task)
            if task == "inpaint":
                self.assertTrue(summary["unmasked_identical"])
            if task == "denoise":
                self.assertIn("mse_denoised", summary)
        # The loaded model is the saved one.
        loaded = sample_cli.load_model(os.path.join(self.model_dir, "model.keras"))
        np.testing.assert_array_equal(testing.to_numpy(loaded(self.test_images)), self.logits)

    def test_ensemble_of_backups(self):
        """--checkpoints N restores the N newest backups; the summed energy is their sum."""
        from keras_jem import checkpointing
        from keras_jem import data
        from trainers import fit
        from trainers import presets

        run_dir = tempfile.mkdtemp(prefix="igebm_backups_")
        self.addCleanup(shutil.rmtree, run_dir, True)
        config = presets.resolve("igebm", "digits", {"sn_filters": "8", "buffer_size": 100,
                                                     "num_steps": 2})
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config, f)
        model = fit.build(config, data.get_info("digits"), steps_per_epoch=1)
        backup = checkpointing.StepBackup(os.path.join(run_dir, "backup"), keep=3)
        rng = np.random.default_rng(0)
        x = self.test_images[:4]
        energies = []
        for step in (10, 20, 30):
            model.set_weights([w + 0.05 * rng.normal(size=w.shape).astype(w.dtype)
                               if w.dtype.kind == "f" else w for w in model.get_weights()])
            backup.global_step = step
            backup.save(model)
            energies.append(testing.to_numpy(model.energy(x, y=np.full(4, 3))))
        models, steps = sample_cli.load_checkpoints(run_dir, config, 2)
        self.assertEqual(steps, [20, 30])  # newest last
        from keras_jem import generation

        np.testing.assert_allclose(
            testing.to_numpy(generation.EnergySum(models).energy(x, np.full(4, 3, np.int32))),
            energies[1] + energies[2], rtol=1e-5)
        code, out, err = run_cli("--model_dir", run_dir, "--task", "ensemble", "--checkpoints",
                                 "2", "--labels", "3,5", "--num_samples", "3",
                                 "--num_steps", "5")
        self.assertEqual(code, 0, err)
        summary = json.loads(out.strip().splitlines()[-1])
        self.assertEqual((summary["num_models"], summary["checkpoint_steps"]), (2, [20, 30]))
        self.assertLess(summary["ensemble_energy_ensemble"], summary["ensemble_energy_start"])
        # Rows: newest model (labels 3, 5), then the ensemble; 3 columns.
        self.assertEqual(self.png_shape(summary["output"]), (4 * 33 - 1, 3 * 33 - 1))
        code, _, err = run_cli("--model_dir", run_dir, "--task", "ensemble", "--checkpoints",
                               "4")
        self.assertEqual(code, 2)
        self.assertIn("holds 3 readable backup(s)", err)

    def test_backups_of_a_run_older_than_its_flags(self):
        """A config.json written before buffer_type / noise_first existed still restores."""
        from keras_jem import checkpointing
        from keras_jem import data
        from trainers import fit
        from trainers import presets

        run_dir = tempfile.mkdtemp(prefix="igebm_old_")
        self.addCleanup(shutil.rmtree, run_dir, True)
        config = presets.resolve("igebm", "digits", {
            "sn_filters": "8", "buffer_size": 100, "num_steps": 2,
            "buffer_type": "persistent", "noise_first": False})  # what such a run had
        model = fit.build(config, data.get_info("digits"), steps_per_epoch=1)
        backup = checkpointing.StepBackup(os.path.join(run_dir, "backup"))
        backup.global_step = 7
        backup.save(model)
        old = {k: v for k, v in config.items() if k not in ("buffer_type", "noise_first")}
        models, steps = sample_cli.load_checkpoints(run_dir, old, 1)
        self.assertEqual(steps, [7])
        self.assertEqual(type(models[0].buffer).__name__, "ReplayBuffer")
        self.assertFalse(models[0].sampler.noise_first)
        x = self.test_images[:4]
        np.testing.assert_allclose(testing.to_numpy(models[0].energy(x)),
                                   testing.to_numpy(model.energy(x)), rtol=1e-6)

    def test_ensemble_of_model_files(self):
        path = os.path.join(self.model_dir, "model.keras")
        code, out, err = run_cli("--model_dir", self.model_dir, "--task", "ensemble",
                                 "--model_files", f"{path},{path}", "--num_samples", "4",
                                 "--num_steps", "3")
        self.assertEqual(code, 0, err)
        summary = json.loads(out.strip().splitlines()[-1])
        self.assertEqual(summary["num_models"], 2)
        self.assertLess(summary["ensemble_energy_ensemble"], summary["ensemble_energy_start"])

    def test_bad_input_exits_with_code_2(self):
        missing = os.path.join(self.model_dir, "missing")
        for argv, message in (
            (["--model_dir", missing, "--task", "uncond"], "does not exist"),
            (["--model_dir", self.model_dir, "--task", "compose", "--labels", "3"],
             "at least two labels"),
            (["--model_dir", self.model_dir, "--task", "cond", "--labels", "3,x"], "integers"),
            (["--model_dir", self.model_dir, "--task", "cond", "--labels", "3,12"],
             "not classes"),
            (["--model_dir", self.model_dir, "--task", "inpaint", "--from_buffer"],
             "uncond or cond"),
            (["--model_dir", self.model_dir, "--task", "ensemble"], "--checkpoints N"),
            (["--model_dir", self.model_dir, "--task", "ensemble", "--model_files", "nope.keras"],
             "Missing: ['nope.keras']"),
            (["--model_dir", self.model_dir, "--task", "cond", "--checkpoints", "2"],
             "apply to --task ensemble only"),
        ):
            code, _, err = run_cli(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(message, err)
