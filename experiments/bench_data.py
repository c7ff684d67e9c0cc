"""Benchmark: random 224 crops + reference augmentation, from the cache vs per-sample PNG decode.

Both paths run the same albumentations pipeline (RandomScale(0.2, p=0.5) -> RandomCrop(224) ->
VerticalFlip -> HorizontalFlip -> Normalize) on the same images, in one process:

* png:   decode the 1024x1024 PNG and its RLE mask for every sample (what a plain Dataset does);
* cache: read a 280x280 window from the memory-mapped cache (enough for the scale + crop).

Also measures the cache build and the time to open it. Prints a table and writes JSON.

    python experiments/bench_data.py --json bench/data.json
"""

import argparse
import time
from pathlib import Path

import albumentations as A
import numpy as np

from bldseg.data.cache import DatasetCache, ensure_cache
from bldseg.data.dataset import RandomCropDataset, window_for
from bldseg.data.readers import load_record, read_competition_csv
from bldseg.data.synthetic import generate_world
from bldseg.io import write_json


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


def time_samples(fn, n: int) -> float:
    """Samples per second of ``fn(i)`` over ``n`` calls (after one warm-up call)."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--root", default="bench/data_world", help="where the bench world goes")
    parser.add_argument("--images", type=int, default=16, help="1024x1024 training images")
    parser.add_argument("--size", type=int, default=1024, help="training image size")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--samples", type=int, default=200, help="samples timed per path")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    root = Path(args.root)
    world = root / "world"
    generate_world(world, n_train=args.images, train_size=args.size, n_test=4, test_size=224)
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
        window=window_for(args.crop, 0.2),
        samples_per_epoch=args.samples + 1,
    )

    def cache_sample(i: int) -> None:
        ds[i]

    png_rate = time_samples(png_sample, min(args.samples, 60))
    cache_rate = time_samples(cache_sample, args.samples)
    results = {
        "images": args.images,
        "image_size": args.size,
        "crop": args.crop,
        "cache_build_s": round(build_s, 3),
        "cache_open_ms": round(open_ms, 3),
        "png_samples_per_s": round(png_rate, 1),
        "cache_samples_per_s": round(cache_rate, 1),
        "speedup": round(cache_rate / png_rate, 1),
    }
    print(f"\n{'path':<8}{'samples/s':>12}")
    print(f"{'png':<8}{png_rate:>12.1f}")
    print(f"{'cache':<8}{cache_rate:>12.1f}")
    print(f"speed-up: {cache_rate / png_rate:.1f}x (target >= 10x)")
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
