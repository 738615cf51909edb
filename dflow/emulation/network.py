"""Network jitter for the emulated fleet: a delay drawn per worker-to-worker
transfer (config ``dflow.emulation.transfer-delay``), paid where a slow link
pays it, by the receiving worker's fetch of a task's input.

A worker serves a peer's fetch in its ``get_data`` handler. Wrapped here, the
reply waits the drawn delay (``asyncio.sleep``: neither worker's event loop
blocks, and concurrent fetches each wait their own) before the data leaves;
the fetching worker's ``gather_dep`` awaits that reply, so its transfer of the
input takes the delay longer while its task threads go on computing. Gathers
that name no worker (a client's, the scheduler's) are not delayed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

import dask.config
from dask.utils import parse_timedelta

import dflow.config  # noqa: F401
from dflow.emulation.cost import time_scale

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

#: The delay distributions ``dflow.emulation.transfer-delay.distribution`` names
DISTRIBUTIONS = ("none", "fixed", "uniform", "lognormal")
#: The 99th percentile of a standard normal
Z99 = 2.3263478740408408
KEY = "dflow.emulation.transfer-delay"

#: Workers whose transfers are delayed already
_delayed: weakref.WeakSet[Any] = weakref.WeakSet()


@dataclass(frozen=True)
class TransferDelay:
    """How long each transfer waits, in emulated seconds.

    ``fixed``: ``fixed`` every time; ``uniform``: from ``low`` to ``high``;
    ``lognormal``: a heavy tail of the given ``median`` and ``p99``; ``none``:
    no delay. Draws are seeded by ``seed`` and the serving worker's name.
    """

    distribution: str = "none"
    fixed: float = 0.0
    low: float = 0.0
    high: float = 0.0
    median: float = 0.0
    p99: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"{KEY}.distribution must be one of {', '.join(DISTRIBUTIONS)}, "
                f"got {self.distribution!r}"
            )
        for name in ("fixed", "low", "high", "median", "p99"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{KEY}.{name} must be >= 0 seconds, got {value}")
        if self.distribution == "uniform" and self.high < self.low:
            raise ValueError(
                f"{KEY}.high must be >= low ({self.low} s), got {self.high}"
            )
        if self.distribution == "lognormal" and not 0 < self.median <= self.p99:
            raise ValueError(
                f"{KEY}: lognormal needs 0 < median <= p99, got median "
                f"{self.median} s and p99 {self.p99} s"
            )

    @classmethod
    def from_config(cls) -> TransferDelay:
        """The delay ``dflow.emulation.transfer-delay`` configures."""
        config = dask.config.get(KEY)

        def seconds(name: str) -> float:
            value = config.get(name, 0)
            try:
                return float(parse_timedelta(value, default="seconds"))
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"{KEY}.{name} must be a duration like '20ms', got {value!r}"
                ) from None

        return cls(
            distribution=str(config.get("distribution", "none")),
            fixed=seconds("fixed"),
            low=seconds("low"),
            high=seconds("high"),
            median=seconds("median"),
            p99=seconds("p99"),
            seed=int(config.get("seed", 0)),
        )

    @property
    def enabled(self) -> bool:
        return self.distribution != "none"

    def sampler(self, stream: str) -> Callable[[], float]:
        """A function drawing delays (emulated seconds) from a generator seeded
        by ``seed`` and ``stream`` (the serving worker's name)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(stream.encode())])
        if self.distribution == "uniform":
            return lambda: float(rng.uniform(self.low, self.high))
        if self.distribution == "lognormal":
            mu = math.log(self.median)
            sigma = math.log(self.p99 / self.median) / Z99
            return lambda: float(rng.lognormal(mu, sigma))
        value = self.fixed if self.distribution == "fixed" else 0.0
        return lambda: value


def delay_transfers(worker: Worker, delay: TransferDelay | None = None) -> bool:
    """Make every transfer ``worker`` serves to a peer worker wait a draw of
    ``delay`` (default: the configured one) times the time scale. Returns
    whether it did (``False``: no delay configured, or already delayed)."""
    delay = delay or TransferDelay.from_config()
    if not delay.enabled or worker in _delayed:
        return False
    draw = delay.sampler(str(worker.name))
    scale = time_scale()
    serve = worker.handlers["get_data"]

    async def get_data(
        comm: Any,
        keys: Any,
        who: str | None = None,
        serializers: list[str] | None = None,
    ) -> Any:
        if who is not None:
            await asyncio.sleep(draw() * scale)
        return await serve(comm, keys=keys, who=who, serializers=serializers)

    worker.handlers["get_data"] = get_data
    _delayed.add(worker)
    logger.info("Transfers from %s wait %s", worker.name, delay)
    return True
