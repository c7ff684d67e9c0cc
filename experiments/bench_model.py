"""Benchmark: parameter counts of every model variant, and CPU (or GPU) forward+backward
throughput of UPerNet-InternImage with the compiled DCNv3 op vs the pure-PyTorch reference.

    python experiments/bench_model.py --json bench/model.json
    python experiments/bench_model.py --model upernet_internimage_t --size 224 --batch 8

Prints a table and writes JSON. Published sizes (ImageNet classifiers / UPerNet with 150
classes): T 30M / 59M, S 50M / 80M, B 97M / 128M.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from bldseg.models import create_backbone, create_model

PUBLISHED = {
    "internimage_t": 30e6,
    "internimage_s": 50e6,
    "internimage_b": 97e6,
    "upernet_internimage_t": 59e6,
    "upernet_internimage_s": 80e6,
    "upernet_internimage_b": 128e6,
}


def n_params(m: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in m.parameters())


def throughput(
    model_name: str, impl: str, size: int, batch: int, iters: int, device: torch.device
) -> float:
    """Images per second of forward + backward (training mode), best of ``iters``."""
    torch.manual_seed(0)
    model = create_model(model_name, impl=impl).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    best = float("inf")
    for i in range(iters + 1):
        t0 = time.perf_counter()
        out = model(x)
        loss = out["logits"].mean() + out["aux_logits"].mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first iteration warms up allocators and the op
            best = min(best, time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return batch / best


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="upernet_internimage_t")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)

    counts = {}
    print(f"{'model':<28}{'params':>14}{'published':>12}{'diff':>8}")
    for name, pub in PUBLISHED.items():
        kw = {"num_classes": 1000} if name.startswith("internimage") else {"num_classes": 150}
        build = create_backbone if name.startswith("internimage") else create_model
        n = n_params(build(name, **kw))
        n1 = None if name.startswith("internimage") else n_params(create_model(name))
        counts[name] = {"params": n, "published": pub, "params_one_class": n1}
        print(f"{name:<28}{n / 1e6:>13.2f}M{pub / 1e6:>11.0f}M{100 * (n - pub) / pub:>7.2f}%")
    tiny = n_params(create_model("upernet_internimage_tiny"))
    counts["upernet_internimage_tiny"] = {"params": tiny}
    print(f"{'upernet_internimage_tiny':<28}{tiny / 1e6:>13.2f}M")
    print(
        "(internimage_*: with the ImageNet head; upernet_*: with 150 classes as published; our"
        " one-class models are smaller by the two classifiers)"
    )

    rates = {
        impl: throughput(args.model, impl, args.size, args.batch, args.iters, device)
        for impl in ("compiled", "reference")
    }
    print(
        f"\n{args.model} fwd+bwd, batch {args.batch} at {args.size}px on {device} "
        f"({torch.get_num_threads()} threads):"
    )
    for impl, r in rates.items():
        print(f"  {impl:<10}{r:8.2f} images/s")
    print(f"  speed-up  {rates['compiled'] / rates['reference']:8.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "params": counts,
                    "throughput": {
                        "model": args.model,
                        "size": args.size,
                        "batch": args.batch,
                        "device": str(device),
                        "images_per_s": rates,
                    },
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
