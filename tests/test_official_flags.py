"""docs/official_flags.md: every diffalign key the page names exists in the schema.

The page's convention: each `## ` section about an official script has a line "Method: `<name>`" naming the
diffalign method whose `method.*` keys it uses. A table whose second column header is "diffalign key(s)" holds, in
that column, zero or more dotted keys in backticks separated by commas, or "—" for none. Each key must resolve:
`method.X` to a field of that section's method config (`METHOD_CONFIGS[name]`), `data.source.X` to a field of some
source config (`SOURCE_CONFIGS`), anything else by walking `Config` section by section through nested models.
`key=value` overrides written anywhere on the page in backticks are checked the same way.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from diffalign.config import METHOD_CONFIGS, SOURCE_CONFIGS, Config

PAGE = Path(__file__).resolve().parents[1] / "docs" / "official_flags.md"
KEY_HEADER = "diffalign key(s)"
NONE = "—"
# Section title fragment -> the diffalign method the section maps to.
SECTIONS = {"Diffusion-DPO": "dpo", "DDIM-InPO": "inpo", "SmPO-Diffusion": "smpo", "Diffusion-NPO": "npo"}
KEY = re.compile(r"^`([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)`$")
OVERRIDE = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)=")
METHOD_LINE = re.compile(r"^Method: `([a-z_0-9]+)`\s*$", re.M)


def _sources() -> list[type[BaseModel]]:
    return list(SOURCE_CONFIGS.values()) if isinstance(SOURCE_CONFIGS, dict) else list(SOURCE_CONFIGS)


def _models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (X, X | None, unions, containers)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def schema_error(key: str, method: type[BaseModel] | None) -> str | None:
    """None when `key` names a field of the schema, else why not. `method`: the section's method config class
    (None: a `method.*` key may belong to any method)."""
    parts = key.split(".")
    if parts[0] == "method":
        owners = [method] if method is not None else list(METHOD_CONFIGS.values())
        if len(parts) != 2 or not any(parts[1] in m.model_fields for m in owners):
            names = ", ".join(m.__name__ for m in owners) if method is not None else "any method config"
            return f"{key}: not a field of {names}"
        return None
    if parts[:2] == ["data", "source"]:
        if len(parts) != 3 or not any(parts[2] in s.model_fields for s in _sources()):
            return f"{key}: not a field of any source config"
        return None
    models: list[type[BaseModel]] = [Config]
    for depth, part in enumerate(parts):
        owners = [m for m in models if part in m.model_fields]
        if not owners:
            where = ".".join(parts[:depth]) or "the root config"
            return f"{key}: no field {part!r} under {where}"
        models = [n for m in owners for n in _models_in(m.model_fields[part].annotation)]
    return None


def _sections(text: str) -> list[tuple[str, str]]:
    """(title, body) of every `## ` section, in order."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("## "):
            out.append((line[3:].strip(), []))
        elif out:
            out[-1][1].append(line)
    return [(title, "\n".join(body)) for title, body in out]


def _cells(line: str) -> list[str]:
    line = line.strip()
    assert line.startswith("|") and line.endswith("|"), f"not a table row: {line!r}"
    return [c.strip() for c in line[1:-1].split("|")]


def _tables(body: str) -> list[list[str]]:
    """Each markdown table of a section body as its lines (header, separator, rows)."""
    tables, current = [], []
    for line in body.splitlines():
        if line.strip().startswith("|"):
            current.append(line.strip())
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _key_rows(body: str) -> list[tuple[str, list[str]]]:
    """(row, its cells) of every row of the section's flag tables (second header cell == KEY_HEADER)."""
    rows = []
    for table in _tables(body):
        header = _cells(table[0])
        if len(header) < 2 or header[1] != KEY_HEADER:
            continue
        assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1]), f"no separator under {table[0]!r}"
        for line in table[2:]:
            cells = _cells(line)
            assert len(cells) == len(header), f"{len(cells)} cells, header has {len(header)} (a stray '|'?): {line}"
            rows.append((line, cells))
    return rows


