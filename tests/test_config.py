"""The configuration: shipped recipes, official numbers, documentation of every field, and error messages.

Style-guide rules checked here (research/style_anchors.md, "Lessons"): 7 (every field documented at its
definition), 8 (airtight schema, every shipped YAML validated), 9 (each YAML opens with what it trains,
the command and an override example; precedence default < YAML < override), 11 (bad enum values name
the value and the allowed ones).
"""

from __future__ import annotations

import math
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml
from conftest import config_header
from pydantic import BaseModel

from diffalign.config import (
    Config,
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainConfig,
    dump_config,
    load_config,
    shipped_configs,
    validate_config,
)
from diffalign.config.loading import shipped_accelerate_configs

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
ACCELERATE_FILES = sorted((CONFIG_DIR / "accelerate").glob("*.yaml"))
CONFIG_FILES = sorted(set(CONFIG_DIR.rglob("*.yaml")) - set(ACCELERATE_FILES))


def _name(path: Path) -> str:
    """The shipped name of a recipe file: 'sdxl_dpo', 'toy/dpo'."""
    return str(path.relative_to(CONFIG_DIR).with_suffix(""))
REQUIRED_RECIPES = {"sd15_dpo", "sdxl_dpo", "sdxl_dpo_lora", "tiny_sdxl_dpo"}

OFFICIAL_GPUS = 16  # SalesforceAIResearch/DiffusionDPO README: "assuming 16 GPUs"
OFFICIAL_EFFECTIVE_BATCH = 2048  # launchers/*.sh: "Paper used 2048"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def raises(pattern: str):
    """`pytest.raises(ConfigError)` whose message must contain `pattern` literally."""
    return pytest.raises(ConfigError, match=re.escape(pattern))


# ----------------------------------------------------------------------------------- shipped recipes


def test_shipped_set_contains_the_recipes():
    assert REQUIRED_RECIPES <= set(shipped_configs())


def test_every_file_under_configs_is_shipped():
    assert CONFIG_FILES, "no YAML under configs/"
    assert {_name(p) for p in CONFIG_FILES} == set(shipped_configs())
    assert {_name(p) for p in ACCELERATE_FILES} == set(shipped_accelerate_configs()) == {
        "accelerate/single_gpu", "accelerate/multi_gpu", "accelerate/multi_node", "accelerate/fsdp2", "accelerate/deepspeed_zero2",
        "accelerate/deepspeed_zero3"}


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=lambda p: p.name)
def test_shipped_accelerate_config_is_read_by_accelerate(path, capsys):
    """accelerate's own reader takes each file; precision stays with train.mixed_precision; every key is commented;
    `diffalign configs --path NAME` prints the file's path (the CLI's `main`, in this process)."""
    from accelerate.commands.config.config_args import load_config_from_file

    from diffalign.cli import main

    config = load_config_from_file(str(path))
    assert config.mixed_precision == "no"
    kind = {"single_gpu": ("NO", 1, 1), "multi_gpu": ("MULTI_GPU", 8, 1), "multi_node": ("MULTI_GPU", 16, 2), "fsdp2": ("FSDP", 8, 1),
            "deepspeed_zero2": ("DEEPSPEED", 8, 1), "deepspeed_zero3": ("DEEPSPEED", 8, 1)}[path.stem]
    assert (config.distributed_type, config.num_processes, config.num_machines) == kind
    if path.stem == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    text = path.read_text()
    assert text.startswith("# accelerate config:") and "# Run" in text
    assert main(["configs", "--path", _name(path)]) == 0
    assert capsys.readouterr().out.strip() == str(shipped_accelerate_configs()[_name(path)])


