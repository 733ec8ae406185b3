"""Parity of the scorers' differentiable tensor path with their official PIL path, in model-input space.

Every scorer takes PIL images through its official transform (exact) or a B×3×H×W tensor in [0, 1]
through a differentiable version (``torch.nn.functional.interpolate``, antialiased bicubic). The two
differ only in the resize kernel and in uint8 rounding, so the gap is measured where the model sees it:
the normalised pixels, for each transform family, over images of several sizes (smooth gradients, hard
edges and noise). Reported per family: mean and max |tensor − PIL| in normalised units (1 unit ≈ 0.27 of
the [0, 1] range), and the mean gap relative to the std of the PIL pixels.

    python benchmarks/scorer_parity.py --out benchmarks/results/scorer-parity.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from report import write_report

REPO = Path(__file__).resolve().parents[1]
SIZES = ((512, 512), (768, 512), (1024, 1024), (300, 450), (224, 224), (97, 150))  # (width, height)


def test_images(per_size: int = 4, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for w, h in SIZES:
        for _ in range(per_size):
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([xx / w, yy / h, (xx * yy) / (w * h)], -1) * rng.uniform(80, 255, 3)
            im = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(im)
            for _ in range(3):  # hard edges, where resize kernels differ most
                x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
                draw.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            out.append(im)
    return out


def families():
    from diffalign.scorers import preprocess as P
    from diffalign.scorers.hpsv3 import resize_image, smart_resize

    def qwen_pil(images):
        return [torch.from_numpy(np.asarray(resize_image(im), dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images]

    def qwen_tensor(x):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import resize

        h, w = smart_resize(x.shape[-2], x.shape[-1])
        return resize(x, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)

    return {
        "clip centre crop (transformers: PickScore, MPS)": (lambda ims: P.clip_center_crop(ims, crop="hf"),
                                                            lambda x: P.clip_center_crop_tensor(x, crop="hf")),
        "clip centre crop (torchvision: CLIPScore, aesthetic, ImageReward)": (lambda ims: P.clip_center_crop(ims, crop="torchvision"),
                                                                              lambda x: P.clip_center_crop_tensor(x, crop="torchvision")),
        "letterbox (HPSv2; antialias off, as released)": (lambda ims: P.letterbox(ims, antialias=False), P.letterbox_tensor),
        "Qwen2-VL smart resize (HPSv3), [0, 1] pixels": (qwen_pil, qwen_tensor),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-size", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from diffalign.scorers.preprocess import to_unit_tensor

    images = test_images(args.per_size)
    result = {"images": len(images), "sizes": SIZES, "families": {}}
    for name, (pil_path, tensor_path) in families().items():
        gaps, maxes, spreads = [], [], []
        for im in images:
            exact = pil_path([im])
            exact = exact[0] if isinstance(exact, list) else exact[0]
            approx = tensor_path(to_unit_tensor(im)[None])[0]
            diff = (approx - exact).abs()
            gaps.append(float(diff.mean()))
            maxes.append(float(diff.max()))
            spreads.append(float(exact.std()))
        result["families"][name] = {"mean_abs": float(np.mean(gaps)), "max_abs": float(np.max(maxes)),
                                    "relative_to_pixel_std": float(np.mean(gaps) / np.mean(spreads))}
    table = "| transform | mean abs gap | max abs gap | mean gap / pixel std |\n|---|---:|---:|---:|\n" + "".join(
        f"| {k} | {v['mean_abs']:.4f} | {v['max_abs']:.3f} | {v['relative_to_pixel_std']:.4f} |\n" for k, v in result["families"].items())
    write_report(args.out, result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
