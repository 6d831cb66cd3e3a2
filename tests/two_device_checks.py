"""The checks scripts on 2 logical CPU devices, run one after the other in one fresh interpreter.

`python tests/two_device_checks.py [--nice N] DIR NAME ...` runs `main` of `tests/NAME_checks.py`
for each NAME (`distribute`, `fifo`, `modes`) in the order given. Each writes `DIR/NAME.json`
exactly as `python tests/NAME_checks.py DIR/NAME.json` would, then this script writes
`DIR/NAME.done`. TensorFlow starts once for all of them, and `tests/conftest.py` starts this
script in the background as the pytest session starts, so that its minute and a half of work
(mostly Python tracing, on one core) overlaps the tests that run before the ones reading its
results (`testing.two_device_results`).
"""

import argparse
import importlib
import os
import shutil
import sys
import threading
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NAMES = ("distribute", "fifo", "modes")


def _exit_when_orphaned(parent, out_dir):
    """Ends this process and removes `out_dir` once `parent` (the pytest process) is gone, as
    after a hard kill of pytest, instead of finishing checks nobody will read."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        shutil.rmtree(out_dir, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nice", type=int, default=0,
                        help="lower this process's priority by N (a background run)")
    parser.add_argument("--parent", type=int, default=None,
                        help="exit (removing OUT_DIR) when the process of this pid is gone")
    parser.add_argument("out_dir")
    parser.add_argument("names", nargs="+", choices=NAMES)
    args = parser.parse_args(argv[1:])
    if args.nice:
        os.nice(args.nice)
    if args.parent:
        _exit_when_orphaned(args.parent, args.out_dir)
    from tests import two_devices  # noqa: F401  (splits the CPU: before any TensorFlow op)

    for name in args.names:
        try:
            module = importlib.import_module(f"tests.{name}_checks")
            module.main([module.__file__, os.path.join(args.out_dir, f"{name}.json")])
        except Exception:  # noqa: BLE001 (the test reading NAME.json fails with this traceback)
            traceback.print_exc()
            print(f"two_device_checks: {name} failed", file=sys.stderr, flush=True)
        with open(os.path.join(args.out_dir, f"{name}.done"), "w"):
            pass


if __name__ == "__main__":
    main(sys.argv)