def _launch_environment(path, monkeypatch) -> None:
    """Set what `accelerate launch --config_file PATH` exports to its processes (accelerate's own parser and env builder)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    parsed = launch_command_parser().parse_args(["--config_file", str(path), "-m", "diffalign", "train", "toy/dpo"])
    args, defaults, _ = _validate_launch_command(parsed)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as `launch_command` does
    for key, value in prepare_deepspeed_cmd_env(args)[1].items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_builds_its_plugin_and_fills_auto_values_from_the_diffalign_config(stage, monkeypatch, tmp_path, capsys):
    from accelerate.utils import DeepSpeedPlugin

    from diffalign.trainers.deepspeed_zero import DeepSpeedConfigError, resolve

    _launch_environment(shipped_accelerate_configs()[f"accelerate/deepspeed_zero{stage}"], monkeypatch)
    plugin = DeepSpeedPlugin()  # as accelerate builds it in each process, from the launch's environment
    assert plugin.zero_stage == stage
    cfg = load_config("toy/dpo", ["train.batch_size=4", "train.grad_accum=3", "optim.max_grad_norm=0.5", "train.mixed_precision=bf16"])
    resolved = resolve(plugin, cfg, num_processes=8)
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"], resolved["train_batch_size"]) == (4, 3, 96)
    assert resolved["gradient_clipping"] == 0.5 and resolved["zero_optimization"]["stage"] == stage
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
    no_clip = resolve(DeepSpeedPlugin(), load_config("toy/dpo", ["optim.max_grad_norm=null"]), num_processes=2)
    assert no_clip["gradient_clipping"] == 0.0 and no_clip["bf16"]["enabled"] is False  # DeepSpeed's "off"; precision 'no'

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")  # a DeepSpeed value that disagrees is named
    with pytest.raises(DeepSpeedConfigError, match="gradient_accumulation_steps=4 vs arg gradient_accumulation_steps=3"):
        resolve(DeepSpeedPlugin(), cfg, num_processes=8)

    # before accelerate starts, the trainer names every setting DeepSpeed cannot train, each with what to do instead
    # (`diffalign train` through the CLI's `main`, in this process, under the launch's environment)
    from diffalign.cli import main

    out = f"train.output_dir={tmp_path / 'run'}"
    assert main(["train", "toy/dpo", "train.max_steps=1", "eval.validation_every=10", out]) != 0
    err = capsys.readouterr().err
    for named in ("model.finetune = lora", "accelerate/multi_gpu", "eval.validation_every", "train.nonfinite = skip"):
        assert named in err, err
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # accelerate would turn DeepSpeed off: refused, not trained unsharded
    assert main(["train", "toy/dpo", "model.finetune=full", "train.nonfinite=stop", "train.max_steps=1", out]) != 0
    err = capsys.readouterr().err
    assert "ACCELERATE_USE_CPU is set" in err and "model.finetune" not in err, err


def test_accelerate_configs_are_not_recipes(capsys):
    from diffalign.cli import main

    assert main(["train", "accelerate/multi_gpu", "--dry-run"]) != 0
    assert "accelerate launcher config, not a recipe" in capsys.readouterr().err


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_config_loads_by_name(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert load_config(f"{name}.yaml") == cfg


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_loads_by_path(path):
    cfg = load_config(path)
    assert cfg == load_config(str(path))
    # Airtight (rule 8): the file only holds keys the schema knows, so re-validating the raw mapping works.
    assert validate_config(yaml.safe_load(path.read_text())) == cfg


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_yaml_opens_with_what_how_and_override(path):
    """Rule 9: the opening comment says what it trains, the exact command, an override, the β convention."""
    assert path.read_text().startswith("#"), f"{path.name} must open with a comment block"
    header = config_header(path)
    assert f"diffalign train configs/{_name(path)}.yaml" in header
    assert re.search(rf"diffalign train {re.escape(_name(path))}\b", header)
    assert re.search(r"beta.*sigmoid\(-beta/2", header), "the beta convention must be stated in the header"
    # The override example must be a real, valid override of this very recipe.
    match = re.search(rf"Override:\s+diffalign train {re.escape(_name(path))} (.+)", header)
    assert match, f"{path.name}: no 'Override: diffalign train {_name(path)} key=value ...' line"
    overrides = shlex.split(match.group(1))
    assert overrides and all("=" in o for o in overrides)
    load_config(path, overrides)


_KEY_ONLY = re.compile(r"^\s*[\w.]+:\s*$")  # a section opener such as `model:`


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_value_carries_a_comment(path):
    """Every value has its source or reason: a trailing comment, or a comment on the line(s) above.

    List items may instead rely on the comment of the key that opens the list.
    """
    lines = path.read_text().splitlines()
    missing = []
    last_key_commented = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if _KEY_ONLY.match(line.split("#")[0]):
            last_key_commented = "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
            continue
        commented = "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
        if stripped.startswith("- ") and last_key_commented:
            commented = True
        if not commented:
            missing.append(f"{path.name}:{i + 1}: {stripped}")
    assert not missing, "values without a source/reason comment:\n" + "\n".join(missing)


# ---------------------------------------------------------------------------------- official numbers


@pytest.mark.parametrize("name", ["sd15_dpo", "sdxl_dpo"])
def test_official_full_finetune_numbers(name):
    """SalesforceAIResearch/DiffusionDPO launchers/{sd15,sdxl}.sh + train.py defaults."""
    cfg = load_config(name)
    assert cfg.method.name == "dpo"
    assert cfg.method.beta == 5000  # --beta_dpo 5000, -β/2 convention
    assert cfg.model.finetune == "full"
    # lr 1e-8 with --scale_lr: × batch × accum × GPUs = 1e-8 × 2048.
    assert cfg.optim.lr == pytest.approx(1e-8)
    assert cfg.optim.scale_lr is True
    assert cfg.train.batch_size == 1
    assert cfg.train.grad_accum == 128
    assert OFFICIAL_GPUS * cfg.train.batch_size * cfg.train.grad_accum == OFFICIAL_EFFECTIVE_BATCH
    scaled = cfg.optim.lr * cfg.train.batch_size * cfg.train.grad_accum * OFFICIAL_GPUS
    assert scaled == pytest.approx(2.048e-5)
    assert cfg.train.max_steps == 2000
    assert cfg.optim.schedule == "constant_with_warmup"
    assert cfg.optim.weight_decay == pytest.approx(1e-2)
    assert cfg.optim.max_grad_norm == 1.0
    assert cfg.train.mixed_precision == "fp16"
    assert cfg.data.source.kind == "pickapic"
    assert cfg.data.source.path  # a placeholder local path: the hub dataset is gone
    assert cfg.data.ties == "drop"
    assert cfg.data.crop == "center" and cfg.data.random_flip is True
    # diffalign defaults for pairing; the official per-image behaviour is one override away.
    assert cfg.data.pairing == "shared" and cfg.data.time_ids == "original"
    assert cfg.train.ema.enabled is False


def test_sd15_official_specifics():
    cfg = load_config("sd15_dpo")
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.data.resolution == 512
    assert cfg.optim.warmup_steps == 500
    assert cfg.train.checkpoint_every == 500
    assert cfg.data.caption_dropout == pytest.approx(0.2)  # --proportion_empty_prompts default (SD1.5)
    assert cfg.optim.optimizer == "adamw"
    assert cfg.model.gradient_checkpointing is False


def test_official_per_image_behaviour_is_one_override_away():
    cfg = load_config("sdxl_dpo", ["data.pairing=per_image", "data.time_ids=fixed"])
    assert cfg.data.pairing == "per_image" and cfg.data.time_ids == "fixed"


def test_grad_accum_adapts_to_gpu_count_keeping_2048():
    """The header's rule: grad_accum = 2048 / (GPUs × batch); with scale_lr the lr stays 2.048e-5."""
    for gpus in (1, 4, 8, 16):
        accum = OFFICIAL_EFFECTIVE_BATCH // (gpus * 1)
        cfg = load_config("sd15_dpo", [f"train.grad_accum={accum}"])
        assert gpus * cfg.train.batch_size * cfg.train.grad_accum == OFFICIAL_EFFECTIVE_BATCH
        assert cfg.optim.lr * OFFICIAL_EFFECTIVE_BATCH == pytest.approx(2.048e-5)


