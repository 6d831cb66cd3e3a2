"""The `tf.Example`s of the `classify` endpoint: building them, and parsing them in the graph.

An example holds one image, as a float list of H*W*C values in [-1, 1] under the export's
`image_feature_key`, or as encoded PNG / JPEG / BMP bytes under `image/encoded`, whose size is
read from the header (`encoded_image_size`) and bounded before anything is decoded.
"""

import numpy as np
import tensorflow as tf

ENCODED_IMAGE_FEATURE_KEY = "image/encoded"
DEFAULT_MAX_ENCODED_IMAGE_SIZE = 4096


def make_example(image, image_feature_key="image"):
    """Build the `tf.train.Example` that the `classify` endpoint expects for one image.

    Args:
        image: float array `(H, W, C)` in [-1, 1], or `bytes` of an encoded PNG/JPEG image (stored
            under "image/encoded").
        image_feature_key: the feature key the export was made with.

    Returns:
        A `tf.train.Example`.
    """
    if isinstance(image, (bytes, bytearray)):
        feature = {
            ENCODED_IMAGE_FEATURE_KEY: tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[bytes(image)])
            )
        }
    else:
        values = np.asarray(image, dtype=np.float32).reshape(-1)
        feature = {
            image_feature_key: tf.train.Feature(float_list=tf.train.FloatList(value=values))
        }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def check_max_size(max_encoded_image_size):
    """`max_encoded_image_size` (int or pair) -> (max_height, max_width) positive ints."""
    size = max_encoded_image_size
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(pair) != 2 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in pair
    ):
        raise ValueError(
            "`max_encoded_image_size` must be a positive int or a pair (max_height, max_width) "
            f"of positive ints. Received: {max_encoded_image_size!r}"
        )
    return int(pair[0]), int(pair[1])


def encoded_image_size(contents):
    """(height, width) int64 of an encoded PNG, JPEG or BMP image, read from its header.

    Nothing is decoded: PNG's IHDR chunk and BMP's info header are read with
    `tf.strings.substr` + `tf.io.decode_raw`, JPEG's frame header with
    `tf.image.extract_jpeg_shape`. Any other format (GIF, WebP, garbage) gives (-1, -1).
    Written by hand because TensorFlow has no header reader for PNG and BMP.
    """
    padded = tf.strings.substr(contents + tf.constant(b"\0" * 32), 0, 32)
    header = tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)

    def big_endian(offset, size):
        value = tf.constant(0, tf.int64)
        for i in range(size):
            value = value * 256 + header[offset + i]
        return value

    def little_endian(offset, size):
        value = tf.constant(0, tf.int64)
        for i in reversed(range(size)):
            value = value * 256 + header[offset + i]
        return value

    def signed32(value):
        return tf.where(value >= 2**31, value - 2**32, value)

    png_signature = tf.constant([137, 80, 78, 71, 13, 10, 26, 10, 0, 0, 0, 13, 73, 72, 68, 82],
                                tf.int64)  # 8-byte signature, then IHDR's length and type
    is_png = tf.reduce_all(tf.equal(header[:16], png_signature))
    is_bmp = tf.logical_and(tf.equal(header[0], 66), tf.equal(header[1], 77))  # "BM"
    is_jpeg = tf.io.is_jpeg(contents)

    def jpeg_size():
        shape = tf.cast(tf.image.extract_jpeg_shape(contents), tf.int64)
        return tf.stack([shape[0], shape[1]])

    def header_size():
        png = tf.stack([big_endian(20, 4), big_endian(16, 4)])
        bmp = tf.stack([tf.abs(signed32(little_endian(22, 4))), signed32(little_endian(18, 4))])
        unknown = tf.constant([-1, -1], tf.int64)
        return tf.where(is_png, png, tf.where(is_bmp, bmp, unknown))

    size = tf.cond(is_jpeg, jpeg_size, header_size)
    return size[0], size[1]


def parse_examples(serialized, image_shape, image_size, image_feature_key, max_size):
    """Serialized `tf.Example` vector -> float32 images `(batch, H, W, C)` in [-1, 1]."""
    height, width, channels = image_shape
    features = tf.io.parse_example(
        serialized,
        {
            image_feature_key: tf.io.RaggedFeature(tf.float32),
            ENCODED_IMAGE_FEATURE_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
        },
    )
    pixels = features[image_feature_key]
    encoded = features[ENCODED_IMAGE_FEATURE_KEY]
    lengths = pixels.row_lengths()
    has_encoded = tf.strings.length(encoded) > 0
    valid = tf.logical_or(
        tf.equal(lengths, image_size), tf.logical_and(tf.equal(lengths, 0), has_encoded)
    )
    check = tf.debugging.Assert(
        tf.reduce_all(valid),
        [
            (
                f"Each tf.Example must hold either a float_list '{image_feature_key}' of exactly "
                f"{image_size} values (H*W*C = {height}*{width}*{channels}, row-major, in "
                f"[-1, 1]) or the encoded image bytes under '{ENCODED_IMAGE_FEATURE_KEY}'. "
                "Received float counts:"
            ),
            lengths,
        ],
        summarize=16,
    )
    with tf.control_dependencies([check]):
        dense = pixels.to_tensor(shape=[None, image_size])
        dense = tf.reshape(dense, [-1, height, width, channels])

    max_height, max_width = max_size

    def decode_one(contents):
        def decode():
            encoded_height, encoded_width = encoded_image_size(contents)
            known = tf.logical_and(encoded_height > 0, encoded_width > 0)
            check_format = tf.debugging.Assert(
                known,
                [
                    (
                        f"The '{ENCODED_IMAGE_FEATURE_KEY}' bytes are not a PNG, JPEG or BMP "
                        "image with a valid header (GIF is refused: its header does not bound "
                        "the frames decoded). Convert the image to PNG or JPEG."
                    )
                ],
            )
            check_size = tf.debugging.Assert(
                tf.logical_and(encoded_height <= max_height, encoded_width <= max_width),
                [
                    (
                        "The encoded image is larger than this model accepts (at most "
                        f"{max_height} x {max_width} pixels, set at export with "
                        "max_encoded_image_size); resize it before sending. Received height, "
                        "width:"
                    ),
                    encoded_height,
                    encoded_width,
                ],
            )
            with tf.control_dependencies([check_format, check_size]):
                checked = tf.identity(contents)
            image = tf.io.decode_image(
                checked, channels=channels, dtype=tf.uint8, expand_animations=False
            )
            image = tf.image.resize(tf.cast(image, tf.float32), [height, width], antialias=True)
            return tf.reshape(image / 127.5 - 1.0, [height, width, channels])

        return tf.cond(
            tf.strings.length(contents) > 0,
            decode,
            lambda: tf.zeros([height, width, channels], tf.float32),
        )

    def with_decoded():
        decoded = tf.map_fn(
            decode_one,
            encoded,
            fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32),
        )
        return tf.where(has_encoded[:, tf.newaxis, tf.newaxis, tf.newaxis], decoded, dense)

    return tf.cond(tf.reduce_any(has_encoded), with_decoded, lambda: dense)
