"""Loading a config: YAML (a path or a shipped recipe name), dotted overrides, validation with readable errors, dumping.

Precedence is schema default < YAML < dotted override (``optim.lr=2e-5``). Unknown keys are refused with their
dotted path and the closest valid key; wrong types name the field and the offending value.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from diffalign.config.base import ConfigError
from diffalign.config.methods import BETA_CONVENTION, METHOD_CONFIGS, uses_beta
from diffalign.config.schema import Config
from diffalign.config.sections import SOURCE_CONFIGS


def _union_tags() -> dict[tuple[str, ...], dict[str, type[BaseModel]]]:
    """Members of each discriminated union by tag; pydantic puts the tag into error locations."""
    return {
        ("method",): dict(METHOD_CONFIGS),
        ("data", "source"): {m.model_fields["kind"].default: m for m in SOURCE_CONFIGS},
    }


def _model_at(model: type[BaseModel] | None, loc: tuple) -> tuple[type[BaseModel] | None, list[str]]:
    """Walk a validation-error location through the schema; return the model at the end and the dotted keys."""
    keys: list[str] = []
    tags = _union_tags()
    for part in loc:
        if model is not None and isinstance(part, str) and part in model.model_fields:
            keys.append(part)
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        elif part in tags.get(tuple(keys), {}):
            model = tags[tuple(keys)][part]
        else:
            keys.append(str(part))
            model = None
    return model, keys


def _format_error(err: dict) -> str:
    loc = tuple(err["loc"])
    etype = err["type"]
    if etype == "extra_forbidden":
        parent, keys = _model_at(Config, loc[:-1])
        dotted = ".".join(keys + [str(loc[-1])])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1, cutoff=0.5)
            choices = ", ".join(parent.model_fields)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {choices}"
        return f"{dotted}: unknown key{hint}"
    _, keys = _model_at(Config, loc)
    dotted = ".".join(keys) or "<root>"
    if etype == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"{dotted}: unknown {ctx.get('discriminator', 'tag')} {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if etype == "union_tag_not_found":
        tag = err.get("ctx", {}).get("discriminator", "").strip("'")
        options = ", ".join(_union_tags().get(tuple(keys), {}))
        return f"{dotted}.{tag}: required key is missing (one of: {options})"
    if etype == "missing":
        return f"{dotted}: required key is missing"
    if not keys:  # a cross-field check on the whole config: the input is the whole config, not worth printing
        return err["msg"]
    return f"{dotted}: {err['msg']} (got {err.get('input')!r})"


def validate_config(data: dict[str, Any], origin: str = "<config>") -> Config:
    """Build a `Config` from a plain dict, turning pydantic errors into one readable `ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = [_format_error(err) for err in e.errors()]
        raise ConfigError(f"invalid configuration in {origin}:\n  " + "\n  ".join(lines)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=2e-5'`` -> (['optim', 'lr'], 2e-05). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        shipped = shipped_config_path(str(path))
        if shipped is None:
            launcher = shipped_accelerate_configs().get(str(path).removesuffix(".yaml"))
            if launcher is not None:
                raise ConfigError(f"{path} is an accelerate launcher config, not a recipe: accelerate launch --config_file {launcher} "
                                  "-m diffalign train RECIPE")
            raise ConfigError(f"config file not found: {path}")
        path = shipped
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return data or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a path, or the name of a shipped recipe such as 'sdxl_dpo') and apply dotted overrides."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return validate_config(data, origin=str(path) if path else "<defaults>")


ACCELERATE_DIR = "accelerate"  # accelerate launcher configs shipped beside the recipes (not diffalign configs)


def _shipped(accelerate: bool = False) -> dict[str, Path]:
    """Shipped YAML files by name: the recipes, or (``accelerate``) the accelerate launcher configs under accelerate/."""
    root = Path(str(resources.files("diffalign.configs")))
    files = {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.yaml"))}
    return {n: p for n, p in files.items() if n.startswith(f"{ACCELERATE_DIR}/") == accelerate}


def shipped_configs() -> list[str]:
    """Names of the recipes shipped as package data (`diffalign.configs`), e.g. 'sdxl_dpo', 'toy/dpo'."""
    return sorted(_shipped())


def shipped_accelerate_configs() -> dict[str, Path]:
    """The shipped `accelerate launch --config_file` files by name, e.g. 'accelerate/multi_gpu' -> its path."""
    return _shipped(accelerate=True)


def shipped_config_path(name: str) -> Path | None:
    """The file of a shipped recipe name ('sdxl_dpo', 'toy/dpo'), or None."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    return _shipped().get(stem)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; headed by the β convention when the method uses it."""
    header = "# Resolved diffalign config." + (f" {BETA_CONVENTION}" if uses_beta(cfg.method) else "") + "\n"
    return header + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def value_sources(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, str]:
    """Where each resolved value of `load_config(path, overrides)` came from: 'override', 'yaml' or 'default'.

    Keys are dotted leaf paths of the resolved config (lists are leaves). An override or YAML entry that sets a whole
    section marks every value under it.
    """
    cfg = load_config(path, overrides)
    from_yaml = _leaf_keys(read_yaml(path)) if path is not None else set()
    from_override = {".".join(parse_override(text)[0]) for text in overrides or []}

    def source(key: str) -> str:
        def under(keys: set[str]) -> bool:
            return any(key == k or key.startswith(k + ".") for k in keys)

        return "override" if under(from_override) else "yaml" if under(from_yaml) else "default"

    return {key: source(key) for key in _leaf_keys(cfg.model_dump(mode="json"))}


def _leaf_keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in node.items():
        if isinstance(v, dict) and v:
            keys |= _leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


def show_config(path: str | Path | None = None, overrides: list[str] | None = None) -> str:
    """The resolved config, one `key: value  # source` line per value, in schema order."""
    cfg = load_config(path, overrides)
    sources = value_sources(path, overrides)
    lines: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                walk(v, key + ".")
            else:
                lines.append((key, json_value(v), sources[key]))

    walk(cfg.model_dump(mode="json"), "")
    width = min(max(len(k) + len(v) for k, v, _ in lines) + 3, 72)
    where = shipped_config_path(str(path)) or path if path is not None else "none"
    head = f"# resolved config · yaml: {where} · overrides: {' '.join(overrides or []) or 'none'}\n"
    return head + "\n".join(f"{k}: {v}".ljust(width) + f"  # {s}" for k, v, s in lines) + "\n"


def json_value(value: Any) -> str:
    """A value as it would be written in an override (YAML flow style, one line)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
