"""Benchmark: random 224 crops + reference augmentation, from the cache vs per-sample PNG decode.

Both paths run the same albumentations pipeline (RandomScale(0.2, p=0.5) -> RandomCrop(224) ->
VerticalFlip -> HorizontalFlip -> Normalize) on the same images, in one process:

* png:   decode the 1024x1024 PNG and its RLE mask for every sample (what a plain Dataset does);
* cache: read a 280x280 window from the memory-mapped cache (enough for the scale + crop).

Both paths are timed ``--repeats`` times, in rounds that time each once (the order reversed
every other round, so a slow spell of the machine is shared): the table and the JSON give the
median and the min-max (``spread`` in the JSON holds every round), and the JSON the CPU and
thread counts. Also measures the cache build and the time to open it. Prints a table and
writes JSON.

    python experiments/bench_data.py --json bench/data.json
    python experiments/bench_data.py --root bench/data_world --size 512 --overwrite
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch

from bldseg.data.cache import DatasetCache, ensure_cache
from bldseg.data.dataset import RandomCropDataset, window_for
from bldseg.data.readers import load_record, read_competition_csv
from bldseg.data.synthetic import generate_world
from bldseg.io import write_json
from bldseg.timing import rounds, spread


def reference_pipeline(crop: int) -> A.Compose:
    """The reference workflow's training augmentation."""
    return A.Compose(
        [
            A.RandomScale(scale_limit=0.2, interpolation=1, p=0.5),
            A.RandomCrop(crop, crop),
            A.VerticalFlip(p=0.5),
            A.HorizontalFlip(p=0.5),
            A.Normalize(),
        ],
        seed=0,
    )


#: RandomScale's limit in :func:`reference_pipeline`: the cache's window must hold its crop.
SCALE_LIMIT = 0.2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--root", default="bench/data_world", help="where the bench world goes")
    parser.add_argument("--images", type=int, default=16, help="1024x1024 training images")
    parser.add_argument(
        "--size",
        type=int,
        default=1024,
        help="training image size; at least the window the crop needs (280 for --crop 224)",
    )
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--samples", type=int, default=200, help="samples timed per path")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds, each timing both paths (default 5): median and min-max",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a bench world in --root made with another --images/--size",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    for flag in ("images", "crop", "samples", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    window = window_for(args.crop, SCALE_LIMIT)
    if args.size < window:
        # RandomScale may shrink an image by SCALE_LIMIT before the crop: smaller images
        # cannot hold it (albumentations' CropSizeError) and the cache's window is this side.
        parser.error(
            f"--size {args.size} is smaller than the {window}x{window} window that "
            f"--crop {args.crop} needs after RandomScale({SCALE_LIMIT}); pass --size {window} "
            "or more, or a smaller --crop"
        )

    root = Path(args.root)
    world = root / "world"
    try:
        generate_world(
            world,
            n_train=args.images,
            train_size=args.size,
            n_test=4,
            test_size=224,
            overwrite=args.overwrite,
        )
    except ValueError as e:  # another bench world there (the message names --overwrite)
        parser.error(str(e))
    records = read_competition_csv(world / "train.csv")

    t0 = time.perf_counter()
    cache = ensure_cache(records, root / "cache")
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(20):
        DatasetCache(cache.root)
    open_ms = (time.perf_counter() - t0) / 20 * 1e3

    pipe = reference_pipeline(args.crop)
    rng = np.random.default_rng(0)
    order = rng.integers(0, len(records), size=args.samples + 1)

    def png_sample(i: int) -> None:
        image, mask = load_record(records[order[i]])
        pipe(image=image, mask=mask)

    ds = RandomCropDataset(
        cache,
        np.arange(len(records)),
        pipe,
        window=window,
        samples_per_epoch=args.samples + 1,
    )

    def cache_sample(i: int) -> None:
        ds[i]

    paths = {
        "png": (png_sample, min(args.samples, 60)),  # decoding is slow: fewer samples
        "cache": (cache_sample, args.samples),
    }
    for fn, _ in paths.values():
        fn(0)  # warm-up, outside the timed rounds

    def run(fn, n: int) -> None:
        for i in range(n):
            fn(i)

    seconds, _ = rounds(
        {name: (lambda fn=fn, n=n: run(fn, n)) for name, (fn, n) in paths.items()}, args.repeats
    )
    # samples per second of each path in each round
    per_round = {name: [paths[name][1] / s for s in seconds[name]] for name in paths}
    png_rate = statistics.median(per_round["png"])
    cache_rate = statistics.median(per_round["cache"])
    # paired within each round: both paths timed side by side
    ratios = [c / p for p, c in zip(per_round["png"], per_round["cache"], strict=True)]
    results = {
        "images": args.images,
        "image_size": args.size,
        "crop": args.crop,
        "cache_build_s": round(build_s, 3),
        "cache_open_ms": round(open_ms, 3),
        # medians over the rounds (min-max and every round in "spread")
        "png_samples_per_s": round(png_rate, 1),
        "cache_samples_per_s": round(cache_rate, 1),
        "speedup": round(cache_rate / png_rate, 1),
        "repeats": args.repeats,
        "spread": {
            "png_samples_per_s": spread(per_round["png"]),
            "cache_samples_per_s": spread(per_round["cache"]),
            "speedup": spread(ratios),
        },
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cv2_threads": cv2.getNumThreads(),  # albumentations' resizes run in OpenCV
    }
    print(f"\nmedian [min-max] of {args.repeats} rounds")
    print(f"{'path':<8}{'samples/s':>12}{'[min-max]':>20}")
    for name, rate in (("png", png_rate), ("cache", cache_rate)):
        sp = results["spread"][f"{name}_samples_per_s"]
        span = f"[{sp['min']:.1f}-{sp['max']:.1f}]"
        print(f"{name:<8}{rate:>12.1f}{span:>20}")
    sp = results["spread"]["speedup"]
    print(
        f"speed-up: {cache_rate / png_rate:.1f}x (per round {sp['min']:.1f}-{sp['max']:.1f}x; "
        "target >= 10x)"
    )
    print(
        f"cache of {args.images} x {args.size}^2: built in {build_s:.1f} s (0 if reused), "
        f"opens in {open_ms:.2f} ms"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, results)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
