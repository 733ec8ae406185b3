"""The typed configuration: one pydantic schema, loaded from YAML, with dotted command-line overrides.

Modules: `base` (error type, strict section base), `sections` (model, data and its sources, optim, train,
log, eval), `methods` (one class per method and the `METHOD_CONFIGS` table), `schema` (the root `Config`,
whose `method` union derives from the table), `loading` (YAML, overrides, readable errors, dumping).
Precedence is schema default < YAML < dotted override (``optim.lr=2e-5``); every field's ``description`` is
its documentation. The config imports neither the toy world, the scorers nor the trainers.
"""

from diffalign.config.base import BUILTIN_TINY_SD15, BUILTIN_TINY_SDXL, BUILTIN_TOY, ConfigError, Section
from diffalign.config.loading import (
    apply_overrides,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
    shipped_config_path,
    shipped_configs,
    validate_config,
)
from diffalign.config.methods import (
    BETA_CONVENTION,
    METHOD_CONFIGS,
    DenseMethod,
    DPOMethod,
    InPOMethod,
    NPOMethod,
    RankDPOMethod,
    SelfNPOMethod,
    SFTMethod,
    SmPOMethod,
    uses_beta,
)
from diffalign.config.schema import Config, MethodConfig
from diffalign.config.sections import (
    EVAL_ONLY_PROMPT_SETS,
    PROMPT_SETS,
    SOURCE_CONFIGS,
    CaptionsSource,
    DataConfig,
    DemoSource,
    EMAConfig,
    EvalConfig,
    FolderSource,
    Hpdv2Source,
    LogConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PickapicSource,
    PromptsSource,
    SourceConfig,
    SyntheticSource,
    ToyScenesSource,
    TrainConfig,
)

__all__ = [
    "BETA_CONVENTION", "BUILTIN_TINY_SD15", "BUILTIN_TINY_SDXL", "BUILTIN_TOY", "Config", "ConfigError", "DPOMethod", "DataConfig",
    "DenseMethod", "InPOMethod", "NPOMethod", "RankDPOMethod", "SelfNPOMethod", "SmPOMethod",
    "DemoSource", "EMAConfig", "EVAL_ONLY_PROMPT_SETS", "EvalConfig", "FolderSource", "Hpdv2Source", "LogConfig", "LoraConfig", "METHOD_CONFIGS",
    "MethodConfig", "ModelConfig", "OptimConfig", "PROMPT_SETS", "PickapicSource", "SFTMethod", "SOURCE_CONFIGS", "Section",
    "SourceConfig", "SyntheticSource", "ToyScenesSource", "CaptionsSource", "PromptsSource",
    "TrainConfig", "apply_overrides", "dump_config", "load_config", "parse_override", "read_yaml",
    "shipped_config_path", "shipped_configs", "uses_beta", "validate_config",
]
