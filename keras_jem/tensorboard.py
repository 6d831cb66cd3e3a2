"""TensorBoard as the place to look: sample grids next to the training scalars, and the
evaluation's figures (reliability diagram, OOD histograms, sample grids) as images.

- `TrainingSummaries`: a Keras callback writing, every epoch, the logged scalars (losses,
  accuracy, energies of data and samples, the divergence flag; `val_*` under `validation/`) and a
  grid of the model's samples as `tf.summary.image`, in the layout of
  `keras.callbacks.TensorBoard` (`<log_dir>/train`, `<log_dir>/validation`, tags `epoch_<name>`,
  step = epoch index), so it can replace that callback.
- `write_figure`, `write_png`, `write_image_grid`, `write_scalars`: one summary each.
- `write_evaluation`: every figure and number of an evaluation report at once.

Example:

>>> model.fit(ds, epochs=10, callbacks=[TrainingSummaries("runs/jem/logs")])
>>> write_evaluation("runs/jem/logs", figures={"calibration/reliability": "eval/rel.png"},
...                  scalars={"accuracy": 0.93})
>>> # tensorboard --logdir runs/jem/logs
"""

import io
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_jem.metrics import images as image_lib


def _writer(log_dir, run):
    return tf.summary.create_file_writer(os.path.join(os.fspath(log_dir), run))


def _as_batch(image):
    """uint8 or float image (h, w[, c]) or batch (k, h, w, c) -> float32 batch in [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            "An image summary needs (height, width), (height, width, channels) or a batch "
            f"(k, height, width, channels) with 1, 3 or 4 channels. Received shape {image.shape}"
        )
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def _write_image(log_dir, tag, image, step, run):
    writer = _writer(log_dir, run)
    with writer.as_default():
        tf.summary.image(tag, _as_batch(image), step=int(step))
    writer.flush()


def write_png(log_dir, tag, path, step=0, run="evaluation"):
    """Writes the PNG file at `path` as an image summary `tag` of `<log_dir>/<run>`."""
    with open(path, "rb") as f:
        image = tf.io.decode_png(f.read()).numpy()
    _write_image(log_dir, tag, image, step, run)


def write_figure(log_dir, tag, figure, step=0, run="evaluation", dpi=None):
    """Writes a matplotlib `figure` as an image summary `tag` of `<log_dir>/<run>`."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    image = tf.io.decode_png(buffer.getvalue()).numpy()
    _write_image(log_dir, tag, image, step, run)


def write_image_grid(log_dir, tag, images, step=0, run="evaluation", num_cols=None):
    """Writes a grid of `images` (in [-1, 1], `(n, h, w, c)`) as one image summary."""
    grid = image_lib.make_grid(np.asarray(images), num_cols=num_cols)
    _write_image(log_dir, tag, grid, step, run)


def write_scalars(log_dir, scalars, step=0, run="evaluation"):
    """Writes `{tag: number}` as scalar summaries; values that are not finite numbers are skipped.

    Returns:
        The tags written.
    """
    written = []
    writer = _writer(log_dir, run)
    with writer.as_default():
        for tag, value in scalars.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if np.isfinite(value):
                tf.summary.scalar(tag, value, step=int(step))
                written.append(tag)
    writer.flush()
    return written


def flatten_numbers(report, prefix=""):
    """`{"ood": {"svhn": {"auroc": 0.9}}}` -> `{"ood/svhn/auroc": 0.9}` (numbers only)."""
    flat = {}
    for key, value in report.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_numbers(value, tag + "/"))
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            flat[tag] = float(value)
    return flat


def find_figures(report, directory, prefix=""):
    """`{tag: path}` of every `"figures": {name: file}` entry of a nested report.

    The tag is the path of keys to the entry and the figure's name, e.g.
    `calibration/reliability_diagram`; relative files are taken from `directory`.
    """
    found = {}
    for key, value in report.items():
        if key == "figures" and isinstance(value, dict):
            for name, path in value.items():
                if isinstance(path, str) and path.endswith(".png"):
                    found[f"{prefix}{name}"] = os.path.join(directory, path)
        elif isinstance(value, dict):
            found.update(find_figures(value, directory, f"{prefix}{key}/"))
    return found


