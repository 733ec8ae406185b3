"""Draw the hand-labelled set's images from the shipped toy model (run once; the images are committed).

    python tests/data/toy_labels/sample.py            # writes images/NNN.png and samples.jsonl here
    python tests/data/toy_labels/sample.py --sheets   # also contact sheets (sheets/*.png) to label by eye

120 samples: 30 per setting, so the set holds the model's typical and its failing images (no guidance
gets colours wrong, high guidance over-saturates, 4 DDIM steps leave noise), over held-out and
training captions alike. They were drawn with zero embeddings in the unconditional branch of guidance (the
SDXL pipeline default diffalign used before it read the toy model's own convention, the encoded ""), which
makes more of them fail; the script keeps that setting so it reproduces them. Labels (labels.json) were
written by a person looking at the sheets, without the checklist's answers in view;
tests/test_toy_labels.py checks the checklist against them.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).parent
SETTINGS = [  # (guidance, DDIM steps), 30 samples each
    (1.0, 20),
    (3.0, 20),
    (6.0, 20),
    (3.0, 4),
]


def draw_samples() -> list[dict]:
    from diffalign.config import BUILTIN_TOY, ModelConfig
    from diffalign.models.loading import load_components
    from diffalign.models.sampling import sample_images
    from diffalign.toy.scenes import HELD_OUT, TRAIN

    rng = random.Random(2026)
    captions = [s.caption for s in HELD_OUT + TRAIN]
    components = load_components(ModelConfig(pretrained=BUILTIN_TOY))
    components.zero_empty_prompt = True  # as the committed images were drawn (see the module docstring)
    (HERE / "images").mkdir(exist_ok=True)
    rows = []
    for guidance, steps in SETTINGS:
        chosen = rng.sample(captions, 30)
        seeds = [rng.randrange(2**31) for _ in chosen]
        images = sample_images(components, chosen, seeds, num_inference_steps=steps, guidance_scale=guidance, resolution=32)
        for caption, seed, image in zip(chosen, seeds, images):
            name = f"images/{len(rows):03d}.png"
            image.save(HERE / name)
            rows.append({"file": name, "caption": caption, "seed": seed, "guidance_scale": guidance, "num_inference_steps": steps})
    with open(HERE / "samples.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def contact_sheets(rows: list[dict], per_sheet: int = 12, scale: int = 8) -> None:
    """Sheets of numbered, enlarged samples with their captions; ticks in the margin mark the middle ±8%."""
    font = ImageFont.load_default(size=15)
    side = 32 * scale
    pad, head = 14, 40
    cols = 4
    (HERE / "sheets").mkdir(exist_ok=True)
    for start in range(0, len(rows), per_sheet):
        chunk = rows[start : start + per_sheet]
        n_rows = (len(chunk) + cols - 1) // cols
        sheet = Image.new("RGB", (cols * (side + 2 * pad), n_rows * (side + head + 2 * pad)), (200, 230, 255))
        draw = ImageDraw.Draw(sheet)
        for i, r in enumerate(chunk):
            x = (i % cols) * (side + 2 * pad) + pad
            y = (i // cols) * (side + head + 2 * pad) + head
            im = Image.open(HERE / r["file"]).convert("RGB").resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(im, (x, y))
            words = r["caption"].removeprefix("a ").replace(" background", " bg")
            draw.text((x, y - head + 2), f"#{start + i:03d}", fill="black", font=font)
            draw.text((x, y - head + 20), words, fill="black", font=font)
            for f in (0.42, 0.58):  # centre tolerance ticks on all four sides
                p = int(f * side)
                draw.line([(x + p, y + side), (x + p, y + side + pad - 2)], fill="red", width=2)
                draw.line([(x - pad + 2, y + p), (x, y + p)], fill="red", width=2)
        sheet.save(HERE / "sheets" / f"sheet_{start // per_sheet:02d}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sheets", action="store_true", help="also write contact sheets to label by eye")
    args = parser.parse_args()
    rows = draw_samples()
    if args.sheets:
        contact_sheets(rows)
