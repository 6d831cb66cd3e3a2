"""tools.study (and its alias tools.digits_table): rows, aggregation, tables, one tiny real run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import testing
from tools import digits_table
from tools import study

FASHION_OOD = ("uniform_noise", "vertical_flip", "mnist_like_digits", "interpolation", "constant")


def _fake_run(root, name, accuracy, ece, aurocs, density="logsumexp", seconds=100.0):
    """A run directory as trainers.fit + trainers.evaluate leave it."""
    run_dir = os.path.join(root, name)
    os.makedirs(os.path.join(run_dir, "eval"))
    os.makedirs(os.path.join(run_dir, "samples"))
    for epoch in (1, 2):
        open(os.path.join(run_dir, "samples", f"epoch_{epoch:03d}.png"), "w").close()
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump({"train_seconds": seconds, "epochs": 2}, f)
    ood = {density: {}, "max_softmax": {}}
    for ood_set, (log_px, max_pyx) in aurocs.items():
        ood[density][ood_set] = {"auroc": log_px}
        ood["max_softmax"][ood_set] = {"auroc": max_pyx}
    tasks = {"accuracy": {"results": {"accuracy": accuracy}},
             "calibration": {"results": {"ece": ece}},
             "ood": {"results": ood}}
    with open(os.path.join(run_dir, "eval", "eval.json"), "w") as f:
        json.dump({"tasks": tasks}, f)
    return run_dir


def test_rows_aggregation_and_table(tmp_path):
    aurocs = {s: (0.5 + 0.1 * i, 0.9 - 0.1 * i) for i, s in enumerate(FASHION_OOD)}
    softmax = study.summarize("softmax", 1, _fake_run(tmp_path, "softmax", 0.90, 0.02, aurocs),
                              FASHION_OOD, eval_seconds=12.0)
    assert softmax["auroc_log_px_vertical_flip"] == 0.6
    assert softmax["auroc_max_pyx_constant"] == pytest.approx(0.5)
    assert softmax["samples"] == os.path.join("softmax", "samples", "epoch_002.png")
    jem_rows = [
        study.summarize("jem", seed, _fake_run(tmp_path, name, accuracy, 0.01 * seed, aurocs,
                                               seconds=600.0 + seed), FASHION_OOD)
        for seed, name, accuracy in ((1, "jem", 0.86), (2, "jem-seed2", 0.88),
                                     (3, "jem-seed3", 0.89))
    ]
    summary = study.aggregate(jem_rows)
    accuracies = np.array([0.86, 0.88, 0.89])
    assert summary["seeds"] == [1, 2, 3]
    assert summary["test_accuracy"] == pytest.approx(accuracies.mean())
    assert summary["test_accuracy_std"] == pytest.approx(np.sqrt(np.mean(
        (accuracies - accuracies.mean()) ** 2)))
    assert summary["ece"] == pytest.approx(0.02)
    assert summary["train_seconds"] == pytest.approx(602.0)
    table = study.to_markdown([study.aggregate([softmax]), summary], FASHION_OOD,
                              "FID (FMNIST-CNN)", baseline=0.90)
    lines = table.splitlines()
    assert "vs v-flip" in lines[0] and "FID (FMNIST-CNN)" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    jem_line = next(line for line in lines if line.startswith("| JEM |"))
    # 87.67% mean, -2.33 points against the softmax's 90%.
    assert "87.67% ± 1.25" in jem_line and "| -2.33 |" in jem_line
    assert "0.600 / 0.800" in jem_line  # vertical flip: log p(x) / max p(y|x)
    seeds = study.seeds_markdown(jem_rows, FASHION_OOD).splitlines()
    assert len(seeds) == 2 + 3 and "| JEM | 2 | 88.00% |" in seeds[3]


def test_gmmc_uses_its_energy_and_igebm_has_generation_columns_only(tmp_path):
    aurocs = {"uniform_noise": (0.99, 0.7)}
    row = study.summarize("gmmc-joint", 1, _fake_run(tmp_path, "gmmc-joint", 0.8, 0.05, aurocs,
                                                     density="energy"), ("uniform_noise",))
    assert row["density_score"] == "energy" and row["auroc_log_px_uniform_noise"] == 0.99
    row = study.summarize("igebm", 1, _fake_run(tmp_path, "igebm", 0.1, 0.5, aurocs),
                          ("uniform_noise",))
    assert "test_accuracy" not in row and "auroc_log_px_uniform_noise" not in row
    line = study.to_markdown([study.aggregate([dict(row, fid=12.5)])], ("uniform_noise",),
                             "FID (FMNIST-CNN)", baseline=0.9).splitlines()[2]
    assert line.startswith("| IGEBM | 1 | – | – | – | – | 12.5 |")


def test_bad_flags_stop_before_any_work(tmp_path, capsys):
    for argv, message in ((["--dataset", "cifar10"], "invalid choice"),
                          (["--dataset", "digits", "--models", "jem,vae"], "unknown models"),
                          (["--dataset", "digits", "--seeds", "1,x"], "--seeds")):
        with pytest.raises(SystemExit):
            study.main(argv + ["--output_dir", str(tmp_path / "out")])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--models", "jem"])  # --dataset is required
    assert not os.path.exists(tmp_path / "out")


def test_table_only_trains_nothing_and_names_what_is_missing(tmp_path, monkeypatch, capsys):
    aurocs = {s: (0.7, 0.6) for s in FASHION_OOD}
    for name, accuracy in (("softmax", 0.80), ("softmax-seed2", 0.84), ("jem", 0.70),
                           ("sadajem", 0.72), ("sadajem-seed2", 0.76)):
        run_dir = _fake_run(tmp_path, name, accuracy, 0.05, aurocs)
        open(os.path.join(run_dir, "model.keras"), "w").close()

    def no_work(*args, **kwargs):
        raise AssertionError("--table_only must not train or evaluate")

    monkeypatch.setattr(study, "run_logged", no_work)
    monkeypatch.setattr(study, "fid_scores", lambda *args, **kwargs: None)
    code = study.main(["--dataset", "fashion_mnist", "--models", "softmax,jem,sadajem",
                       "--seeds", "1,2", "--table_only", "--output_dir", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "table.json").read_text())
    assert report["not_trained"] == ["jem-seed2"]
    assert [(r["model"], r["seed"]) for r in report["rows"]] == [
        ("softmax", 1), ("softmax", 2), ("jem", 1), ("sadajem", 1), ("sadajem", 2)]
    table = (tmp_path / "table.md").read_text()
    assert "| JEM | 1 | 70.00%" in table and "| SADA-JEM | 1,2 | 74.00% ± 2.00" in table
    assert "Not trained (left out of this table): jem-seed2." in table
    # The softmax is seeded too, and the deltas are against its mean (82%).
    assert "| softmax | 1,2 | 82.00% ± 2.00 | +0.00 |" in table
    assert "| JEM | 1 | 70.00% | -12.00 |" in table
    assert "jem-seed2: not trained" in capsys.readouterr().out


@pytest.mark.large
def test_tiny_study_end_to_end(tmp_path):
    """softmax + JEM on digits, 2 steps each: the table, the seeds, FID and the alias."""
    output_dir = tmp_path / "study"
    command = [sys.executable, "-m", "tools.digits_table", "--models", "softmax,jem",
               "--seeds", "1,2", "--output_dir", str(output_dir), "--eval_examples", "60",
               "--fid_reference_examples", "300",
               "--fit_args", "--epochs 1 --steps_per_epoch 2 --buffer_size 100"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False,
                            cwd=testing.REPO, env=dict(os.environ, PYTHONPATH=testing.REPO))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((output_dir / "table.json").read_text())
    assert report["dataset"] == "digits" and not report["failures"]
    assert [(r["model"], r["seed"]) for r in report["rows"]] == [
        ("softmax", 1), ("softmax", 2), ("jem", 1), ("jem", 2)]
    for row in report["rows"]:
        assert 0 <= row["test_accuracy"] <= 1 and row["train_seconds"] > 0
        assert set(study.OOD_LABELS) >= {k.split("_", 3)[-1] for k in row if "auroc" in k}
    fid = report["fid"]
    assert fid["real_test"] >= 0 and set(fid["runs"]) == {"jem", "jem-seed2"}
    assert all(isinstance(v, float) and v > fid["real_test"] for v in fid["runs"].values())
    table = (output_dir / "table.md").read_text()
    assert "| JEM | 1,2 |" in table and "FID (digits-CNN)" in table
    assert (output_dir / "jem-seed2" / "model.keras").exists()
    assert digits_table.main is not None


def test_compare_evals_finds_the_one_number_that_differs(tmp_path, capsys):
    from tools import compare_evals

    report = {"tasks": {"accuracy": {"results": {"accuracy": 0.99, "n": 450}},
                        "ood": {"auroc": [0.91, 1.0], "seconds": 12.0, "ok": True}},
              "train_time": 80.0}
    for side, auroc, seconds in (("a", 1.0, 12.0), ("b", 0.999, 13.5)):
        changed = json.loads(json.dumps(report))
        changed["tasks"]["ood"]["auroc"][1] = auroc
        changed["tasks"]["ood"]["seconds"] = seconds
        (tmp_path / side / "jem" / "eval").mkdir(parents=True)
        (tmp_path / side / "jem" / "eval" / "eval.json").write_text(json.dumps(changed))
        if side == "b":  # a flag added between the runs, and a result the first run lacks
            changed["config"] = {"keep_backups": 2}
            changed["tasks"]["extra"] = 1.0
            (tmp_path / side / "jem" / "eval" / "eval.json").write_text(json.dumps(changed))
    (tmp_path / "a" / "softmax" / "eval").mkdir(parents=True)
    (tmp_path / "a" / "softmax" / "eval" / "eval.json").write_text(json.dumps(report))
    # By hand: 4 numbers besides the timings (accuracy, n, two AUROCs); only AUROC 1 differs.
    assert compare_evals.main([str(tmp_path / "a"), str(tmp_path / "b"), "--models", "jem"]) == 1
    out = capsys.readouterr().out
    assert "jem: 4 numbers compared, 1 differ" in out and "/tasks/ood/auroc/1: 1.0 vs 0.999" in out
    assert "results on one side only: ['/tasks/extra']" in out
    assert "settings on one side only: ['/config/keep_backups']" in out
    assert compare_evals.main([str(tmp_path / "a"), str(tmp_path / "a")]) == 0
    assert "softmax: 4 numbers compared, 0 differ" in capsys.readouterr().out
    assert compare_evals.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1  # softmax missing
    assert "softmax: missing" in capsys.readouterr().out