def write_evaluation(log_dir, figures=None, scalars=None, step=0, run="evaluation"):
    """Writes an evaluation's figures and numbers to `<log_dir>/<run>`.

    Args:
        log_dir: the TensorBoard directory (`trainers.evaluate --tensorboard_dir`).
        figures: `{tag: PNG path or matplotlib Figure}`, e.g. from `find_figures(report, dir)`.
        scalars: `{tag: number}` (nested dicts are flattened to `a/b/c` tags); non-numbers are
            skipped.
        step: the summary step (e.g. the training epoch of the evaluated checkpoint).
        run: the run name under `log_dir`.

    Returns:
        `{"images": [tags], "scalars": [tags]}`.
    """
    images = []
    for tag, figure in (figures or {}).items():
        if isinstance(figure, (str, os.PathLike)):
            if not os.path.isfile(figure):
                raise FileNotFoundError(
                    f"Figure {tag!r}: no PNG at {os.fspath(figure)!r}. Pass existing PNG paths "
                    "or matplotlib figures."
                )
            write_png(log_dir, tag, figure, step=step, run=run)
        else:
            write_figure(log_dir, tag, figure, step=step, run=run)
        images.append(tag)
    written = write_scalars(log_dir, flatten_numbers(scalars or {}), step=step, run=run)
    return {"images": images, "scalars": written}


class TrainingSummaries(keras.callbacks.Callback):
    """Epoch scalars and a sample grid of a JEM-family model, written for TensorBoard.

    Every `every` epochs, the grid is `keras_jem.callbacks.SampleGrid`'s: the model's
    replay-buffer chains, the most confident per predicted class, one row per class, or with
    `from_buffer=False` fresh class-conditional samples of `num_steps` steps from noise. Its PNG
    goes to `sample_dir` (a temporary directory when None) and the same image to TensorBoard as
    tag `samples` in `<log_dir>/train`. The scalars are `epoch_<name>` for every logged value
    (`epoch_loss`, `epoch_accuracy`, `epoch_energy_data`, `epoch_energy_samples`,
    `epoch_diverged`, ...), `val_*` ones in `<log_dir>/validation`, at step = epoch index, as
    `keras.callbacks.TensorBoard` writes them (use one or the other for the scalars:
    `write_scalars=False` next to Keras' callback). The grid's step is the epoch index too, so
    the image slider lines up with the scalar charts.

    Args:
        log_dir: the TensorBoard directory.
        samples: write the sample grid (False for models that draw no samples, e.g. softmax).
        sample_dir: where the grid PNGs (`epoch_XXX.png`) are kept; None: not kept.
        num_per_class: images per class row.
        every: epoch frequency of the grid.
        from_buffer: buffer chains (True, one forward pass) or fresh chains (False).
        num_steps: sampler steps of fresh chains (default: the model's sampler).
        write_scalars: write the epoch scalars.
        seed: seed of the buffer subset / the fresh chains.

    Example:

    >>> callback = TrainingSummaries("runs/jem/logs", sample_dir="runs/jem/samples")
    >>> model.fit(train_ds, epochs=10, callbacks=[callback])
    """

    def __init__(self, log_dir, samples=True, sample_dir=None, num_per_class=8, every=1,
                 from_buffer=True, num_steps=None, write_scalars=True, seed=0):
        super().__init__()
        from keras_jem import callbacks

        self.log_dir = os.fspath(log_dir)
        self.samples = bool(samples)
        self.write_scalars = bool(write_scalars)
        self._temporary = None
        if samples and sample_dir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="keras_jem_grid_")
            sample_dir = self._temporary.name
        self.grid = callbacks.SampleGrid(sample_dir, num_per_class=num_per_class, every=every,
                                         from_buffer=from_buffer, num_steps=num_steps, seed=seed)
        self._writers = {}

    def _writer(self, run):
        if run not in self._writers:
            self._writers[run] = _writer(self.log_dir, run)
        return self._writers[run]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.write_scalars:
            for name, value in logs.items():
                run = "validation" if name.startswith("val_") else "train"
                tag = "epoch_" + (name[4:] if run == "validation" else name)
                with self._writer(run).as_default():
                    tf.summary.scalar(tag, float(value), step=epoch)
        if self.samples:
            self.grid.set_model(self.model)
            self.grid.last_path = None
            self.grid.on_epoch_end(epoch, logs)
            if self.grid.last_path is not None:
                with open(self.grid.last_path, "rb") as f:
                    image = tf.io.decode_png(f.read()).numpy()
                with self._writer("train").as_default():
                    tf.summary.image("samples", _as_batch(image), step=epoch)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