def _keys_in_cell(cell: str) -> list[str]:
    if cell == NONE:
        return []
    keys = []
    for part in cell.split(","):
        m = KEY.match(part.strip())
        assert m, f"diffalign column must be {NONE!r} or `dotted.keys` separated by commas, got {cell!r}"
        keys.append(m.group(1))
    return keys


def _section_method(title: str, body: str) -> type[BaseModel]:
    m = METHOD_LINE.search(body)
    assert m, f"section {title!r} has no 'Method: `<name>`' line"
    assert m.group(1) in METHOD_CONFIGS, f"section {title!r} names unknown method {m.group(1)!r}"
    return METHOD_CONFIGS[m.group(1)]


@pytest.fixture(scope="module")
def sections() -> list[tuple[str, str]]:
    return _sections(PAGE.read_text(encoding="utf-8"))


def _script_sections(sections):
    """(fragment, method name, title, body) for each of the four script sections."""
    out = []
    for fragment, name in SECTIONS.items():
        found = [(t, b) for t, b in sections if fragment in t]
        assert len(found) == 1, f"expected one '## ' section mentioning {fragment!r}, found {[t for t, _ in found]}"
        out.append((fragment, name, *found[0]))
    return out


def test_the_four_sections_exist_with_their_methods(sections):
    for fragment, name, title, body in _script_sections(sections):
        assert _section_method(title, body) is METHOD_CONFIGS[name], f"section {title!r} should map to method {name!r}"
        rows = _key_rows(body)
        assert rows, f"section {title!r} has no table with a {KEY_HEADER!r} column"
        assert any(_keys_in_cell(cells[1]) for _, cells in rows), f"section {title!r} maps no flag to a key"


def test_every_key_in_the_tables_is_in_the_schema(sections):
    errors, checked = [], 0
    for title, body in sections:
        rows = _key_rows(body)
        if not rows:
            continue
        method = _section_method(title, body)
        for line, cells in rows:
            for key in _keys_in_cell(cells[1]):
                checked += 1
                if (err := schema_error(key, method)) is not None:
                    errors.append(f"[{title}] {err}\n    in: {line}")
    assert checked > 100, f"only {checked} keys found: did the table convention change?"
    assert not errors, "keys not in the schema:\n" + "\n".join(errors)


def test_every_override_on_the_page_is_in_the_schema(sections):
    errors, checked = [], 0
    for title, body in sections:
        m = METHOD_LINE.search(body)
        method = METHOD_CONFIGS.get(m.group(1)) if m else None
        for span in re.findall(r"`([^`\n]+)`", body):
            for token in span.split():
                o = OVERRIDE.match(token)
                if o is None or o.group(1).split(".")[0] not in Config.model_fields:
                    continue
                checked += 1
                if (err := schema_error(o.group(1), method)) is not None:
                    errors.append(f"[{title}] override {token!r}: {err}")
    assert checked > 10, f"only {checked} overrides found"
    assert not errors, "overrides not in the schema:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    ("key", "method"),
    [
        ("data.pairng", "dpo"),
        ("data.source.pth", "dpo"),
        ("model.lora.rnk", "dpo"),
        ("model.lora.rank.x", "dpo"),
        ("train.ema.enabld", "dpo"),
        ("optim.lr.scale", "dpo"),
        ("modle.pretrained", "dpo"),
        ("method.bta", "dpo"),
        ("method.gamma", "dpo"),  # a field of smpo, not of dpo
        ("method.inversion_eta", "smpo"),  # InPO's η: SmPO has none
        ("method.beta.x", "npo"),
    ],
)
def test_misspelled_or_misplaced_keys_are_refused(key, method):
    assert schema_error(key, METHOD_CONFIGS[method]) is not None


@pytest.mark.parametrize(
    ("key", "method"),
    [
        ("model.lora.rank", "dpo"),
        ("train.ema.decay", "dpo"),
        ("data.source.path", "dpo"),
        ("data.source.jsonl", "dpo"),
        ("data.time_ids", "smpo"),
        ("method.inversion_eta", "inpo"),
        ("method.score_bounds", "smpo"),
        ("method.flip", "npo"),
        ("method.name", "dpo"),
    ],
)
def test_real_keys_resolve(key, method):
    assert schema_error(key, METHOD_CONFIGS[method]) is None
