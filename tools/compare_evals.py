"""Do two runs of a study give the same numbers? Compares their `eval.json` files value by value.

```
python -m tools.study --dataset digits --models softmax,jem --seeds 1 --output_dir /tmp/again
python -m tools.compare_evals reports/digits /tmp/again --models softmax,jem
```

For each model directory `<dir>/<model>/eval/eval.json` present on both sides, every number in
the two files (accuracies, ECE, AUROCs, FPRs, histograms, ...) is compared exactly, except
timings (keys holding "time" or "seconds"), which depend on the machine's load. Prints one line
per model with how many numbers were compared and which differ; exits 1 when any differs, a
model is missing on either side, or a result is on one side only. A setting on one side only
(under `config/`, e.g. a flag added to trainers.fit between the runs) is named, not failed.
"""

import argparse
import json
import os
import sys


def numbers(tree, path=""):
    """{"/a/b/0": value} of every int/float leaf (booleans excluded) of a JSON tree."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        is_number = isinstance(tree, (int, float)) and not isinstance(tree, bool)
        return {path: tree} if is_number else {}
    out = {}
    for key, value in items:
        out.update(numbers(value, f"{path}/{key}"))
    return out


def _timing(key):
    return "time" in key or "seconds" in key


def compare(first, second):
    """(number of values compared, [(key, first value, second value) that differ], keys found
    on one side only), timings left out."""
    a = {k: v for k, v in numbers(first).items() if not _timing(k)}
    b = {k: v for k, v in numbers(second).items() if not _timing(k)}
    shared = sorted(set(a) & set(b))
    differ = [(k, a[k], b[k]) for k in shared if a[k] != b[k]]
    return len(shared), differ, sorted(set(a) ^ set(b))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="a study's output directory")
    parser.add_argument("second", help="another run of the same study")
    parser.add_argument("--models", default=None,
                        help="comma-separated model directories (default: all on both sides)")
    args = parser.parse_args(argv)

    def path(base, model):
        return os.path.join(base, model, "eval", "eval.json")

    if args.models:
        models = [m for m in args.models.split(",") if m]
    else:
        models = sorted(m for m in os.listdir(args.first) if os.path.isfile(path(args.first, m)))
    same = True
    for model in models:
        files = [path(base, model) for base in (args.first, args.second)]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            print(f"{model}: missing {', '.join(missing)}")
            same = False
            continue
        with open(files[0]) as f0, open(files[1]) as f1:
            count, differ, one_sided = compare(json.load(f0), json.load(f1))
        settings = [k for k in one_sided if k.startswith("/config/")]
        results = [k for k in one_sided if k not in settings]
        print(f"{model}: {count} numbers compared, {len(differ)} differ"
              + (f", results on one side only: {results[:10]}" if results else "")
              + (f" (settings on one side only: {settings[:10]})" if settings else ""))
        for key, a, b in differ[:10]:
            print(f"    {key}: {a!r} vs {b!r}")
        same = same and not differ and not results
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
