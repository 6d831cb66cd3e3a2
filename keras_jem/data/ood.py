"""Out-of-distribution image sets for OOD-detection evaluation."""

import warnings

import numpy as np

from keras_jem.data import loading
from keras_jem.data import preprocessing
from keras_jem.data import registry

# Photographs bundled with scikit-image that load without any download (checked on
# scikit-image 0.26; `lily`, `kidney`, `eagle`, `skin`, ... need pooch and are not used).
PHOTO_NAMES = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "coins",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "brick",
    "grass",
    "gravel",
)
GENERATED_SETS = ("uniform_noise", "gaussian_noise", "constant", "interpolation", "vertical_flip")
BUNDLED_SETS = ("faces", "photos", "mnist_like_digits")
TFDS_SETS = ("svhn", "cifar10", "cifar100", "celeb_a")
_DEFAULT_NUM_EXAMPLES = 1000
_NUM_LFW_FACES = 100
# MNIST's digits fill a 20x20 box centred in 28x28 (LeCun et al.); scikit-learn's 8x8 digits
# fill their frame, so they are upscaled to 20/28 of the target side and padded.
_MNIST_DIGIT_FRACTION = 20 / 28

# The OOD sets `trainers.evaluate` and `tools.study` use for each in-distribution dataset.
DEFAULT_OOD_SETS = {
    "digits": ("uniform_noise", "interpolation", "faces", "photos"),
    "fashion_mnist": (
        "uniform_noise",
        "vertical_flip",
        "mnist_like_digits",
        "interpolation",
        "constant",
    ),
    "cifar10": ("svhn", "cifar100", "celeb_a", "interpolation"),
    "cifar100": ("svhn", "cifar10", "celeb_a", "interpolation"),
    "svhn": ("cifar10", "cifar100", "celeb_a", "interpolation"),
}
_FALLBACK_OOD_SETS = ("uniform_noise", "interpolation")


def available_ood():
    """Returns the names accepted by `keras_jem.data.load_ood`.

    Example:

    >>> "uniform_noise" in keras_jem.data.available_ood()
    True
    """
    return GENERATED_SETS + BUNDLED_SETS + TFDS_SETS


def ood_sets_for(dataset):
    """The default OOD sets of an in-distribution dataset, as names for `load_ood`.

    Sets that need no download and are built from the in-distribution test images
    (`"interpolation"`, `"vertical_flip"`) take them as `reference_images`.

    Args:
        dataset: a dataset name, e.g. `"fashion_mnist"`.

    Returns:
        A tuple of names from `available_ood()`; `("uniform_noise", "interpolation")` for a
        dataset without its own list.

    Example:

    >>> keras_jem.data.ood_sets_for("fashion_mnist")
    ('uniform_noise', 'vertical_flip', 'mnist_like_digits', 'interpolation', 'constant')
    """
    return DEFAULT_OOD_SETS.get(dataset, _FALLBACK_OOD_SETS)


