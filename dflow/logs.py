"""dflow's log output: its own records beside distributed's, and dependencies'
noise quieted at its source.

:func:`configure` runs in every process dflow starts (``dflow-worker``, its
worker processes, a scheduler with dflow's preload): dflow's records then go
where distributed's do, at distributed's level, so "stage dit of tiny-flux
ready" shows next to "Start worker at". :func:`quiet_progress_bars` silences
diffusers' and transformers' progress bars around loads and saves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class _DropRecords(logging.Filter):
    """Drops the records ``matches`` picks; says why in its name."""

    def __init__(self, name: str, matches) -> None:
        super().__init__(name)
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.matches(record)


class _OneLine(logging.Filter):
    """Keeps the records ``matches`` picks, their traceback cut to the error's
    one line; says why in its name."""

    def __init__(self, name: str, matches) -> None:
        super().__init__(name)
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and self.matches(record):
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()} {type(error).__name__}: {error}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _heartbeat_to_stopped_scheduler(record: logging.LogRecord) -> bool:
    """A worker's heartbeat can fire between its scheduler stopping and the
    worker hearing the connection close: distributed logs the refused
    connection with a traceback, then the worker closes as it should."""
    error = record.exc_info[1] if record.exc_info else None
    return isinstance(error, OSError) and "during heartbeat" in str(record.msg)


def _closed_websocket_assertion(record: logging.LogRecord) -> bool:
    """Bokeh's ``WSHandler.open`` reads the subprotocol of a websocket whose
    browser already went away (an aborted page load): tornado asserts, and logs
    the assertion as an uncaught exception of the dashboard."""
    error = record.exc_info[1] if record.exc_info else None
    if not isinstance(error, AssertionError):
        return False
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and (
        traceback.tb_frame.f_code.co_name == "selected_subprotocol"
    )


def _closed_stop_queue(record: logging.LogRecord) -> bool:
    """distributed's worker process watches its Nanny's stop queue from a
    thread; a worker that closes on its own (its scheduler stopped) closes the
    queue under that thread, whose read then fails on the closed handle with a
    ``TypeError`` logged as "Worker process died unexpectedly". A dead Nanny
    (``EOFError``, ``OSError``) is still logged."""
    error = record.exc_info[1] if record.exc_info else None
    return (
        isinstance(error, TypeError)
        and "died unexpectedly" in str(record.msg)
        and _innermost_frame(error).f_code.co_filename.endswith(
            "multiprocessing/connection.py"
        )
    )


def _innermost_frame(error: BaseException):
    traceback = error.__traceback__
    assert traceback is not None
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback.tb_frame


def _torchvision_fallback(record: logging.LogRecord) -> bool:
    """transformers' notice that an image processor falls back to PIL without
    torchvision: diffusers' Flux and Wan modules import image processors for
    IP-adapter inputs, which dflow never uses."""
    return "requires torchvision (not installed); falling back" in str(record.msg)


#: (logger, filter) pairs :func:`configure` installs once per process
_FILTERS = (
    (
        "tornado.application",
        _DropRecords("aborted dashboard websocket", _closed_websocket_assertion),
    ),
    (
        "distributed.nanny",
        _DropRecords("stop queue closed at shutdown", _closed_stop_queue),
    ),
    (
        "distributed.worker",
        _OneLine("heartbeat to a stopped scheduler", _heartbeat_to_stopped_scheduler),
    ),
    (
        "transformers.utils.import_utils",
        _DropRecords("unused image processors", _torchvision_fallback),
    ),
)


def configure() -> None:
    """Route dflow's log records like distributed's and quiet known noise.

    dflow's ``logging.getLogger(__name__)`` loggers get distributed's handler
    and level, unless the Dask config's ``distributed.logging`` names ``dflow``
    (then distributed configured it already). ``distributed.batched`` goes to
    WARNING unless configured: its INFO record of a closed connection carries a
    traceback, which every worker printed when its scheduler stopped. Idempotent.
    """
    import dask.config

    configured = dask.config.get("distributed.logging", {}) or {}
    dflow_logger = logging.getLogger("dflow")
    source = logging.getLogger("distributed")
    if "dflow" not in configured and not dflow_logger.handlers and source.handlers:
        for handler in source.handlers:
            dflow_logger.addHandler(handler)
        dflow_logger.setLevel(source.getEffectiveLevel())
        dflow_logger.propagate = False
    if "distributed.batched" not in configured:
        batched = logging.getLogger("distributed.batched")
        batched.setLevel(max(batched.getEffectiveLevel(), logging.WARNING))
    quiet_dependencies()


def quiet_dependencies() -> None:
    """Drop the dependencies' records that say nothing to a dflow user (the
    filters of ``_FILTERS``). Idempotent."""
    for name, record_filter in _FILTERS:
        target = logging.getLogger(name)
        if record_filter not in target.filters:
            target.addFilter(record_filter)


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence diffusers' and transformers' load/save progress bars (and their
    known noise, :func:`quiet_dependencies`, for good)."""
    quiet_dependencies()
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
