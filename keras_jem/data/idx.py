"""Reading IDX files, the format of MNIST and Fashion-MNIST (gzipped or not).

No maintained library in our dependencies reads IDX (`keras.datasets.*.load_data` parse it
inline with fixed offsets and no checks, TFDS only through its own download pipeline), and the
format is 4 header bytes, big-endian dimensions and raw data, so it is parsed here with numpy,
with the checks that turn a corrupt or mismatched file into a clear error.

Format (http://yann.lecun.com/exdb/mnist/): bytes 0-1 are zero, byte 2 the data type
(0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), byte 3 the number
of dimensions, then one big-endian uint32 per dimension, then the data, big-endian, row major.
"""

import gzip
import os
import zlib

import numpy as np

IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """Raised when a file is not a well-formed IDX file (or not the IDX file expected)."""


def read_idx(path, expected_shape=None):
    """Reads an IDX file (plain or gzip-compressed, detected from its content) into numpy.

    Args:
        path: path of the file, e.g. `train-images-idx3-ubyte.gz`.
        expected_shape: optional tuple of dimensions to check; `None` entries match any size,
            e.g. `(None, 28, 28)` for images or `(None,)` for labels.

    Returns:
        A numpy array in native byte order with the shape stored in the file.

    Raises:
        IDXFormatError: the file is truncated, too long, not gzip/IDX, has an unknown data type
            or does not have `expected_shape`. The message names the file and what was found.
        OSError: the file cannot be read.

    Example:

    >>> labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    >>> labels.shape, labels.dtype
    ((10000,), dtype('uint8'))
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        content = f.read()
    if content[:2] == _GZIP_MAGIC:
        try:
            content = gzip.decompress(content)
        except (EOFError, OSError, zlib.error) as error:
            raise IDXFormatError(
                f"{path!r} is a damaged gzip file ({type(error).__name__}: {error}); the download "
                "or copy was probably cut short. Fetch the file again."
            ) from None
    return parse_idx(content, name=path, expected_shape=expected_shape)


def parse_idx(content, name="<bytes>", expected_shape=None):
    """Parses the bytes of an (uncompressed) IDX file; see `read_idx`."""
    hint = " Is it the right (uncompressed or .gz) MNIST-format file? Fetch it again."
    if len(content) < 4:
        raise IDXFormatError(f"{name!r} is too short to be an IDX file ({len(content)} bytes).{hint}")
    zero, dtype_code, ndim = content[:2], content[2], content[3]
    if zero != b"\x00\x00" or dtype_code not in IDX_DTYPES or ndim == 0:
        raise IDXFormatError(
            f"{name!r} does not start with an IDX magic number: found bytes "
            f"{content[:4].hex(' ')}, expected 00 00 <type in "
            f"{', '.join(f'{c:02x}' for c in IDX_DTYPES)}> <number of dimensions >= 1>.{hint}"
        )
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise IDXFormatError(
            f"{name!r} is truncated inside its header: {ndim} dimensions need {header_size} "
            f"bytes, the file has {len(content)}.{hint}"
        )
    shape = tuple(int(d) for d in np.frombuffer(content, ">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[dtype_code]
    expected_bytes = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(content) != expected_bytes:
        raise IDXFormatError(
            f"{name!r} has {len(content)} bytes but its header (type {dtype}, shape {shape}) "
            f"needs exactly {expected_bytes}: the file is "
            f"{'truncated' if len(content) < expected_bytes else 'longer than its header says'}."
            f"{hint}"
        )
    if expected_shape is not None and (
        len(shape) != len(expected_shape)
        or any(e is not None and e != s for s, e in zip(shape, expected_shape))
    ):
        expected = tuple("any" if e is None else e for e in expected_shape)
        raise IDXFormatError(
            f"{name!r} holds an array of shape {shape}, expected {expected}.{hint}"
        )
    array = np.frombuffer(content, dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))
