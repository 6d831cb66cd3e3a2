"""`trainers.run_dir`: the flags and the config.json reading that trainers.evaluate and
trainers.sample share."""

import pytest

from trainers import evaluate
from trainers import run_dir
from trainers import sample


class Refused(Exception):
    pass


def test_read_config(tmp_path):
    with pytest.raises(Refused, match=r"--model_dir '.*nowhere' does not exist"):
        run_dir.read_config(str(tmp_path / "nowhere"), Refused)
    assert run_dir.read_config(str(tmp_path), Refused) is None
    (tmp_path / "config.json").write_text('{"dataset": "digits", "seed": 3}')
    assert run_dir.read_config(str(tmp_path), Refused) == {"dataset": "digits", "seed": 3}
    (tmp_path / "config.json").write_text('{"dataset": ')
    with pytest.raises(Refused, match=r"Could not read '.*config.json'"):
        run_dir.read_config(str(tmp_path), Refused)


@pytest.mark.parametrize("module", [evaluate, sample])
def test_shared_flags(module):
    extra = ["--task", "uncond"] if module is sample else []
    args = module.build_parser().parse_args(["--model_dir", "runs/jem", *extra])
    assert (args.model_dir, args.checkpoint, args.data_dir, args.split, args.seed,
            args.verbose) == ("runs/jem", None, None, "test", 0, False)
    with pytest.raises(SystemExit):
        module.build_parser().parse_args(extra)  # --model_dir is required


def test_evaluate_without_config_needs_a_dataset(tmp_path, capsys):
    (tmp_path / "model.keras").write_bytes(b"")
    assert evaluate.main(["--model_dir", str(tmp_path)]) == 2
    assert "config.json' is missing, so the dataset is unknown" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert evaluate.main(["--model_dir", str(tmp_path)]) == 2
    assert "config.json' has no 'dataset' entry" in capsys.readouterr().err


def test_sample_reads_the_config(tmp_path, capsys):
    (tmp_path / "model.keras").write_bytes(b"")
    (tmp_path / "config.json").write_text("not json")
    assert sample.main(["--model_dir", str(tmp_path), "--task", "uncond"]) == 2
    assert "Could not read" in capsys.readouterr().err