def test_diffusers_sdxl_lora_numbers():
    """huggingface/diffusers examples/research_projects/diffusion_dpo/README.md, SDXL command."""
    cfg = load_config("sdxl_dpo_lora")
    assert cfg.model.finetune == "lora"
    assert cfg.model.lora.rank == 8 and cfg.model.lora.alpha == 8
    assert cfg.optim.lr == pytest.approx(1e-5) and cfg.optim.scale_lr is False
    assert cfg.train.batch_size == 8 and cfg.train.grad_accum == 2
    assert cfg.train.max_steps == 2000
    assert cfg.optim.schedule == "constant" and cfg.optim.warmup_steps == 0
    assert cfg.method.beta == 5000  # -β/2 form (diffusers' SD1.5 script: 2500 without the ½)
    assert cfg.train.checkpoint_every == 500
    assert cfg.model.gradient_checkpointing is True
    assert cfg.train.mixed_precision == "fp16"
    assert cfg.model.vae == "madebyollin/sdxl-vae-fp16-fix" and cfg.model.vae_fp16_safe is True
    assert cfg.optim.optimizer in ("adamw", "adamw8bit")


def test_tiny_default_numbers():
    cfg = load_config("tiny_sdxl_dpo")
    assert cfg.model.pretrained == "builtin:tiny-sdxl"
    assert cfg.model.finetune == "lora" and cfg.model.lora.rank == 4
    assert cfg.data.source.kind == "demo"
    assert cfg.data.source.num_pairs == 64 and cfg.data.source.image_size == 64
    assert cfg.data.resolution == 32
    assert cfg.train.batch_size == 4 and cfg.train.max_steps == 30
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.train.checkpoint_every == 10
    assert cfg.train.output_dir == "outputs/tiny_sdxl_dpo"
    assert cfg.data.cache_dir == "outputs/cache/tiny_sdxl_dpo"
    assert cfg.log.tracker == "tensorboard"
    assert cfg.eval.validation_every == 10
    assert len(cfg.eval.prompts) == 2 and cfg.eval.num_inference_steps == 5
    assert cfg.train.mixed_precision == "no"  # CPU