def load_ood(
    name,
    like,
    reference_images=None,
    num_examples=None,
    seed=0,
    data_dir=None,
    download=False,
    split="test",
):
    """Loads or makes an out-of-distribution image set shaped like the training images.

    Sets (all float32 in [-1, 1], shape `(num_examples,) + image_shape`):

    - `"uniform_noise"`: i.i.d. U(-1, 1) pixels.
    - `"gaussian_noise"`: i.i.d. N(0, 1) pixels clipped to [-1, 1].
    - `"constant"`: every pixel of an image has the same colour, one U(-1, 1) value per
      channel and image.
    - `"interpolation"`: the average of two different images of `reference_images`,
      paired by a seeded shuffle (JEM's `cifar_interp` averages two consecutive
      CIFAR-10 test batches). Requires `reference_images` (e.g. the in-distribution test
      set); by default makes `len(reference_images)` images.
    - `"vertical_flip"`: `reference_images` upside down (rows reversed), the first
      `num_examples` of them (cycled if more are asked for); by default all of them.
      A shift in orientation only: same pixel statistics, same textures.
    - `"faces"`: the 100 face images of `skimage.data.lfw_subset()` (25x25 grayscale),
      resized to the target shape (grayscale repeated to RGB). Bundled, no download.
      By default 100 images; more are drawn with replacement.
    - `"photos"`: random square patches (side 1/4 to 1 of the shorter image side) of the
      photographs bundled with scikit-image (see `PHOTO_NAMES`), resized to the target
      shape; converted to grayscale for 1-channel targets. No download.
    - `"mnist_like_digits"`: scikit-learn's 1797 bundled 8x8 digits (no download) made to
      look like MNIST: bilinearly upscaled so the digit fills the central 20/28 of the
      image (20x20 in 28x28), padded with background (-1: white ink on black, as MNIST
      and Fashion-MNIST), grayscale repeated for 3 channels. Drawn in seeded shuffled
      passes over the 1797 digits (each appears once before any repeats); by default
      1797 images. Fashion-MNIST vs MNIST is where likelihood models are known to fail
      (Nalisnick et al. 2019; Ren et al. 2019).
    - `"svhn"`, `"cifar10"`, `"cifar100"`, `"celeb_a"`: the TFDS set's `split` via
      `keras_jem.data.load` (same `data_dir` / `download` rules and the same
      `DatasetNotAvailableError`), resized and channel-converted to the target shape.
      By default the whole split; with `num_examples`, the first `num_examples` images.

    JEM adds its sigma=0.03 noise to OOD images at evaluation: do that with
    `keras_jem.data.make_eval_dataset(images, noise_scale=0.03)`.

    Args:
        name: one of `keras_jem.data.available_ood()`.
        like: the target image shape `(height, width, channels)` (channels 1 or 3), or a
            dataset name such as `"cifar10"` whose image shape is used.
        reference_images: in-distribution images in [-1, 1], for `"interpolation"`.
        num_examples: number of images; default 1000 for generated sets and photos (see
            above for the others).
        seed: seed of the random sets.
        data_dir: TFDS data directory (TFDS sets).
        download: whether TFDS may download (TFDS sets).
        split: split of the TFDS sets.

    Returns:
        A float32 numpy array `(num_examples, H, W, C)` in [-1, 1].

    Example:

    >>> x_test, _ = keras_jem.data.load("digits", "test")
    >>> ood = keras_jem.data.load_ood("interpolation", like=(8, 8, 1),
    ...                               reference_images=x_test)
    >>> faces = keras_jem.data.load_ood("faces", like="cifar10")
    """
    if name not in available_ood():
        raise ValueError(f"Unknown OOD set: {name!r}. Expected one of {list(available_ood())}.")
    if isinstance(like, str):
        image_shape = registry.get_info(like).image_shape
    else:
        image_shape = preprocessing.check_image_shape(like, name="like")
    if num_examples is not None:
        num_examples = preprocessing.check_positive_int(num_examples, "num_examples")
    rng = np.random.default_rng(seed)

    if name in TFDS_SETS:
        images, _ = loading.load(
            name, split=split, data_dir=data_dir, download=download, num_examples=num_examples
        )
        images = preprocessing.match_image_shape(images, image_shape)
    elif name == "interpolation":
        images = _interpolation(reference_images, image_shape, num_examples, rng)
    elif name == "vertical_flip":
        reference = _reference(reference_images, image_shape, name, minimum=1)
        index = np.arange(num_examples or len(reference)) % len(reference)
        images = reference[index, ::-1]
    elif name == "mnist_like_digits":
        images = _mnist_like_digits(image_shape, num_examples, rng)
    elif name == "faces":
        images = _faces(image_shape, num_examples, rng)
    elif name == "photos":
        images = _photos(image_shape, num_examples or _DEFAULT_NUM_EXAMPLES, rng)
    else:
        shape = (num_examples or _DEFAULT_NUM_EXAMPLES,) + image_shape
        if name == "uniform_noise":
            images = rng.uniform(-1.0, 1.0, size=shape)
        elif name == "gaussian_noise":
            images = rng.standard_normal(shape)
        else:  # constant
            colours = rng.uniform(-1.0, 1.0, size=(shape[0], 1, 1, shape[-1]))
            images = np.broadcast_to(colours, shape)
    return np.clip(images, -1.0, 1.0).astype(np.float32)


