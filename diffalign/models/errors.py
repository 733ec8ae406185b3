"""The error a model reference can cause, in a module of its own.

`loading` raises it for a missing path or an unusable pipeline, and the toy world's loader (`diffalign.toy.model`)
raises it for missing shipped weights. It lives apart from `loading` because `loading` imports the toy loader
for `builtin:toy`: the toy loader importing `loading` back would be a cycle.
"""


class ModelLoadError(RuntimeError):
    """The configured model could not be found or is not a supported SD1.5/SDXL pipeline."""
