"""A quiet, honest console for the command-line tools.

TensorFlow 2.21 prints C++ log lines that say nothing about the user's run: at import
(`I0000 ... port.cc] oneDNN custom operations are on`, `cudart_stub.cc] Could not find cuda
drivers`, twice, each preceded by `WARNING: All log messages before absl::InitializeLog()`), then
at run time (`E0000 ... failed call to cuInit`, `E0000 ... remapper failed: INVALID_ARGUMENT`).
`TF_CPP_MIN_LOG_LEVEL` does not reach the import-time lines: they are written by absl before
TensorFlow reads the variable (measured: they appear even with `TF_CPP_MIN_LOG_LEVEL=3`).

`setup()` is what every CLI calls before importing TensorFlow:

- by default it sets `TF_CPP_MIN_LOG_LEVEL=3` (the C++ INFO, WARNING and ERROR log lines are
  hidden; FATAL lines, Python exceptions, Python warnings and Python logging are not touched) and
  imports TensorFlow with the process's stderr (file descriptor 2) captured, then writes back
  every captured line that is not one of absl's log lines, so an import failure still shows;
- with `verbose=True`, or when the user has set `TF_CPP_MIN_LOG_LEVEL` themselves, it changes
  nothing: every line TensorFlow prints is shown.

`progress_verbosity()` is the Keras progress-bar policy: a live bar (`verbose=1`) when stdout is a
terminal, one line per epoch (`verbose=2`) when it is a file or a pipe (logs, CI).

Example:

```python
from trainers import console

def main(argv=None):
    args = build_parser().parse_args(argv)
    console.setup(verbose=args.verbose)  # before anything imports tensorflow
    import keras
    ...
    model.fit(ds, verbose=console.progress_verbosity())
```
"""

import os
import re
import sys
import tempfile

# absl's C++ log line prefix: severity letter, MMDD, time, thread id, file:line] ...
_ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ [^\]]+\] ")
_IMPORT_NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    # The second line of cpu_feature_guard.cc's INFO message.
    "To enable the following instructions:",
)


def _is_noise(line):
    return bool(_ABSL_LINE.match(line)) or line.startswith(_IMPORT_NOISE)


def setup(verbose=False):
    """Hides TensorFlow's C++ log lines unless asked; call it before importing TensorFlow.

    Args:
        verbose: show every TensorFlow log line (the `--verbose` flag of the CLIs).

    Returns:
        True when the lines are hidden, False when they are shown (`verbose`, or the user's own
        `TF_CPP_MIN_LOG_LEVEL`).
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if verbose or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return False
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if "tensorflow" not in sys.modules:
        _import_tensorflow_quietly()
    return True


def _import_tensorflow_quietly():
    """Imports TensorFlow with fd 2 captured; replays what is not absl log noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (closed, or an embedded interpreter)
        import tensorflow

        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines(keepends=True) if not _is_noise(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def progress_verbosity(verbose="auto", stream=None):
    """The Keras `verbose` argument: 1 (live bar) on a terminal, 2 (a line per epoch) otherwise.

    Args:
        verbose: "auto" (the policy), or 0, 1, 2 (or their strings) to force a mode.
        stream: the output the bar goes to (default `sys.stdout`).

    Returns:
        0, 1 or 2.
    """
    if str(verbose) == "auto":
        stream = sys.stdout if stream is None else stream
        isatty = getattr(stream, "isatty", None)
        return 1 if isatty is not None and isatty() else 2
    if str(verbose) not in ("0", "1", "2"):
        raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2. Received: verbose={verbose!r}")
    return int(verbose)
