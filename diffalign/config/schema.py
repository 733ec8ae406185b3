"""The root `Config`: the seven sections, with `method` a discriminated union built from `METHOD_CONFIGS`."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, model_validator

from diffalign.config.base import Section
from diffalign.config.methods import METHOD_CONFIGS, DPOMethod
from diffalign.config.sections import DataConfig, EvalConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig

MethodConfig = Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="name")]


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model and how it is fine-tuned.")
    data: DataConfig = Field(default_factory=DataConfig, description="Preference source and latent-pair cache.")
    method: MethodConfig = Field(default_factory=DPOMethod, description=f"Training objective (`name`: {', '.join(METHOD_CONFIGS)}).")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and learning-rate schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Loop, precision, checkpointing.")
    log: LogConfig = Field(default_factory=LogConfig, description="Metrics and progress.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Validation grids during training.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.model.reference_offload and self.model.finetune != "full":
            raise ValueError("model.reference_offload applies only to model.finetune = full (LoRA's reference is the same UNet)")
        if self.train.export_kohya and self.model.finetune != "lora":
            raise ValueError("train.export_kohya writes a LoRA in kohya's layout; it needs model.finetune = lora")
        return self
