"""The dataset registry: what each named dataset is and where it comes from."""

import dataclasses

CIFAR10_CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DIGIT_CLASS_NAMES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset known to `keras_jem.data.load`.

    Args:
        name: the name used with `keras_jem.data.load` (e.g. `"cifar10"`).
        image_shape: `(height, width, channels)` of the images `load` returns.
        num_classes: number of classes (1 for OOD-only sets, whose labels are all 0).
        tfds_name: TensorFlow Datasets name, or `None` for datasets built without TFDS.
        label_key: the TFDS feature holding the integer label, or `None` (labels are zeros).
        splits: the split names `load` accepts. TFDS sets also accept TFDS slicing
            such as `"train[:1000]"`.
        num_examples: mapping split name -> number of examples.
        augment: the training augmentation the papers use: `"crop_flip"` (reflect-pad,
            random crop, random horizontal flip) or `"crop"` (no flip: digits, SVHN).
        ood_only: `True` for sets that are only used as out-of-distribution data.
        archives: file names TFDS expects in a `manual_dir` to prepare the set offline.
        homepage: where the archives can be downloaded.
        class_names: optional tuple of human-readable class names.
        description: one-line description.
        idx_files: for datasets read from local IDX files (Fashion-MNIST): mapping split ->
            `(images file, labels file)` names without `.gz`; see
            `keras_jem.data.idx_datasets` for where they are looked for.
        idx_dirname: the directory name of those files in Keras' cache and in
            `/usr/share/datasets` (e.g. `"fashion-mnist"`).

    Example:

    >>> info = keras_jem.data.get_info("cifar10")
    >>> info.image_shape, info.num_classes
    ((32, 32, 3), 10)
    """

    name: str
    image_shape: tuple
    num_classes: int
    tfds_name: str = None
    label_key: str = "label"
    splits: tuple = ("train", "test")
    num_examples: dict = dataclasses.field(default_factory=dict)
    augment: str = "crop_flip"
    ood_only: bool = False
    archives: tuple = ()
    homepage: str = None
    class_names: tuple = None
    description: str = ""
    idx_files: dict = None
    idx_dirname: str = None


_REGISTRY = {
    info.name: info
    for info in (
        DatasetInfo(
            name="digits",
            image_shape=(8, 8, 1),
            num_classes=10,
            num_examples={"train": 1347, "test": 450},
            augment="crop",
            class_names=DIGIT_CLASS_NAMES,
            description=(
                "scikit-learn's 8x8 handwritten digits (1797 images, bundled, no download); "
                "a fixed stratified split with 1/4 held out for test."
            ),
        ),
        DatasetInfo(
            name="fashion_mnist",
            image_shape=(28, 28, 1),
            num_classes=10,
            tfds_name="fashion_mnist",
            num_examples={"train": 60000, "test": 10000},
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            class_names=FASHION_MNIST_CLASS_NAMES,
            idx_files={
                "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
            },
            idx_dirname="fashion-mnist",
            description=(
                "Fashion-MNIST, 28x28 grayscale clothing images in 10 classes, read from the "
                "original IDX files (--data_dir, Keras' cache or the Debian package "
                "dataset-fashion-mnist); TFDS 'fashion_mnist' only with download=True."
            ),
        ),
        DatasetInfo(
            name="cifar10",
            image_shape=(32, 32, 3),
            num_classes=10,
            tfds_name="cifar10",
            num_examples={"train": 50000, "test": 10000},
            archives=("cifar-10-binary.tar.gz",),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            class_names=CIFAR10_CLASS_NAMES,
            description="CIFAR-10, 32x32 colour images in 10 classes (TFDS 'cifar10').",
        ),
        DatasetInfo(
            name="cifar100",
            image_shape=(32, 32, 3),
            num_classes=100,
            tfds_name="cifar100",
            num_examples={"train": 50000, "test": 10000},
            archives=("cifar-100-binary.tar.gz",),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            description="CIFAR-100 with the 100 fine labels (TFDS 'cifar100', key 'label').",
        ),
        DatasetInfo(
            name="svhn",
            image_shape=(32, 32, 3),
            num_classes=10,
            tfds_name="svhn_cropped",
            splits=("train", "test", "extra"),
            num_examples={"train": 73257, "test": 26032, "extra": 531131},
            augment="crop",
            archives=("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"),
            homepage="http://ufldl.stanford.edu/housenumbers/",
            class_names=DIGIT_CLASS_NAMES,
            description="Street View House Numbers, cropped 32x32 digits (TFDS 'svhn_cropped').",
        ),
        DatasetInfo(
            name="celeb_a",
            image_shape=(32, 32, 3),
            num_classes=1,
            tfds_name="celeb_a",
            label_key=None,
            splits=("train", "validation", "test"),
            num_examples={"train": 162770, "validation": 19867, "test": 19962},
            ood_only=True,
            archives=(
                "img_align_celeba.zip",
                "list_eval_partition.txt",
                "list_attr_celeba.txt",
                "list_landmarks_align_celeba.txt",
                "identity_CelebA.txt",
            ),
            homepage="https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html",
            description=(
                "CelebA faces for OOD evaluation: the 178x218 aligned images are centre-cropped "
                "to 178x178 and resized to 32x32; labels are zeros (TFDS 'celeb_a')."
            ),
        ),
        DatasetInfo(
            name="synthetic",
            image_shape=(32, 32, 3),
            num_classes=10,
            num_examples={"train": 1024, "test": 256},
            description=(
                "Made-up class-dependent random images (one fixed random prototype per class "
                "plus noise), any shape, for tests and benchmarks."
            ),
        ),
    )
}


def available():
    """Returns the names accepted by `keras_jem.data.load`, sorted.

    Example:

    >>> keras_jem.data.available()
    ('celeb_a', 'cifar10', 'cifar100', 'digits', 'fashion_mnist', 'svhn', 'synthetic')
    """
    return tuple(sorted(_REGISTRY))


def get_info(name):
    """Returns the `DatasetInfo` of a named dataset.

    Args:
        name: a dataset name, one of `keras_jem.data.available()`.

    Returns:
        A `keras_jem.data.DatasetInfo`.

    Raises:
        ValueError: if `name` is not a known dataset.

    Example:

    >>> keras_jem.data.get_info("digits").image_shape
    (8, 8, 1)
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"Unknown dataset name: {name!r}. Expected one of {list(available())}.")
    return _REGISTRY[name]
