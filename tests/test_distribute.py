"""tf.distribute: strategies from names, TF_CONFIG checks, and training on 2 logical CPUs.

The MirroredStrategy checks run once in a fresh interpreter (`tests/distribute_checks.py`): the
CPU must be split into two logical devices before TensorFlow initialises, which a pytest
process that already ran TensorFlow cannot do. The fixture `two_replicas` (`tests/conftest.py`)
holds their results; the session starts computing them in the background.
"""

import json

import pytest

from keras_jem import distribute
from trainers import fit


def section(results, name):
    value = results.get(name)
    assert value is not None, f"check {name} did not run"
    assert "error" not in value, f"{value['error']}\n{value.get('traceback', '')}"
    return value


# === One MirroredStrategy step == one device (same global batch) ===


@pytest.mark.parametrize("name", ["jem_same_update", "sadajem_same_update"])
def test_mirrored_step_equals_single_device_step(two_replicas, name):
    # SGD makes the update proportional to the gradient, so a loss term scaled by the replica
    # count or a per-replica SAM perturbation changes it by O(1); float32 reorderings and the
    # per-device batch of the convolutions stay below 1e-3 relative.
    assert two_replicas["num_replicas"] == 2
    result = section(two_replicas, name)
    assert result["update_norm"] > 1e-4
    assert result["max_relative_error"] < 2e-3, result
    # All 16 chains were continued and written back, identically on both replicas.
    assert result["buffer_change"] > 0
    assert result["buffer_max_difference"] < 1e-5
    assert result["buffer_copies_identical"]


def test_sam_perturbation_must_use_all_reduced_gradient(two_replicas):
    # Control for the test above: each replica perturbing with its own gradient is detected.
    result = section(two_replicas, "sadajem_same_update")["local_perturbation"]
    assert result["max_relative_error"] > 0.05, result


def test_replicas_draw_different_noise_and_disjoint_chains(two_replicas):
    result = section(two_replicas, "replica_noise")
    assert min(result["noise_std"]) > 0.5
    assert result["noise_max_abs_difference"] > 0.5
    first, second = result["indices"]
    # 40 chains over 2 replicas: replica 0 owns [0, 20), replica 1 owns [20, 40).
    assert all(0 <= i < 20 for i in first) and all(20 <= i < 40 for i in second)
    assert len(set(first)) == len(first) and len(set(second)) == len(second)


def test_buffer_holds_every_chain_exactly_once(two_replicas):
    result = section(two_replicas, "chains_and_checkpoints")
    assert result["census"]["ids"] == list(range(40)), "a chain was lost or duplicated"
    assert result["census"]["visits"] == result["expected_visits"], "a write was lost"
    assert result["copies_identical"]


@pytest.mark.parametrize("direction", ["two_to_one", "two_to_two", "one_to_two"])
def test_checkpoint_restores_onto_another_replica_count(two_replicas, direction):
    result = section(two_replicas, "chains_and_checkpoints")[direction]
    assert result["weights_equal"] and result["buffer_equal"] and result["seed_equal"], result
    assert result["iterations"] == result["global_step"]
    assert result["metadata_replicas"] == (1 if direction == "one_to_two" else 2)
    if "after_step" in result:  # training continues on the new replica count
        assert result["after_step"]["ids"] == list(range(40))
        assert result["after_step"]["visits"] == 8 * (result["global_step"] + 1)


def test_divergence_rollback_under_mirrored_strategy(two_replicas):
    result = section(two_replicas, "rollback")
    assert result["diverged"] and result["weights_moved_before_rollback"]
    assert result["restored_step"] == result["good_step"] == 4
    assert result["weights_restored"] and result["buffer_restored"]
    assert result["continued_to_step"] == 8


# === Strategy names, TF_CONFIG, global batch ===


def tf_config(workers=("127.0.0.1:2222", "127.0.0.1:2223"), task_type="worker", index=0):
    return json.dumps({"cluster": {"worker": list(workers)},
                       "task": {"type": task_type, "index": index}})


def test_parse_tf_config():
    assert distribute.parse_tf_config("") is None
    info = distribute.parse_tf_config(tf_config(index=1))
    assert (info["num_workers"], info["worker_index"], info["is_chief"]) == (2, 1, False)
    chief = distribute.parse_tf_config(json.dumps({
        "cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
        "task": {"type": "worker", "index": 0}}))
    assert (chief["num_workers"], chief["worker_index"], chief["is_chief"]) == (3, 1, False)


@pytest.mark.parametrize("text, expected", [
    ("{not json", "not valid JSON"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), "non-empty 'cluster'"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}}), "needs a 'task'"),
    (tf_config(index=2), "task index 2 is out of range for job 'worker', which has 2"),
    (tf_config(task_type="chief"), "task type 'chief' is not a job of the cluster"),
    (tf_config(workers=("127.0.0.1:1", "127.0.0.1:1")), "used by more than one task"),
    (tf_config(workers=("127.0.0.1", "127.0.0.1:2")), "is not 'host:port'"),
    (json.dumps({"cluster": {"worker": ["a:1"], "ps": ["b:1"]},
                 "task": {"type": "worker", "index": 0}}), "parameter servers"),
])
def test_inconsistent_tf_config_is_explained(text, expected):
    with pytest.raises(distribute.ClusterConfigError, match="Invalid TF_CONFIG") as info:
        distribute.parse_tf_config(text)
    assert expected in str(info.value)
    assert "Expected e.g." in str(info.value)


def test_global_batch_must_divide_by_replicas():
    distribute.check_global_batch(16, 2)
    with pytest.raises(ValueError, match="not divisible by 3.*e.g. 15 or 18"):
        distribute.check_global_batch(16, 3)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="Unknown strategy 'nccl'"):
        distribute.create_strategy("nccl")


@pytest.mark.parametrize("args, env, expected", [
    (["--strategy", "mirrored", "--num_devices", "3", "--batch_size", "16"], None,
     "--batch_size=16 is the global batch, split over 3 replicas"),
    (["--strategy", "mirrored", "--num_devices", "2", "--batch_size", "16",
      "--px_batch_size", "9"], None, "--px_batch_size=9"),
    (["--num_devices", "2"], None, "--num_devices sets the replicas of --strategy mirrored"),
    (["--strategy", "multi_worker"], tf_config(index=5), "task index 5 is out of range"),
    (["--strategy", "horovod"], None, "--strategy must be one of"),
])
def test_bad_distribution_flags_stop_before_any_work(tmp_path, capsys, monkeypatch, args, env,
                                                     expected):
    if env is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", env)
    code = fit.main(["--model_dir", str(tmp_path / "run"), *args])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_replica_logs_is_identity_outside_multi_worker():
    logs = {"loss": 1.0}
    assert distribute.replica_logs(logs) is logs
