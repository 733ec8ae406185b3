"""`quiet_loading()`: the libraries' model-loading chatter off while our code loads or casts models.

Two kinds of noise are silenced, nothing else:

- transformers' and diffusers' own progress bars (transformers 5 draws a "Loading weights" bar for every
  text encoder it loads). huggingface_hub's download bars stay on: the flag is flipped on the two libraries
  directly, because transformers' public `disable_progress_bar` also switches the hub's bars off globally
  and its `enable_progress_bar` clears the hub's per-group settings.
- diffusers' "There are modules in X that should be kept in float32: []. Casting directly with `to()` ..."
  warning, which recent diffusers logs on every dtype cast of any model, also when the list of modules to
  keep in float32 is empty (it tests the list against None). The same warning with a non-empty list is real
  and still shows, as does every other warning and error.

The previous state comes back when the block ends.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from importlib import import_module

CAST_LOGGER = "diffusers.models.modeling_utils"
EMPTY_FP32_LIST = "should be kept in float32: []."


class _DropEmptyFp32Warning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return EMPTY_FP32_LIST not in record.getMessage()


def _bar_modules() -> list:
    """The logging modules of transformers and diffusers that hold a module-level `_tqdm_active` flag."""
    modules = []
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        with contextlib.suppress(ImportError):
            module = import_module(name)
            if hasattr(module, "_tqdm_active"):
                modules.append(module)
    return modules


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Progress bars of transformers and diffusers off, and the empty float32-cast warning dropped, inside the block."""
    modules = _bar_modules()
    was = [m._tqdm_active for m in modules]
    cast_logger, noise = logging.getLogger(CAST_LOGGER), _DropEmptyFp32Warning()
    for m in modules:
        m._tqdm_active = False
    cast_logger.addFilter(noise)
    try:
        yield
    finally:
        cast_logger.removeFilter(noise)
        for m, active in zip(modules, was):
            m._tqdm_active = active
