"""dflow's exceptions: what a caller can catch."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request field is out of its allowed range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field

    def __reduce__(self):
        return type(self), (self.field, str(self).removeprefix(f"{self.field}: "))


class ModelNotServed(LookupError):
    """No worker serves (or is loading) the stages a request of this model needs."""


class StageLoadError(RuntimeError):
    """A stage worker could not load or warm up its stage; the message names the
    worker, the stage and the model, and says what to do."""


class Overloaded(RuntimeError):
    """A model has as many requests in flight as ``dflow.admission.max-outstanding``
    allows, and no room freed up within ``dflow.admission.timeout``."""


class StageOutOfMemory(MemoryError):
    """A stage call ran out of device memory; its memory was released."""


class Cancelled(RuntimeError):
    """A stage call stopped early because its request no longer needs it."""


class StageHung(RuntimeError):
    """A stage task hung every worker it ran on: each was fenced
    (``dflow.health``), until ``distributed.scheduler.allowed-failures`` was spent."""
