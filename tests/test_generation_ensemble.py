"""`keras_jem.generation.ensemble` on explicit quadratic energies with known minima.

With `E_k(x, y) = 1/2 ||x - c_k[y]||^2 / s_k^2`, the weighted sum `sum_k w_k E_k` is again
quadratic with its minimum at the precision-weighted mean `sum_k (w_k / s_k^2) c_k[y] /
sum_k (w_k / s_k^2)`, and noise-free SGLD contracts to it.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_jem import generation
from keras_jem import sampling
from tests.test_generation_known import SHAPE
from tests.test_generation_known import GaussianEnergy


def _models():
    rng = np.random.default_rng(0)
    centers = [rng.uniform(-0.6, 0.6, (3,) + SHAPE).astype(np.float32) for _ in range(3)]
    scales = [1.0, 2.0, 0.5]
    return [GaussianEnergy(centers=c, scale=s) for c, s in zip(centers, scales)], centers, scales


def test_ensemble_energy_is_the_weighted_sum():
    models, centers, scales = _models()
    weights = [1.0, 0.5, 2.0]
    x = np.random.default_rng(1).uniform(-1, 1, (4,) + SHAPE).astype(np.float32)
    y = np.array([2, 0, 1, 2])
    target = generation.EnergySum([(m, None, w) for m, w in zip(models, weights)])
    expected = sum(
        w * 0.5 * np.sum((x - c[y]) ** 2, axis=(1, 2, 3)) / s ** 2
        for c, s, w in zip(centers, scales, weights))
    np.testing.assert_allclose(target.energy(tf.constant(x), tf.constant(y)).numpy(), expected,
                               rtol=1e-5)


@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 0.5]])
def test_ensemble_sampling_reaches_the_minimum_of_the_sum(weights):
    models, centers, scales = _models()
    w = np.ones(3) if weights is None else np.array(weights)
    precision = w / np.square(scales)
    y = np.array([0, 1, 2, 1])
    minimum = sum(p * c[y] for p, c in zip(precision, centers)) / precision.sum()
    # Noise-free SGLD on the sum: x - m <- (1 - a * sum(precision)) (x - m) per step.
    step = 0.5 / precision.sum()
    sampler = sampling.SGLD(60, step_size=step, noise_scale=0.0)
    x_init = np.random.default_rng(2).uniform(-1, 1, (4,) + SHAPE).astype(np.float32)
    result = generation.ensemble(models, x_init=x_init, y=y, sampler=sampler, seed=0,
                                 weights=weights).numpy()
    np.testing.assert_allclose(result, minimum, atol=1e-5)
    # Not any one model's minimum: the members disagree by far more than the tolerance.
    assert min(np.abs(result - c[y]).max() for c in centers) > 0.05


def test_ensemble_errors():
    models, _, _ = _models()
    with pytest.raises(ValueError, match="non-empty list of models"):
        generation.ensemble([], num_samples=2)
    with pytest.raises(ValueError, match="`weights` holds 2 values for 3 models"):
        generation.ensemble(models, num_samples=2, weights=[1.0, 1.0])
    other = GaussianEnergy(center=np.zeros(SHAPE, np.float32))
    other.image_shape = (4, 4, 1)
    with pytest.raises(ValueError, match="same images"):
        generation.ensemble(models + [other], num_samples=2)
    with pytest.raises(ValueError, match="Pass `num_samples` or `x_init` to `ensemble`"):
        generation.ensemble(models)
