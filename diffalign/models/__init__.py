"""Model loading (local directory, hub id or builtin tiny), LoRA attach/save, tiny builders."""

from diffalign.models.loading import Components, ModelLoadError, detect_family, encode_images, encode_prompts, load_components

__all__ = ["Components", "ModelLoadError", "detect_family", "encode_images", "encode_prompts", "load_components"]
