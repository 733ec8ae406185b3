"""The shipped recipes of the methods after DPO (InPO, SmPO, RankDPO, dense, NPO, Self-NPO) train: each runs `diffalign train` in-process
from the recipe itself, on the tiny builtin pipeline of its family, for two steps.

Only what a CPU test must change is overridden: the tiny model (no separate VAE, no SFT'd start), a tiny data source
(the Pick-a-Pic-format demo pairs in place of the Pick-a-Pic path; a few toy-world prompts ranked by the toy checklist
in place of the Syn-Pic prompts and reward models), a tiny resolution, fp32 (fp16 needs a GPU), no lr scaling, batch 1
and two steps. The method sections, the data settings and the optimizers are the recipes' own: InPO's and SmPO's
inversion grids, SmPO's PickScore scores (here a tiny random PickScore, scored at prepare time) and official bounds,
RankDPO's K = 4 and phi, the dense discount, NPO's flip and LoRA, Self-NPO's teacher (on a few toy scenes in place of
the captioned-image folder).

The recipes of one family that share a cache in real use (sd15_dpo's, sdxl_dpo's) share it here too: the first case
of a family builds it and the others reuse it (SmPO adds its PickScore scores beside the latents).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from diffalign.cli import main
from diffalign.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

# In this order, a family's shared cache is read both after SmPO scored it (sd15) and before (sdxl).
FAMILY = {"sd15_smpo": "sd15", "sd15_inpo": "sd15", "sd15_dense": "sd15", "sdxl_inpo": "sdxl", "sdxl_smpo": "sdxl",
          "sdxl_rankdpo": "sdxl", "sd15_npo": "sd15", "sdxl_npo": "sdxl", "sd15_self_npo": "sd15", "sdxl_self_npo": "sdxl"}
TINY = {"sd15": "builtin:tiny-sd15", "sdxl": "builtin:tiny-sdxl"}
COMMON = [
    "model.vae=null", "model.init_from=null",
    "data.resolution=32", "data.shard_size=8", "data.latent_dtype=float32", "data.decode_workers=2",
    "train.mixed_precision=no", "optim.scale_lr=false", "train.batch_size=1", "train.grad_accum=1", "train.max_steps=2",
    "train.dataloader_workers=0", "log.tracker=none", "log.progress=false",
]
# RankDPO's Syn-Pic source, made tiny: toy-world prompts the toy checklist can rank, 2 sampling steps, K = 4 as the recipe.
SYNTHETIC = ("data.source={kind: synthetic, prompts: toy-train, num_prompts: 4, images_per_prompt: 4, scorers: [toy-checklist], "
             "num_inference_steps: 2}")


@pytest.fixture(scope="module")
def shared(tmp_path_factory, demo_parquet) -> dict:
    """Per-module folders: the caches (one per family and source) and a tiny random PickScore for SmPO's `data.scores`."""
    from tiny_scorers import write_clip_folder

    root = tmp_path_factory.mktemp("method-recipes")
    return {"root": root, "parquet": demo_parquet, "pickscore": write_clip_folder(root / "pickscore")}


def _overrides(name: str, shared: dict) -> list[str]:
    family, root = FAMILY[name], shared["root"]
    args = [f"model.pretrained={TINY[family]}", *COMMON, f"train.output_dir={root / 'runs' / name}"]
    if name == "sdxl_rankdpo":
        return [*args, SYNTHETIC, f"data.cache_dir={root / f'cache-{family}-synthetic'}"]
    if name.endswith("_self_npo"):  # the captioned-image folder, made tiny: a few toy scenes with their captions
        return [*args, "data.source={kind: toy_scenes, images_per_caption: 1}", "data.max_items=4",
                f"data.cache_dir={root / f'cache-{family}-scenes'}"]
    cache = f"cache-{family}-npo" if name.endswith("_npo") else f"cache-{family}-pairs"  # NPO's pairing and ties differ
    args += [f"data.source.path={shared['parquet']}", f"data.cache_dir={root / cache}"]
    if name.endswith("_smpo"):
        args.append(f"data.score_options={{pickscore: {{path: {shared['pickscore']}}}}}")
    return args


@pytest.mark.parametrize("name", list(FAMILY))
def test_method_recipe_trains_on_the_tiny_model(name, shared):
    recipe = load_config(name)
    args = _overrides(name, shared)
    cfg = load_config(name, args)
    assert cfg.method == recipe.method  # the recipe's own method section trains
    assert main(["train", name, *args]) == 0

    run = Path(cfg.train.output_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["loss"] >= 0 for r in rows)  # finite (not NaN), non-negative
    if recipe.model.finetune == "lora":  # NPO: the LoRA offset, exported with the run's config (which names the method)
        assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
        assert load_config(run / "final" / "config.yaml").method.name == recipe.method.name
    else:
        assert (run / "final" / "unet" / "config.json").is_file()
    if name.endswith("_smpo"):  # PickScore scored the cache at prepare time; pairs ordered by it: p >= 1/2
        assert (Path(cfg.data.cache_dir) / "scores" / "pickscore" / "summary.json").is_file()
        assert all(r["p"] >= 0.5 for r in rows)


def _sft_command(name: str) -> list[str]:
    """The overrides of the header's `diffalign train sd15_dpo ...` command that makes the SFT'd starting UNet."""
    text = (Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml").read_text()
    command = next(line for line in text.splitlines() if line.startswith("#            diffalign train sd15_dpo "))
    words = shlex.split(command.lstrip("#"))
    assert words[:3] == ["diffalign", "train", "sd15_dpo"]
    return words[3:]


@pytest.mark.parametrize("name", ["sd15_inpo", "sd15_smpo"])
def test_the_sd15_header_command_writes_where_init_from_reads(name):
    """The SD1.5 recipes start from an SFT'd UNet that is not released; their header's command makes a stand-in
    (supervised fine-tuning with sd15_dpo's data and optimizer) whose final/ is the recipe's `model.init_from`."""
    made = load_config("sd15_dpo", _sft_command(name))
    assert made.method.name == "sft"
    assert load_config(name).model.init_from == f"{made.train.output_dir}/final"


def test_sd15_inpo_starts_from_what_the_header_command_makes(shared):
    """The header's command on the tiny model, then sd15_inpo with `model.init_from` at its output."""
    name, root = "sd15_inpo", shared["root"]
    sft_dir = root / "runs" / "sd15_sft"
    assert main(["train", "sd15_dpo", *_sft_command(name), *_overrides(name, shared), f"train.output_dir={sft_dir}"]) == 0
    assert (sft_dir / "final" / "unet" / "config.json").is_file()
    args = [*_overrides(name, shared), f"model.init_from={sft_dir / 'final'}", f"train.output_dir={root / 'runs' / 'sd15_inpo_from_sft'}"]
    assert main(["train", name, *args]) == 0
