"""A `trainers.fit` run directory, as the commands that read one (evaluate, sample) take it."""

import argparse
import json
import os


def build_parser(prog, description, checkpoint_help, split_help):
    """An argument parser with the flags of every command that reads a trained run.

    Args:
        prog: the command, e.g. "python -m trainers.sample".
        description: what it does, one line.
        checkpoint_help: what `--checkpoint` replaces.
        split_help: what `--split` is the data split of.

    Example:

    >>> parser = run_dir.build_parser("python -m trainers.sample", "Sample.", "...", "...")
    >>> parser.add_argument("--task", required=True)
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add = parser.add_argument
    add("--model_dir", required=True, help="directory written by trainers.fit")
    add("--checkpoint", default=None, help=checkpoint_help)
    add("--data_dir", default=None, help="TFDS data directory (default: config.json's)")
    add("--split", default="test", help=f"{split_help} (default test)")
    add("--seed", type=int, default=0)
    add("--verbose", action="store_true", help="show TensorFlow's C++ log lines")
    return parser


def read_config(model_dir, error):
    """`MODEL_DIR/config.json` as a dict, or None when there is none.

    Args:
        model_dir: the run directory (must exist).
        error: the exception class raised for a missing directory or an unreadable file.
    """
    if not os.path.isdir(model_dir):
        raise error(f"--model_dir {model_dir!r} does not exist.")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as failure:
        raise error(f"Could not read {path!r}: {failure}") from None
