"""Generates the built-in synthetic world (or reads --data) and builds its caches.

python experiments/prepare_data.py                 # built-in synthetic world
python experiments/prepare_data.py --data /path/to/competition   # folder with train.csv
"""

import argparse
import time

from bldseg.data.prepare import DEFAULT_DATA_ROOT, prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", default=None, help="folder with train.csv (default: synthetic)")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="where caches go")
    args = parser.parse_args()
    t0 = time.perf_counter()
    prepared = prepare_data(args.data, data_root=args.data_root)
    print(f"dataset: {prepared.root}")
    print(f"train cache: {prepared.train}")
    print(f"test cache:  {prepared.test}")
    print(f"ready in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
