"""diffalign: align text-to-image diffusion models (SD1.5, SDXL) with human preferences."""

__version__ = "0.1.0"
