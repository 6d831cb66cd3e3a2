"""keras_jem.tensorboard: summaries written, then read back from the event files."""

import glob
import io
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from keras_jem import tensorboard
from keras_jem.metrics import _figures
from tests import testing


def read_events(directory):
    """{tag: [(step, kind, value)]} from every event file of `directory` (one run)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                array = tf.make_ndarray(value.tensor)
                if plugin == "images":
                    width, height = int(array[0]), int(array[1])
                    pixels = np.asarray(Image.open(io.BytesIO(array[2])))
                    self_check = pixels.shape[:2] == (height, width)
                    found.setdefault(value.tag, []).append(
                        (event.step, "image", (height, width, self_check, pixels)))
                else:
                    found.setdefault(value.tag, []).append((event.step, plugin, float(array)))
    return found


class TrainingSummariesTest(testing.TestCase):
    def test_fit_writes_scalars_and_sample_grids(self):
        images, labels = testing.load_digits(num_examples=32)
        model = testing.make_model(buffer_size=100, seed=3)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        with tempfile.TemporaryDirectory() as directory:
            log_dir = os.path.join(directory, "logs")
            sample_dir = os.path.join(directory, "samples")
            callback = tensorboard.TrainingSummaries(log_dir, sample_dir=sample_dir,
                                                     num_per_class=4)
            history = model.fit(images, labels, batch_size=16, epochs=2, verbose=0,
                                validation_data=(images[:16], labels[:16]),
                                callbacks=[callback])
            train = read_events(os.path.join(log_dir, "train"))
            validation = read_events(os.path.join(log_dir, "validation"))
            with Image.open(os.path.join(sample_dir, "epoch_002.png")) as png:
                last_png = np.asarray(png)
        for name in ("loss", "accuracy", "energy_data", "energy_samples", "diverged"):
            entries = train[f"epoch_{name}"]
            self.assertEqual([step for step, _, _ in entries], [0, 1])
            self.assertEqual(entries[0][1], "scalars")
            self.assertAllClose([value for _, _, value in entries], history.history[name],
                                rtol=1e-6)
        self.assertAllClose([v for _, _, v in validation["epoch_accuracy"]],
                            history.history["val_accuracy"])
        self.assertNotIn("epoch_val_accuracy", train)
        grids = train["samples"]
        self.assertEqual([step for step, _, _ in grids], [0, 1])
        height, width, consistent, pixels = grids[-1][2]
        self.assertTrue(consistent)
        # 10 class rows of 4 tiles: 8x8 digits upscaled to 32 pixels, 1-pixel padding between tiles.
        self.assertEqual((height, width), (10 * 33 - 1, 4 * 33 - 1))
        self.assertAllEqual(pixels.reshape(last_png.shape), last_png)

    def test_no_samples(self):
        model = testing.make_model(buffer_size=100)
        with tempfile.TemporaryDirectory() as log_dir:
            callback = tensorboard.TrainingSummaries(log_dir, samples=False)
            callback.set_model(model)
            callback.on_epoch_end(4, {"loss": 1.5, "accuracy": 0.25})
            callback.on_train_end()
            train = read_events(os.path.join(log_dir, "train"))
        self.assertEqual(sorted(train), ["epoch_accuracy", "epoch_loss"])
        self.assertEqual(train["epoch_loss"], [(4, "scalars", 1.5)])


class EvaluationSummariesTest(testing.TestCase):
    def test_figures_grids_and_numbers(self):
        figure, axes = _figures.new_figure(figsize=(3.0, 2.0), dpi=50)
        axes.plot([0, 1], [1, 0])
        with tempfile.TemporaryDirectory() as directory:
            png = os.path.join(directory, "ood_histogram.png")
            Image.fromarray(np.full((20, 30), 200, np.uint8)).save(png)
            report = {"calibration": {"ece": 0.031, "figures": {"reliability_diagram":
                                                                 "reliability.png"}},
                      "ood": {"svhn": {"auroc": 0.9, "name": "svhn", "flag": True},
                              "figures": {"histogram": "ood_histogram.png"}},
                      "accuracy": 0.97}
            figures = tensorboard.find_figures(report, directory)
            self.assertEqual(figures, {
                "calibration/reliability_diagram": os.path.join(directory, "reliability.png"),
                "ood/histogram": png})
            with self.assertRaisesRegex(FileNotFoundError, "reliability.png"):
                tensorboard.write_evaluation(directory, figures=figures)
            log_dir = os.path.join(directory, "tb")
            written = tensorboard.write_evaluation(
                log_dir, figures={"ood/histogram": png, "calibration/reliability": figure},
                scalars=report, step=7)
            tensorboard.write_image_grid(log_dir, "samples", -np.ones((6, 8, 8, 1)), step=7,
                                         num_cols=3)
            events = read_events(os.path.join(log_dir, "evaluation"))
        self.assertEqual(sorted(written["scalars"]),
                         ["accuracy", "calibration/ece", "ood/svhn/auroc"])
        (step, kind, value), = events["ood/svhn/auroc"]
        self.assertEqual((step, kind), (7, "scalars"))
        self.assertAllClose(value, 0.9)
        self.assertEqual(events["ood/histogram"][0][2][:3], (20, 30, True))
        self.assertAllEqual(events["ood/histogram"][0][2][3], np.full((20, 30), 200))
        self.assertEqual(events["calibration/reliability"][0][2][:2], (100, 150))  # 3x2 in, 50 dpi
        self.assertEqual(events["samples"][0][2][:2], (2 * 33 - 1, 3 * 33 - 1))
        self.assertEqual({step for entries in events.values() for step, _, _ in entries}, {7})

    def test_bad_image(self):
        with tempfile.TemporaryDirectory() as log_dir, self.assertRaisesRegex(
                ValueError, "Received shape"):
            tensorboard._write_image(log_dir, "x", np.zeros((2, 3, 4, 5)), 0, "evaluation")
