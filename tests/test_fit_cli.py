"""End-to-end tests of `python -m trainers.fit` on tiny settings."""

import inspect
import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainers import fit
from trainers import presets

TINY = [
    "--epochs", "1", "--steps_per_epoch", "3", "--num_steps", "2", "--buffer_size", "200",
    "--batch_size", "16", "--sample_every", "1", "--verbose", "2",
]


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def run_cli(args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "trainers.fit", *args], capture_output=True, text=True,
        timeout=timeout, check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "nope"], "invalid choice: 'nope'"),
        (["--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["--step_size", "-1"], "`step_size` must be a non-negative number. Received: step_size=-1.0"),
        (["--buffer_size", "32", "--batch_size", "64"], "smaller than the batch"),
        (["--conditional_sampling", "--buffer_size", "1005"], "not divisible by num_classes=10"),
        (["--norm", "weird"], "Unknown `norm`: 'weird'"),
        (["--decay_epochs", "a,b"], "comma-separated integers"),
        (["--model", "jem", "--mode", "gen"], "--mode only applies to --model gmmc"),
        (["--model", "gmmc", "--sn_filters", "32"], "--sn_filters only applies to --model igebm"),
        (["--model", "gmmc", "--mode", "both"], "Unknown GMMC `mode` 'both'"),
        (["--model", "gmmc", "--center_scale", "0"], "`center_scale` (the norm of the class"),
        (["--model", "gmmc", "--mode", "gen", "--buffer_size", "505"],
         "not divisible by num_classes=10"),
        (["--model", "gmmc", "--backbone", "wrn", "--depth", "10", "--width", "0"],
         "`width` must be a positive integer"),
        (["--model", "igebm", "--sn_filters", "32,x"], "--sn_filters must be a positive width"),
        (["--model", "igebm", "--sn_pooling", "max"], "Unknown `pooling`: 'max'"),
        (["--model", "jempp", "--noise_first"],
         "--noise_first does not apply to --sampler proximal (ProximalSGLD)"),
        (["--model", "gmmc", "--noise_first"],
         "--noise_first does not apply to GMMC's latent-target sampler"),
        # Flags the chosen model, sampler or backbone would not read stop the run too.
        (["--model", "igebm", "--px_weight", "0.5"], "--px_weight does not apply to --model igebm."),
        (["--model", "gmmc", "--buffer_init", "gaussian_mixture"],
         "--buffer_init does not apply to --model gmmc."),
        (["--model", "gmmc", "--sampler", "proximal"], "--sampler does not apply to --model gmmc"),
        (["--sampler", "sgld", "--inner_steps", "3"],
         "--inner_steps does not apply to --sampler sgld (SGLD), which takes no `inner_steps`."),
        (["--depth", "16"], "--depth does not apply to --backbone small_cnn."),
        (["--model", "igebm", "--norm", "batch"],
         "--norm does not apply to --model igebm (always an SNResNet)."),
        (["--sam_adaptive"], "--sam_adaptive does not apply without SAM: give --sam_rho > 0 too."),
        (["--keep_backups", "0"], "--keep_backups must be positive. Received: 0"),
    ],
)
def test_bad_flags_stop_before_any_work(tmp_path, args, expected, capsys):
    start = time.time()
    try:
        code = fit.main(["--model_dir", str(tmp_path / "run"), *args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "nothing may be written for a bad flag"
    assert time.time() - start < 30


def test_bad_flag_from_the_shell(tmp_path):
    result = run_cli(["--model_dir", str(tmp_path / "run"), "--reinit_probability", "2"])
    assert result.returncode == 2
    assert "`reinit_probability` must be in [0, 1]. Received: reinit_probability=2.0" in (
        result.stderr)


def test_presets_resolve_paper_settings():
    jem = presets.resolve("jem", "cifar10")
    assert (jem["num_steps"], jem["step_size"], jem["sampler_noise"]) == (20, 1.0, 0.01)
    assert (jem["optimizer"], jem["learning_rate"], jem["decay_epochs"]) == ("adam", 1e-4,
                                                                             "160,180")
    assert jem["backbone"] == "wrn" and jem["norm"] == "none" and jem["noise_scale"] == 0.03
    jempp = presets.resolve("jempp", "cifar10")
    assert (jempp["sampler"], jempp["num_steps"], jempp["inner_steps"]) == ("proximal", 10, 5)
    assert jempp["weight_decay"] == 4e-4 and jempp["buffer_init"] == "gaussian_mixture"
    sada = presets.resolve("sadajem", "cifar10", {"epochs": 3})
    assert (sada["sam_rho"], sada["sam_adaptive"], sada["num_steps"]) == (2.0, True, 5)
    assert (sada["batch_size"], sada["px_batch_size"], sada["augment_px"]) == (128, 64, False)
    assert sada["epochs"] == 3


def test_gmmc_and_igebm_presets_follow_mode_and_dataset():
    joint = presets.resolve("gmmc", "cifar10")
    assert joint["mode"] == "joint" and joint["backbone"] == "wrn"
    assert (joint["buffer_size"], joint["num_steps"], joint["start_generative"]) == (50000, 50,
                                                                                     50)
    generative = presets.resolve("gmmc", "cifar10", {"mode": "gen"})
    assert generative["mode"] == "generative"
    assert (generative["buffer_size"], generative["reinit_probability"],
            generative["decay_epochs"], generative["start_generative"]) == (100000, 0.025,
                                                                            "30,50,80", 0)
    discriminative = presets.resolve("gmmc", "cifar10", {"mode": "dis", "epochs": 2})
    assert (discriminative["optimizer"], discriminative["norm"], discriminative["epochs"]) == (
        "sgd", "batch", 2)
    # The user's flags win over the mode preset.
    assert presets.resolve("gmmc", "cifar10", {"mode": "gen", "num_steps": 7})["num_steps"] == 7
    igebm = presets.resolve("igebm", "cifar10")
    assert (igebm["num_steps"], igebm["step_size"], igebm["gradient_clip"]) == (60, 40.0, 0.005)
    assert (igebm["beta_1"], igebm["energy_l2_weight"], igebm["sn_filters"]) == (0.0, 1.0,
                                                                                 "128,256,256")


def test_presets_are_constructor_arguments():
    from trainers import factory

    config = presets.resolve("sadajem", "digits", {"num_steps": 3})
    nested = presets.sections(config)
    assert nested["sam"] == {"rho": 0.5, "adaptive": True}
    assert nested["sampler"] == {"name": "sgld", "num_steps": 3, "inner_steps": 5,
                                 "step_size": 1.0, "noise_scale": 0.0, "gradient_clip": 1.0,
                                 "clip_range": (-1.0, 1.0), "noise_first": False}
    # GMMC's and IGEBM's settings stay out of a SADA-JEM's arguments.
    assert "mode" not in nested["model"] and "filters" not in nested["backbone"]
    model = factory.build_model(config, num_classes=10)
    assert (model.sam.rho, model.sam.adaptive) == (0.5, True)
    assert (model.sampler.num_steps, model.sampler.clip_range) == (3, (-1.0, 1.0))
    assert model.sampler.noise_first is False
    assert model.buffer_size == 2000 and model.energy_l2_weight == 0.1
    # On digits GroupNorm and half the restarts from noise (docs/batch_norm.md); CIFAR: the
    # papers' BatchNorm and informative restarts only.
    assert model.backbone.get_config()["norm"] == "group"
    assert model.buffer.uniform_fraction == 0.5
    cifar = presets.resolve("sadajem", "cifar10")
    assert (cifar["norm"], cifar["buffer_uniform_fraction"]) == ("batch", 0.0)


def _with_default(monkeypatch, cls, name, value):
    """Gives `cls`'s constructor argument `name` the default `value` (through its signature)."""
    signature = inspect.signature(cls)
    changed = signature.replace(parameters=[
        p.replace(default=value) if p.name == name else p
        for p in signature.parameters.values()])
    monkeypatch.setattr(cls, "__signature__", changed, raising=False)


def test_constructor_defaults_are_not_repeated_in_the_presets(monkeypatch):
    import keras_jem
    from keras_jem import sampling

    # A default a class owns comes from that class: change it there, the flag follows, for
    # every model that uses it.
    _with_default(monkeypatch, sampling.ProximalSGLD, "inner_steps", 7)
    assert presets.resolve("jem", "digits")["inner_steps"] == 7
    assert presets.resolve("jempp", "cifar10")["inner_steps"] == 7
    _with_default(monkeypatch, keras_jem.IGEBM, "energy_l2_weight", 2.0)
    assert presets.resolve("igebm", "cifar10")["energy_l2_weight"] == 2.0
    _with_default(monkeypatch, keras_jem.SADAJEM, "divergence_threshold", 3e4)
    assert presets.resolve("sadajem", "cifar10")["divergence_threshold"] == 3e4
    monkeypatch.setattr(keras_jem.SADAJEM, "default_sampler_config",
                        {"num_steps": 9, "noise_scale": 0.0})
    monkeypatch.setattr(keras_jem.SADAJEM, "default_sam_config", {"rho": 1.5})
    sada = presets.resolve("sadajem", "cifar10")
    assert (sada["num_steps"], sada["sampler_noise"], sada["clip_samples"]) == (9, 0.0, False)
    assert (sada["sam_rho"], sada["sam_adaptive"]) == (1.5, False)
    for name, flag in presets.FLAGS.items():
        if flag.source:
            assert flag.key not in presets.COMMON.get(flag.section, {}), name


def test_no_preset_repeats_the_layer_below():
    # Each setting is stated once: a preset that gives the value the layers below it already
    # give (the classes' defaults, COMMON, the model's "*", its dataset family) repeats it.
    repeats = []
    for model, table in presets.PRESETS.items():
        layers = {None: presets.defaults(model)}
        # "*", then families, then datasets, then "<family or dataset>:<mode>".
        for key in sorted(table, key=lambda k: (k != "*", ":" in k,
                                                presets.DATASET_FAMILIES.get(k, k) != k)):
            dataset = key.split(":")[0]
            family = presets.DATASET_FAMILIES.get(dataset, dataset)
            parents = [dataset, family, "*", None] if ":" in key else [family, "*", None]
            under = next(layers[p] for p in parents if p in layers and p != key)
            values = presets._flatten(table[key])
            repeats += [(model, key, name) for name, value in values.items()
                        if under[name] == value]
            layers[key] = {**under, **values}
    assert repeats == []


def test_sampler_names_build_their_classes(monkeypatch):
    from keras_jem import sampling
    from trainers import factory

    built = {name: type(factory.build_sampler(presets.resolve("jem", "digits",
                                                              {"sampler": name})))
             for name in ("sgld", "proximal")}
    assert built == {"sgld": sampling.SGLD, "proximal": sampling.ProximalSGLD}
    assert presets.resolve("jempp", "digits")["sampler"] == "proximal"
    assert presets.resolve("gmmc", "digits")["sampler"] == "sgld"  # unused by GMMC
    monkeypatch.setitem(presets.PRESETS["jem"], "*", {"sampler": {"name": "langevin"}})
    with pytest.raises(factory.ConfigError, match="one of sgld, proximal. Received: 'langevin'"):
        factory.build_sampler(presets.resolve("jem", "digits"))


def test_flat_presets_in_the_older_format_still_resolve(monkeypatch):
    nested = {"run": {"epochs": 3}, "model": {"buffer_size": 500},
              "sampler": {"num_steps": 7, "clip_range": (-1.0, 1.0)},
              "backbone": {"norm": "batch"}}
    flat = {"epochs": 3, "buffer_size": 500, "num_steps": 7, "clip_samples": True,
            "norm": "batch"}
    monkeypatch.setitem(presets.DATASET_FAMILIES, "toy", "toy")
    monkeypatch.setitem(presets.PRESETS["jem"], "toy", nested)
    from_nested = presets.resolve("jem", "toy")
    monkeypatch.setitem(presets.PRESETS["jem"], "toy", flat)
    assert presets.resolve("jem", "toy") == from_nested
    assert (from_nested["epochs"], from_nested["clip_samples"], from_nested["norm"]) == (
        3, True, "batch")
    monkeypatch.setitem(presets.PRESETS["jem"], "toy", {"sampler": {"num_stepz": 1}})
    with pytest.raises(ValueError, match="has no setting 'num_stepz'"):
        presets.resolve("jem", "toy")


def test_help_shows_the_chosen_models_presets(capsys):
    with pytest.raises(SystemExit) as exit_:
        fit.main(["--model", "sadajem", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "SAM radius (0: no SAM) (preset: 0.5)" in text
    assert "sampler steps per training iteration (preset: 5)" in text


def test_gmmc_joint_switches_to_the_generative_loss(tmp_path):
    model_dir = str(tmp_path / "gmmc")
    config, _ = fit.resolve_config([
        "--model", "gmmc", "--model_dir", model_dir, *TINY, "--epochs", "2",
        "--start_generative", "1",
    ])
    metrics = fit.run(config)
    assert 0 <= metrics["test_accuracy"] <= 1
    history = _read_json(os.path.join(model_dir, "history.json"))
    assert history["generative"] == [0.0, 1.0]
    assert history["energy_samples"][0] == 0.0 and history["energy_samples"][1] != 0.0
    assert os.path.exists(os.path.join(model_dir, "samples", "epoch_002.png"))
    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
    assert type(model).__name__ == "GMMC" and model.mode == "joint"


@pytest.mark.parametrize("conditional", [True, False])
def test_igebm_trains_conditional_and_unconditional(tmp_path, conditional):
    model_dir = str(tmp_path / "igebm")
    config, _ = fit.resolve_config([
        "--model", "igebm", "--model_dir", model_dir, *TINY, "--sn_filters", "8",
        "--conditional" if conditional else "--no-conditional",
    ])
    metrics = fit.run(config)
    assert np.isfinite(metrics["test_energy"])
    if conditional:
        assert 0 <= metrics["test_accuracy"] <= 1
    else:
        assert metrics["test_accuracy"] is None
    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
    assert model.conditional is conditional
    assert model.backbone.filters == (8, 16, 32)


def _read_buffer(backup_dir):
    """The replay buffer in the newest checkpoint of a `StepBackup` (read by TensorFlow)."""
    reader = tf.train.load_checkpoint(backup_dir)
    shapes = reader.get_variable_to_shape_map()
    found = [reader.get_tensor(name) for name, shape in shapes.items()
             if len(shape) == 4 and shape[0] == 200]
    assert len(found) == 1, "the backup must hold exactly one replay buffer"
    return found[0]


def test_train_resume_continues_from_saved_epoch_and_buffer(tmp_path):
    model_dir = str(tmp_path / "jem")
    config, _ = fit.resolve_config(["--model", "jem", "--model_dir", model_dir, *TINY])
    first = fit.run(config)
    assert os.path.exists(os.path.join(model_dir, "model.keras"))
    assert os.path.exists(os.path.join(model_dir, "samples", "epoch_001.png"))
    saved = _read_json(os.path.join(model_dir, "config.json"))
    assert saved["num_steps"] == 2 and saved["image_shape"] == [8, 8, 1]
    saved_buffer = _read_buffer(os.path.join(model_dir, "backup"))
    assert _read_json(os.path.join(model_dir, "backup", "training_metadata.json"))[
        "epoch"] == 1

    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["buffer"] = keras.ops.convert_to_numpy(self.model.buffer.images).copy()

        def on_epoch_begin(self, epoch, logs=None):
            seen.setdefault("epochs", []).append(epoch)

    fit.EXTRA_CALLBACKS.append(lambda config, model: Probe())
    try:
        config, _ = fit.resolve_config(
            ["--model", "jem", "--model_dir", model_dir, *TINY[:0], "--epochs", "2",
             *TINY[2:]])
        second = fit.run(config)
    finally:
        fit.EXTRA_CALLBACKS.pop()
    assert seen["epochs"] == [1], "the resumed run must start at the saved epoch"
    np.testing.assert_array_equal(seen["buffer"], saved_buffer)
    assert second["epochs"] == 2 and first["epochs"] == 1
    with open(os.path.join(model_dir, "history.csv")) as f:
        history = f.read().splitlines()
    assert len(history) == 3  # header + one line per epoch, over both runs


def test_resume_of_an_older_run_names_the_flags_it_had(tmp_path, capsys):
    """An IGEBM run from before the FIFO buffer: its config.json lacks buffer_type and
    noise_first, and resuming it with today's defaults names the flags that restore them."""
    model_dir = str(tmp_path / "igebm")
    old_run = ["--model", "igebm", "--model_dir", model_dir, *TINY, "--sn_filters", "8"]
    config, _ = fit.resolve_config([*old_run, "--buffer_type", "persistent", "--no-noise_first"])
    fit.run(config)
    config_path = os.path.join(model_dir, "config.json")
    saved = _read_json(config_path)
    for name in ("buffer_type", "noise_first"):  # the flags that did not exist then
        del saved[name]
    with open(config_path, "w") as f:
        json.dump(saved, f)
    assert fit.main([*old_run, "--epochs", "2"]) == 2
    error = capsys.readouterr().err
    assert ("this command changes: --buffer_type persistent --no-noise_first (add them"
            in error), error
    assert _read_json(config_path) == saved, "the run's own settings must be kept"


def test_divergence_is_rolled_back_then_reported(tmp_path, capsys):
    config, _ = fit.resolve_config([
        "--model", "jem", "--model_dir", str(tmp_path / "div"), *TINY,
        "--divergence_threshold", "1e-6", "--max_rollbacks", "1",
    ])
    with pytest.raises(RuntimeError, match="after 1 rollbacks"):
        fit.run(config)
    assert "rolling back to the last backup and continuing with seed 1001" in (
        capsys.readouterr().out)


def test_offline_cifar_fails_fast_with_instructions(tmp_path):
    start = time.time()
    result = run_cli(["--model", "jem", "--dataset", "cifar10", "--data_dir",
                      str(tmp_path / "tfds"), "--model_dir", str(tmp_path / "run")])
    assert result.returncode == 3, result.stderr[-2000:]
    assert "cifar10" in result.stderr and str(tmp_path / "tfds") in result.stderr
    assert "manual_dir" in result.stderr
    assert time.time() - start < 90


def test_cifar10_path_end_to_end_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    config, _ = fit.resolve_config([
        "--model", "sadajem", "--dataset", "cifar10", "--model_dir", str(tmp_path / "c10"),
        "--depth", "10", "--width", "1", "--batch_size", "8", "--px_batch_size", "8",
        "--buffer_size", "100", "--buffer_covariance", "diagonal", "--num_validation", "16",
        "--epochs", "1", "--steps_per_epoch", "2", "--num_steps", "1", "--jit_compile", "false",
        "--verbose", "2",
    ])
    with tfds.testing.mock_data(num_examples=64):
        metrics = fit.run(config)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    model = keras.saving.load_model(str(tmp_path / "c10" / "model.keras"))
    assert model.image_shape == (32, 32, 3) and model.sam is not None
    assert os.path.exists(tmp_path / "c10" / "checkpoints" / "best.weights.h5")
