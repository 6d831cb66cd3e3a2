"""Export a trained model as a TensorFlow Serving SavedModel.

The export holds only what inference needs: the variables read by the forward pass. The replay
buffer (`model.buffer.images`, easily hundreds of MB) and optimizer state are left out, because the
SavedModel is written through `keras.export.ExportArchive` from endpoint functions, never from the
whole model (`model.export()` and `tf.saved_model.save(model)` would save every variable, and the
latter does not load in the session-style loader that TF Serving's C++ server uses).

Layout written by `export_serving_model(model, "models/jem")`:

```
models/jem/1/saved_model.pb
             variables/
             assets.extra/tf_serving_warmup_requests   (TFRecord of PredictionLog)
             assets.extra/keras_jem_export.json        (what was exported, for humans)
```

Endpoints (SignatureDefs):

- `serving_default`: `images` float32 `(batch, H, W, C)` in [-1, 1] -> `logits` float32
  `(batch, K)`, `probabilities` float32 `(batch, K)`, `classes` int64 `(batch,)`.
- `classify`: the TF Serving Classify contract. One input `inputs`: a string vector of serialized
  `tf.Example`s, each holding the image under `image_feature_key` ("image" by default) as a
  `float_list` of H*W*C values in [-1, 1] (row-major HWC order), or under `image/encoded` as PNG /
  JPEG / BMP bytes (decoded, resized to H x W, brought to C channels and scaled to [-1, 1]).
  Before decoding, the graph reads the image's size from its header (`tf.image.extract_jpeg_shape`,
  the PNG IHDR chunk, the BMP header) and refuses with `InvalidArgument` anything larger than
  `max_encoded_image_size` (4096 x 4096 by default), so a 250 KB PNG declaring 16000 x 16000
  pixels is never decoded, in this project's server or in TF Serving's. GIF is refused: its
  header does not say how many frames `decode_image` would decode.
  Outputs `classes` string `(batch, K)` (the class names, in class-index order) and `scores`
  float32 `(batch, K)` (the probabilities of those classes).
- `ood_score`: `images` -> `log_px` (logsumexp of the logits, log p(x) up to a constant; higher is
  more in-distribution), `max_softmax` (higher is more in-distribution), `energy`
  (`model.energy(x)`; lower is more in-distribution), and, when the export was given
  `ood_threshold`, `is_ood` bool (`log_px < ood_threshold`).

Every endpoint rejects non-finite pixels with an `InvalidArgument` error, in any server.

The package's modules:

- `serving_model`: `export_serving_model` (a versioned, atomically published SavedModel) and
  `list_versions`.
- `archive`: `build_export_archive`, the three endpoints over the model.
- `examples`: the `tf.Example` contract of `classify`: `make_example`, the in-graph parsing and
  the encoded-image header reader `encoded_image_size`.
- `warmup`: `write_warmup_requests`.
"""

from keras_jem.export.archive import CLASSIFY
from keras_jem.export.archive import OOD_SCORE
from keras_jem.export.archive import SERVING_DEFAULT
from keras_jem.export.archive import build_export_archive
from keras_jem.export.examples import DEFAULT_MAX_ENCODED_IMAGE_SIZE
from keras_jem.export.examples import ENCODED_IMAGE_FEATURE_KEY
from keras_jem.export.examples import encoded_image_size
from keras_jem.export.examples import make_example
from keras_jem.export.serving_model import EXPORT_INFO_FILENAME
from keras_jem.export.serving_model import export_serving_model
from keras_jem.export.serving_model import list_versions
from keras_jem.export.warmup import WARMUP_FILENAME
from keras_jem.export.warmup import write_warmup_requests

__all__ = [
    "build_export_archive",
    "export_serving_model",
    "list_versions",
    "make_example",
    "write_warmup_requests",
]
