"""Chaos run: every request completes exactly once, or fails with a clear error,
while workers of every stage are SIGKILLed (and restarted by their Nanny), paused
(SIGSTOP, then SIGCONT) and switched to other stages, all at the same time.

One real ``dask scheduler`` (dflow's preload, the elastic controller off so that
only this script moves workers) serves two models on 127.0.0.1:

- tiny PixArt-Sigma on the real backend (CPU): encoder, 2 DiT, VAE workers;
- PixArt-Sigma-1024 on the emulated backend (``dflow.runtime.backend:
  emulated``: stage calls sleep the H200 profile's time, times
  ``--time-scale``): encoder, 2 DiT, VAE workers.

Requests arrive in batches over the run while a chaos thread, per round, kills
the worker process of each stage of each model (its ``dflow-worker`` Nanny
restarts it; the new process reloads its stage), pauses one worker of each
model for ``--pause`` seconds, and switches a DiT worker of each model to another stage
and back (the scheduler's ``dflow_move``: drain, requeue, reload).

The accounting (completed, failed, lost, duplicated) is defined in
``dflow.bench.chaos.ModelReport``.

``--pause`` below ``dflow.health.heartbeat-timeout`` (5 s) keeps the paused
worker in service (its tasks wait); a longer one has it fenced (its tasks move
to other workers) and unfenced once it resumes, or retired past
``dflow.health.grace``. With ``--pause-past-ttl`` the scheduler's
``distributed.scheduler.worker-ttl`` is set to ``--pause`` / 2, so the
scheduler also declares the paused worker dead and has its Nanny restart it.

    python benchmarks/chaos.py --rounds 3 --emulated-requests 1000 --tiny-requests 90
    python benchmarks/chaos.py --pause 20 --pause-past-ttl

Prints the table and the chaos timeline and writes them as JSON under ``--out``;
exits 1 if any request was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from dflow.bench.chaos import Settings, cluster, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-requests", type=int, default=Settings.tiny_requests)
    parser.add_argument(
        "--emulated-requests", type=int, default=Settings.emulated_requests
    )
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--interval", type=float, default=Settings.interval)
    parser.add_argument("--pause", type=float, default=Settings.pause)
    parser.add_argument("--pause-past-ttl", action="store_true")
    parser.add_argument("--time-scale", type=float, default=Settings.time_scale)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 10 + 40 requests"
    )
    parser.add_argument(
        "--logs", type=Path, default=None, help="keep process logs here"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    settings = Settings(
        tiny_requests=10 if args.quick else args.tiny_requests,
        emulated_requests=40 if args.quick else args.emulated_requests,
        rounds=args.rounds,
        interval=args.interval,
        pause=args.pause,
        pause_past_ttl=args.pause_past_ttl,
        time_scale=args.time_scale,
        drain_timeout=240.0 * args.rounds,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with cluster(settings, args.logs) as (client, processes):
        report = run(settings, client, processes)
    print(report.table())
    print()
    for action in report.actions:
        print(
            f"- {action['at']:7.2f}s {action['what']}{'' if action['ok'] else ' (skipped)'}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"chaos-{'past-ttl-' if args.pause_past_ttl else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"
    data = asdict(report)
    (args.out / name).write_text(json.dumps(data, indent=1))
    print(f"\nwrote {args.out / name}")
    bad = sum(r.lost + r.duplicated for r in report.models.values())
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