# ------------------------------------------------------------------------------ documentation (rule 7)


def _models_in(annotation) -> typing.Iterator[type[BaseModel]]:
    """Pydantic models inside an annotation: plain, Optional, list[...], Union / discriminated Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _all_models() -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    todo = [Config]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        for field in model.model_fields.values():
            todo.extend(_models_in(field.annotation))
    return seen


def test_walk_reaches_nested_models_and_union_members():
    names = {m.__name__ for m in _all_models()}
    assert {"Config", "ModelConfig", "LoraConfig", "DataConfig", "OptimConfig", "TrainConfig", "EMAConfig"} <= names
    assert {"PickapicSource", "FolderSource", "DemoSource", "DPOMethod", "SFTMethod"} <= names


def test_every_field_has_a_description():
    undocumented = [
        f"{model.__name__}.{name}"
        for model in _all_models()
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert not undocumented, f"fields without a description: {undocumented}"


# ------------------------------------------------------------------------------------ error messages


@pytest.mark.parametrize(
    "text, dotted, suggestion",
    [
        ("modle:\n  pretrained: x\n", "modle", "model"),
        ("data:\n  shard_sizee: 3\n", "data.shard_sizee", "shard_size"),
        ("method:\n  name: dpo\n  betta: 2000\n", "method.betta", "beta"),
        ("data:\n  source:\n    kind: pickapic\n    path: p\n    pth: p\n", "data.source.pth", "path"),
        ("model:\n  lora:\n    rnak: 4\n", "model.lora.rnak", "rank"),
        ("train:\n  ema:\n    decy: 0.9\n", "train.ema.decy", "decay"),
    ],
)
def test_unknown_key_names_path_and_closest_key(tmp_path, text, dotted, suggestion):
    path = write(tmp_path, text)
    with raises(f"{dotted}: unknown key; did you mean '{suggestion}'"):
        load_config(path)


def test_unknown_key_error_names_the_file(tmp_path):
    path = write(tmp_path, "data:\n  shard_sizee: 3\n", name="mine.yaml")
    with raises(str(path)):
        load_config(path)


def test_unknown_key_through_override():
    with raises("optim.lrr: unknown key; did you mean 'lr'"):
        load_config("tiny_sdxl_dpo", ["optim.lrr=1e-4"])


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"train\.zzzz: unknown key; valid keys here: .*max_steps"):
        validate_config({"train": {"zzzz": 1}})


def test_wrong_type_names_field_and_value(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: abc\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps: .*'abc'"):
        load_config(path)


def test_wrong_type_through_override():
    with pytest.raises(ConfigError, match=r"optim\.lr: .*'fast'"):
        load_config("tiny_sdxl_dpo", ["optim.lr=fast"])


def test_out_of_range_value_names_field_and_value():
    with pytest.raises(ConfigError, match=r"data\.caption_dropout: .*1\.5"):
        validate_config({"data": {"caption_dropout": 1.5}})


def _method_tags() -> list[str]:
    return [m.model_fields["name"].default for m in _models_in(Config.model_fields["method"].annotation)]


def test_unknown_method_lists_allowed_names(tmp_path):
    path = write(tmp_path, "method:\n  name: dpoo\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "method" in message and "'dpoo'" in message
    tags = _method_tags()
    assert "dpo" in tags and "sft" in tags
    for tag in tags:
        assert f"'{tag}'" in message


def test_bad_enum_value_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"optim\.schedule: .*'cosine'.*'sgdr'"):
        validate_config({"optim": {"schedule": "sgdr"}})


def test_unknown_source_kind_lists_allowed_kinds():
    with pytest.raises(ConfigError, match=r"data\.source: unknown 'kind' 'hub'.*'pickapic'.*'folder'.*'demo'"):
        validate_config({"data": {"source": {"kind": "hub"}}})


def test_missing_source_path_is_named(tmp_path):
    path = write(tmp_path, "data:\n  source:\n    kind: pickapic\n")
    with raises("data.source.path: required key is missing"):
        load_config(path)


def test_missing_source_kind_is_named():
    kinds = "pickapic, folder, hpdv2, demo, synthetic, captions, toy_scenes, prompts"
    with pytest.raises(ConfigError, match=rf"data\.source\.kind: required key is missing \(one of: {kinds}\)"):
        validate_config({"data": {"source": {"path": "x"}}})


def test_cross_field_check_runs_at_load():
    with raises("model.reference_offload"):
        validate_config({"model": {"finetune": "lora", "reference_offload": True}})


def test_missing_file_is_named():
    with raises("no/such.yaml"):
        load_config("no/such.yaml")


def test_unknown_shipped_name_is_named():
    with raises("no_such_recipe"):
        load_config("no_such_recipe")


def test_invalid_yaml_is_a_clear_error(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: [1, 2\n  seed: 3\n", name="broken.yaml")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- model\n- data\n", name="list.yaml")
    with raises("top level must be a mapping"):
        load_config(path)


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing set\n")) == Config()


# ------------------------------------------------------------------------------ overrides, precedence


def test_precedence_default_yaml_override(tmp_path):
    path = write(
        tmp_path,
        "optim:\n  lr: 3.0e-5\n  warmup_steps: 7\ntrain:\n  max_steps: 11\nmethod:\n  name: dpo\n  beta: 2500\n",
    )
    cfg = load_config(path, ["optim.lr=2e-5", "method.beta=5000"])
    # Override beats YAML.
    assert cfg.optim.lr == pytest.approx(2e-5)
    assert cfg.method.beta == 5000
    # YAML beats default.
    assert cfg.optim.warmup_steps == 7
    assert cfg.train.max_steps == 11
    # Defaults fill what neither sets.
    assert cfg.train.batch_size == TrainConfig.model_fields["batch_size"].default
    assert cfg.optim.schedule == OptimConfig.model_fields["schedule"].default
    assert cfg.data.shard_size == DataConfig.model_fields["shard_size"].default
    # The YAML without overrides keeps its own values.
    plain = load_config(path)
    assert plain.optim.lr == pytest.approx(3e-5) and plain.method.beta == 2500


def test_nested_override(tmp_path):
    path = write(tmp_path, "model:\n  finetune: lora\n  lora:\n    rank: 4\n")
    cfg = load_config(path, ["model.lora.rank=16"])
    assert cfg.model.lora.rank == 16
    assert cfg.model.finetune == "lora"  # siblings of the overridden key survive


def test_override_creates_missing_sections(tmp_path):
    cfg = load_config(write(tmp_path, "{}\n"), ["model.lora.rank=16", "train.ema.enabled=true"])
    assert cfg.model.lora.rank == 16 and cfg.train.ema.enabled is True


def test_list_value_override(tmp_path):
    path = write(tmp_path, "eval:\n  prompts: [one]\n")
    cfg = load_config(path, ["eval.prompts=[a red cube, a blue ball]", "optim.betas=[0.8, 0.95]"])
    assert cfg.eval.prompts == ["a red cube", "a blue ball"]
    assert cfg.optim.betas == (0.8, 0.95)
    cfg = load_config(path, ["model.lora.target_modules=[to_q, to_v]"])
    assert cfg.model.lora.target_modules == ["to_q", "to_v"]


def test_override_null_and_union_member(tmp_path):
    cfg = load_config("sdxl_dpo", ["model.vae=null", "train.resume=null"])
    assert cfg.model.vae is None and cfg.train.resume is None
    # Switching the method keeps the other method's keys out: sft has no beta.
    with raises("method.beta: unknown key"):
        load_config("tiny_sdxl_dpo", ["method.name=sft"])


def test_override_into_a_value_is_a_clear_error(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-5\n")
    with raises("'optim.lr' is a value, not a section"):
        load_config(path, ["optim.lr.x=1"])
    # Where the YAML does not set the value, the schema still refuses a mapping in its place.
    with raises("optim.lr"):
        load_config(write(tmp_path, "{}\n", name="empty.yaml"), ["optim.lr.x=1"])


@pytest.mark.parametrize("bad", ["optim.lr", "optim..lr=1", "=3"])
def test_malformed_override_is_a_clear_error(bad):
    with raises(bad):
        load_config("tiny_sdxl_dpo", [bad])


def test_shipped_override_example_from_the_docs():
    cfg = load_config("sdxl_dpo", ["optim.lr=2e-5", "method.beta=5000"])
    assert cfg.optim.lr == pytest.approx(2e-5) and cfg.method.beta == 5000
    assert cfg.model.finetune == "full"  # the rest of the recipe is untouched


# ---------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", [None, *shipped_configs()])
def test_dump_config_round_trips(tmp_path, name):
    cfg = load_config(name) if name else Config()
    text = dump_config(cfg)
    # the β convention heads the saved config of a method with a β, and only then
    assert text.startswith("# Resolved diffalign config") and ("beta/2" in text.splitlines()[0]) == hasattr(cfg.method, "beta")
    again = load_config(write(tmp_path, text, name="resolved.yaml"))
    assert again == cfg
    assert dump_config(again) == text


def test_round_trip_keeps_overridden_values(tmp_path):
    cfg = load_config("sdxl_dpo", ["data.time_ids=fixed", "optim.max_grad_norm=null", "method.beta=2000"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert again.data.time_ids == "fixed" and again.optim.max_grad_norm is None
    assert math.isclose(again.method.beta, 2000)


def test_config_reference_page_is_generated_from_the_schema():
    """docs/config_reference.md is exactly what `diffalign configs --reference` prints, so it cannot drift."""
    from diffalign.config.reference import config_reference

    page = (Path(__file__).resolve().parents[1] / "docs" / "config_reference.md").read_text()
    assert page == config_reference(), "docs/config_reference.md is stale: run `diffalign configs --reference > docs/config_reference.md`"


def test_config_reference_lists_every_key_of_every_method_and_source():
    """Every field of every section, method and data source appears as a dotted key, with its bounds and default."""
    from diffalign.config import METHOD_CONFIGS, SOURCE_CONFIGS
    from diffalign.config.reference import config_reference, type_name

    page = config_reference()

    def keys(model: type[BaseModel], prefix: str, skip: str | None = None):
        for name, info in model.model_fields.items():
            if name == skip:
                continue
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                yield from keys(info.annotation, f"{prefix}.{name}")
            elif name not in ("method", "source"):
                yield f"{prefix}.{name}"

    expected = {k for section in ("model", "data", "optim", "train", "log", "eval") for k in keys(Config.model_fields[section].annotation, section)}
    expected |= {k for cls in METHOD_CONFIGS.values() for k in keys(cls, "method", skip="name")}
    expected |= {k for cls in SOURCE_CONFIGS for k in keys(cls, "data.source", skip="kind")}
    missing = [k for k in sorted(expected) if f"| `{k}` |" not in page]
    assert not missing, missing
    for name in METHOD_CONFIGS:
        assert f"### `method.name: {name}`" in page
    assert "| `model.lora.rank` | int (≥ 1) | 8 |" in page
    assert "| `method.noise_rate` | float (≥ 0, < 0.5) | 0.0 |" in page
    assert type_name(int | None) == "int | null"
