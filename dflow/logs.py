"""Quiet diffusers' and transformers' progress bars around loads and saves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence diffusers' and transformers' load/save progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # restored as they were: a caller may have silenced them for good
    enabled = (
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
    )
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled[0]:
            diffusers_logging.enable_progress_bar()
        if enabled[1]:
            transformers_logging.enable_progress_bar()
