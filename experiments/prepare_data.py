"""Generates the built-in synthetic world (or reads --data) and builds its caches.

python experiments/prepare_data.py                 # built-in synthetic world
python experiments/prepare_data.py --data /path/to/competition   # folder with train.csv
python experiments/prepare_data.py --data /path/to/inria --tile-size 512   # images/ + masks/
python experiments/prepare_data.py --images scenes/ --footprints labels/   # GeoTIFF + polygons
"""

import argparse
import time

from bldseg.data.prepare import add_data_arguments, data_options, prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_data_arguments(parser)
    args = parser.parse_args()
    t0 = time.perf_counter()
    try:
        prepared = prepare_data(
            args.data, options=data_options(args), data_root=args.data_root, verbose=True
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}") from e
    print(f"dataset: {prepared.root}")
    print(f"train cache: {prepared.train}")
    print(f"test cache:  {prepared.test}")
    print(f"ready in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