def _reference(reference_images, image_shape, name, minimum):
    if reference_images is None:
        raise ValueError(
            f"The {name!r} OOD set is made from in-distribution images: pass "
            "`reference_images` (e.g. the test images, float in [-1, 1])."
        )
    reference = preprocessing.check_images(reference_images, name="reference_images")
    if len(reference) < minimum:
        raise ValueError(
            f"`reference_images` must hold at least {minimum} image(s) for {name!r}; received "
            f"{len(reference)}."
        )
    return preprocessing.match_image_shape(reference, image_shape)


def _interpolation(reference_images, image_shape, num_examples, rng):
    reference = _reference(reference_images, image_shape, "interpolation", minimum=2)
    num_examples = num_examples or len(reference)
    first, second = [], []
    count = 0
    while count < num_examples:
        # A shuffled order paired with itself shifted by one: two different images per pair.
        order = rng.permutation(len(reference))
        first.append(order)
        second.append(np.roll(order, 1))
        count += len(order)
    first = np.concatenate(first)[:num_examples]
    second = np.concatenate(second)[:num_examples]
    return 0.5 * (reference[first] + reference[second])


def _mnist_like_digits(image_shape, num_examples, rng):
    from sklearn import datasets

    digits = datasets.load_digits().images.astype(np.float32)  # (1797, 8, 8), ink 0..16
    num_examples = num_examples or len(digits)
    passes = -(-num_examples // len(digits))
    index = np.concatenate([rng.permutation(len(digits)) for _ in range(passes)])[:num_examples]
    height, width, channels = image_shape
    inner = (max(1, round(height * _MNIST_DIGIT_FRACTION)),
             max(1, round(width * _MNIST_DIGIT_FRACTION)))
    images = preprocessing.to_model_range(digits[index][..., None], input_range=(0, 16))
    images = preprocessing.match_image_shape(images, inner + (channels,))
    top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
    padding = ((0, 0), (top, height - inner[0] - top), (left, width - inner[1] - left), (0, 0))
    return np.pad(images, padding, constant_values=-1.0)


def _faces(image_shape, num_examples, rng):
    from skimage import data as skimage_data

    # lfw_subset(): 100 faces followed by 100 non-faces, 25x25 floats in [0, 1].
    faces = skimage_data.lfw_subset()[:_NUM_LFW_FACES].astype(np.float32)
    if num_examples is None:
        index = np.arange(len(faces))
    elif num_examples <= len(faces):
        index = rng.permutation(len(faces))[:num_examples]
    else:
        index = rng.integers(0, len(faces), size=num_examples)
    images = preprocessing.to_model_range(faces[index][..., None], input_range=(0, 1))
    return preprocessing.match_image_shape(images, image_shape)


def _load_photos():
    from skimage import data as skimage_data

    photos, skipped = [], []
    for photo_name in PHOTO_NAMES:
        try:
            photo = np.asarray(getattr(skimage_data, photo_name)())
        except (AttributeError, ImportError, OSError, ValueError) as error:
            # E.g. a data file that this scikit-image version would have to download.
            skipped.append(f"{photo_name} ({type(error).__name__})")
            continue
        photos.append(photo[..., :3] if photo.ndim == 3 else photo)
    if not photos:
        raise RuntimeError(
            "None of the scikit-image photographs could be loaded: "
            f"{skipped}. Is scikit-image installed with its data files?"
        )
    if skipped:
        warnings.warn(
            f"Skipped scikit-image photographs that could not be loaded: {skipped}.",
            stacklevel=3,
        )
    return photos


def _photos(image_shape, num_examples, rng):
    from PIL import Image

    height, width, channels = image_shape
    mode = "L" if channels == 1 else "RGB"
    photos = [Image.fromarray(photo).convert(mode) for photo in _load_photos()]
    out = np.empty((num_examples, height, width, channels), np.uint8)
    for i, photo_id in enumerate(rng.integers(0, len(photos), size=num_examples)):
        photo = photos[photo_id]
        photo_width, photo_height = photo.size
        size = int(rng.integers(max(1, min(photo.size) // 4), min(photo.size) + 1))
        top = int(rng.integers(0, photo_height - size + 1))
        left = int(rng.integers(0, photo_width - size + 1))
        # Pillow's bilinear resize antialiases when it downsamples.
        patch = photo.resize(
            (width, height), Image.BILINEAR, box=(left, top, left + size, top + size)
        )
        out[i] = np.asarray(patch).reshape(height, width, channels)
    return preprocessing.to_model_range(out, input_range=(0, 255))
