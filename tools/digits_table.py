"""The digits study; an alias of `python -m tools.study --dataset digits`.

    python -m tools.digits_table --output_dir reports/digits
    python -m tools.digits_table --models softmax,jem --output_dir reports/digits --skip_existing

Every flag of `tools.study` is accepted (see `python -m tools.study --help`).
"""

import sys

from tools import study


def main(argv=None):
    return study.main(argv, prog="python -m tools.digits_table", default_dataset="digits")


if __name__ == "__main__":
    sys.exit(main())
