"""The whole synthetic data step, `prepare_cache` (sample, score, φ, PNG, VAE-encode, write shards), as it was before
the method seam ("before": one prompt per pipeline call, and the toy checklist measuring each image once per question)
against now (a window of `prompts_per_call(K)` prompts per call, each image measured once).

Same model, prompts and seeds in one process; a warm-up of each, then 3 rounds interleaved (the order flips);
ratio of medians. "before" patches `diffalign.data.sources.synthetic.prompts_per_call` and the toy backend's
`answer` back to what they did (`_answer_per_question` below is that code); both give the same scores.

    python benchmarks/synthetic_prepare.py            # 64 toy training captions x K = 4, builtin:toy, 20 steps, 2 threads
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _answer_per_question(self, images, prompts, questions):
    """The toy checklist backend before the seam: `measure` once per question (9 times per image); same answers."""
    from diffalign.toy import checklist as tc

    tc.check_batch(images, prompts)
    margins = [[tc.margin(q.key, tc.measure(arr), p) for q in questions] for arr, p in zip(tc.as_uint8_arrays(images), prompts)]
    margins = torch.tensor(margins, dtype=torch.float64).reshape(len(margins), len(questions))
    if not self.graded:
        return (margins >= 0).float()
    scale = torch.tensor([tc.MARGIN_SCALE[q.key] for q in questions], dtype=torch.float64)
    return torch.sigmoid(margins / scale).float()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import diffalign.data.sources.synthetic as syn
    from diffalign.config import validate_config
    from diffalign.data import prepare_cache
    from diffalign.models.loading import load_components
    from diffalign.toy.checklist import ToyMeasurementBackend
    from diffalign.toy.scenes import TRAIN

    torch.set_num_threads(args.threads)
    window, answer = syn.prompts_per_call, ToyMeasurementBackend.answer
    work = Path(tempfile.mkdtemp())

    def config():
        source = {"kind": "synthetic", "prompts": [s.caption for s in TRAIN[: args.prompts]], "images_per_prompt": 4,
                  "num_inference_steps": args.steps, "guidance_scale": 3.0}
        return validate_config({"model": {"pretrained": "builtin:toy"}, "data": {"resolution": 32, "cache_dir": str(work / "cache"),
                                "random_flip": False, "latent_dtype": "float32", "source": source}})

    components = load_components(config().model)

    def run(one_per_call: bool) -> float:
        syn.prompts_per_call = (lambda k: 1) if one_per_call else window
        ToyMeasurementBackend.answer = _answer_per_question if one_per_call else answer
        shutil.rmtree(work / "cache", ignore_errors=True)
        started = time.perf_counter()
        prepare_cache(config(), components, progress=False)
        return time.perf_counter() - started

    run(True), run(False)
    times: dict[bool, list[float]] = {True: [], False: []}
    for order in ((True, False), (False, True), (True, False)):
        for variant in order:
            times[variant].append(run(variant))
    shutil.rmtree(work, ignore_errors=True)
    images = args.prompts * 4
    before, now = statistics.median(times[True]), statistics.median(times[False])
    print(f"prepare_cache, {args.prompts} prompts x K=4 = {images} images, {args.threads} threads: before {before:.2f} s "
          f"({before / images * 1000:.1f} ms/image), now (window of {window(4)} prompts) {now:.2f} s ({now / images * 1000:.1f} ms/image): "
          f"{before / now:.2f}x")


if __name__ == "__main__":
    main()
