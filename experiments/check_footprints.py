"""Checks footprint rasterisation against a mask someone else burned from the same polygons.

    python experiments/check_footprints.py --image scene.tif --footprints buildings.geojson \\
        --expected scene_mask.tif [--all-touched] [--json out.json]

Burns --footprints into the pixel grid of --image with bldseg.data.geo.rasterize_footprints,
compares with --expected (a raster of the same size; > 0 is a building), prints a table
(pixels, expected positives, ours, agreement %, IoU, differing pixels) and writes JSON.
Needs the geo extra: pip install 'bldseg[geo]'.
"""

import argparse
import warnings
from pathlib import Path

import numpy as np

from bldseg.data.geo import rasterize_footprints, require_geo
from bldseg.io import write_json


def read_expected(path: Path) -> np.ndarray:
    """Band 1 of the expected mask as bool (H, W); it needs no georeference."""
    import rasterio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return src.read(1) > 0


def compare(ours: np.ndarray, expected: np.ndarray) -> dict:
    """Pixel counts, agreement and IoU of two (H, W) boolean masks."""
    tp = int(np.logical_and(ours, expected).sum())
    fp = int(np.logical_and(ours, ~expected).sum())
    fn = int(np.logical_and(~ours, expected).sum())
    union = tp + fp + fn
    return {
        "pixels": int(ours.size),
        "expected_positives": int(expected.sum()),
        "our_positives": int(ours.sum()),
        "agreement_pct": 100.0 * (1.0 - (fp + fn) / ours.size),
        "iou": tp / union if union else 1.0,  # two empty masks agree perfectly
        "differing_pixels": fp + fn,
        "ours_only": fp,
        "expected_only": fn,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--image", required=True, type=Path, help="georeferenced GeoTIFF")
    p.add_argument("--footprints", required=True, type=Path, help="GeoJSON/Shapefile/GeoPackage")
    p.add_argument("--expected", required=True, type=Path, help="reference mask (> 0 = building)")
    p.add_argument("--all-touched", action="store_true", help="burn every pixel a polygon touches")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args()
    require_geo(f"{args.expected}: reading the expected mask")

    ours = rasterize_footprints(args.image, args.footprints, all_touched=args.all_touched) > 0
    expected = read_expected(args.expected)
    if ours.shape != expected.shape:
        raise SystemExit(
            f"{args.expected}: the expected mask is {expected.shape[0]}x{expected.shape[1]} but "
            f"{args.image} is {ours.shape[0]}x{ours.shape[1]}; give the mask of this image"
        )
    m = compare(ours, expected)

    print(f"image      {args.image}\nfootprints {args.footprints}\nexpected   {args.expected}")
    print(f"all_touched={args.all_touched}\n")
    header = f"{'pixels':>10} {'expected +':>10} {'ours +':>10} {'agree %':>8} {'IoU':>7}"
    header += f" {'differing':>10} {'ours only':>10} {'exp. only':>10}"
    print(header)
    print(
        f"{m['pixels']:>10} {m['expected_positives']:>10} {m['our_positives']:>10} "
        f"{m['agreement_pct']:>8.3f} {m['iou']:>7.4f} {m['differing_pixels']:>10} "
        f"{m['ours_only']:>10} {m['expected_only']:>10}"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "image": str(args.image),
            "footprints": str(args.footprints),
            "expected": str(args.expected),
            "all_touched": args.all_touched,
            **m,
        }
        write_json(args.json, record)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
