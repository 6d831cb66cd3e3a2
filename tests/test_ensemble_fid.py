"""tools.ensemble_fid: `trainers.fit --keep_backups`, the ensemble's members and its FID."""

import json
import os

import numpy as np
import pytest
import scipy.linalg

from tests import testing
from tools import ensemble_fid


def _numpy_fid(a, b):
    """Frechet distance of two activation sets, written out with scipy (not keras_jem)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("ensemble"))
    old = os.getcwd()
    os.chdir(testing.REPO)  # the tool runs `python -m trainers.fit` from the repository
    try:
        result = ensemble_fid.main([
            "--dataset", "digits", "--output_dir", output_dir, "--members", "3",
            "--fit_args", "--epochs 4 --steps_per_epoch 2 --batch_size 16 --buffer_size 64",
            "--per_class", "3", "--chains", "noise:3,buffer:2"])
    finally:
        os.chdir(old)
    return output_dir, result


@pytest.mark.large  # two trainers.fit runs: 97 s on 2 idle cores
def test_the_members_are_the_last_epochs_kept_by_keep_backups(run):
    output_dir, result = run
    # 4 epochs of 2 steps, --keep_backups 3 with --save_freq epoch: the backups of epochs 2-4.
    assert result["members_global_steps"] == [4, 6, 8]
    with open(os.path.join(output_dir, "igebm", "config.json")) as f:
        assert json.load(f)["keep_backups"] == 3


@pytest.mark.large  # two trainers.fit runs: 97 s on 2 idle cores
def test_fids_match_a_scipy_frechet_distance_of_the_saved_samples(run):
    output_dir, result = run
    from keras_jem import data
    from tools.study import feature_function

    features = feature_function(result["classifier"])
    test_images, _ = data.load("digits", "test")
    reference = features(test_images)
    saved = np.load(os.path.join(output_dir, "ensemble_samples.npz"))
    assert list(result["chains"]) == ["noise_3_steps", "buffer_2_steps"]
    for name, row in result["chains"].items():
        assert set(row) == {"single", "ensemble3"}
        for label, values in row.items():
            images = saved[f"{name}_{label}"]
            assert images.shape == (30, 8, 8, 1)
            assert values["fid"] == pytest.approx(_numpy_fid(features(images), reference),
                                                  rel=1e-3)
        # Same start, same steps: only the energy differs, so the samples must too.
        assert not np.allclose(saved[f"{name}_single"], saved[f"{name}_ensemble3"])
    np.testing.assert_array_equal(saved["labels"], np.repeat(np.arange(10), 3))
    with open(os.path.join(output_dir, "ensemble_fid.md")) as f:
        assert "| uniform noise, 3 steps |" in f.read()


@pytest.mark.parametrize("args, expected", [
    (["--chains", "noise:0"], "START:STEPS"),
    (["--chains", "data:10"], "START:STEPS"),
    (["--classifier", "/nonexistent/model.keras"], "does not exist"),
    (["--members", "0"], "must be positive"),
])
def test_bad_arguments_stop_before_any_training(tmp_path, args, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        ensemble_fid.main(["--output_dir", str(tmp_path / "out"), *args])
    assert expected in f"{exit_.value.code}{capsys.readouterr().err}"
    assert not (tmp_path / "out" / "igebm").exists()
