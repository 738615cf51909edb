"""Hand-off of stage tensors between two Dask worker processes, against a raw socket.

Worker A makes a tensor of a real stage-output shape (Flux T5 embeddings, Flux
packed latents, Wan 2.1 latents; float32 and bfloat16) and worker B consumes it,
so the tensor travels A -> B through Dask's comm (dflow's serializers). Per
repeat it records:

- the wall time submit -> result of B's task (scheduler round trips included),
- the same task run on A, where the tensor already is (the no-transfer floor),
- B's own transfer time (``transfer_incoming_log``) and the task's ``transfer``
  startstop from the scheduler's task stream.

A raw loopback socket copy of the same bytes between two processes (``sendall``
into ``recv_into`` of a preallocated buffer, one-byte ack) is the floor for the
bytes alone; it runs right before each Dask hand-off, so both see the same load. ``--protocol ucx`` needs ``distributed-ucxx`` (its own venv: it pins
dask to another release; see benchmarks/README.md).

    python benchmarks/transport.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dask
import dask.config
import distributed
from distributed import Client, LocalCluster, get_task_stream, wait

#: (label, shape) of real stage outputs (1024^2 Flux, Wan 2.1 480x832x81 frames)
SHAPES = [
    ("Flux T5 embeddings", (1, 512, 4096)),
    ("Flux packed latents", (1, 4096, 64)),
    ("Wan 2.1 latents", (1, 16, 21, 60, 104)),
]
DTYPES = ("float32", "bfloat16")
UCX_ENV = {"UCX_TLS": "tcp,self", "UCX_WARN_UNUSED_ENV_VARS": "n"}


# -- functions the workers run ------------------------------------------------------


def setup_worker() -> str:
    """Install dflow's tensor serializers (torch is imported here, not on the
    first transfer)."""
    from dflow.protocol import register_serializers

    register_serializers()
    return str(dask.config.get("distributed.comm.compression"))


def make(shape: tuple[int, ...], dtype: str, data: str, seed: int) -> torch.Tensor:
    if data == "zeros":
        return torch.zeros(shape, dtype=getattr(torch, dtype))
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=getattr(torch, dtype))


def consume(tensor: torch.Tensor) -> int:
    return tensor.element_size() * tensor.nelement()


def transfer_log(dask_worker: distributed.Worker) -> list[dict[str, Any]]:
    return [
        {
            "keys": [str(k) for k in entry["keys"]],
            "duration": entry["duration"],
            "total": entry["total"],
        }
        for entry in dask_worker.transfer_incoming_log
    ]


# -- raw socket baseline ------------------------------------------------------------


def _receive(port: Any, nbytes: int, count: int) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port.put(server.getsockname()[1])
        connection, _ = server.accept()
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = memoryview(bytearray(nbytes))
            for _ in range(count):
                received = 0
                while received < nbytes:
                    n = connection.recv_into(buffer[received:], nbytes - received)
                    if not n:
                        raise ConnectionError("sender closed early")
                    received += n
                connection.sendall(b"k")


class SocketPeer:
    """A receiver process on loopback: :meth:`copy` times one ``sendall`` of the
    payload until the receiver's one-byte ack comes back."""

    def __init__(self, payload: memoryview, count: int):
        self.payload = payload
        context = multiprocessing.get_context("spawn")
        port = context.Queue()
        self.receiver = context.Process(
            target=_receive, args=(port, payload.nbytes, count)
        )
        self.receiver.start()
        self.connection = socket.create_connection(("127.0.0.1", port.get(timeout=60)))
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def copy(self) -> float:
        start = time.perf_counter()
        self.connection.sendall(self.payload)
        if self.connection.recv(1) != b"k":
            raise ConnectionError("receiver closed early")
        return time.perf_counter() - start

    def close(self) -> None:
        self.connection.close()
        self.receiver.join(timeout=30)
        if self.receiver.is_alive():
            self.receiver.terminate()


# -- Dask hand-off ------------------------------------------------------------------


def dask_handoff(
    client: Client,
    a: str,
    b: str,
    label: str,
    shape: tuple[int, ...],
    dtype: str,
    data: str,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """Time the hand-off A -> B ``repeats`` times, each right after a raw socket
    copy of the same bytes, so that both see the same load on the machine."""
    tag = f"{label.replace(' ', '_')}-{dtype}"
    payload = make(shape, dtype, data, 0)
    raw = payload.view(torch.uint8) if dtype == "bfloat16" else payload
    peer = SocketPeer(memoryview(raw.numpy()).cast("B"), warmup + repeats)
    remote, local, keys, copies = [], [], [], []
    with get_task_stream(client) as stream:
        for i in range(warmup + repeats):
            copy = peer.copy()
            x = client.submit(
                make, shape, dtype, data, i, workers=[a], key=f"make-{tag}-{i}"
            )
            wait(x)
            start = time.perf_counter()
            nbytes = client.submit(
                consume, x, workers=[b], key=f"on-b-{tag}-{i}"
            ).result()
            middle = time.perf_counter()
            client.submit(consume, x, workers=[a], key=f"on-a-{tag}-{i}").result()
            stop = time.perf_counter()
            del x
            if i >= warmup:
                copies.append(copy)
                remote.append(middle - start)
                local.append(stop - middle)
                keys.append(f"make-{tag}-{i}")
    peer.close()
    log = client.run(transfer_log, workers=[b])[b]
    by_key = {entry["keys"][0]: entry for entry in log if len(entry["keys"]) == 1}
    worker_transfer = [by_key[k]["duration"] for k in keys if k in by_key]
    logged_bytes = {by_key[k]["total"] for k in keys if k in by_key}
    startstop_transfer = [
        sum(
            s["stop"] - s["start"]
            for s in rec["startstops"]
            if s["action"] == "transfer"
        )
        for rec in stream.data
        if str(rec["key"]).startswith(f"on-b-{tag}-")
        and int(str(rec["key"]).rsplit("-", 1)[1]) >= warmup
    ]
    return {
        "nbytes": nbytes,
        "logged_nbytes": sorted(logged_bytes),
        "wall_remote_s": remote,
        "wall_local_s": local,
        "worker_transfer_s": worker_transfer,
        "startstop_transfer_s": startstop_transfer,
        "socket_s": copies,
    }


# -- reporting ----------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p90(values: list[float]) -> float:
    return float(np.percentile(values, 90)) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}" if seconds > 0 else "-"


def table(protocol: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"| tensor (CPU, loopback, {protocol}) | dtype | MB "
        "| wall A→B median / p90 ms | wall on A, no transfer, median ms "
        "| worker transfer median / p90 / min ms | transfer GB/s median (best) "
        "| raw socket median / p90 / min ms | socket GB/s median (best) "
        "| transfer / socket, medians |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        transfer, sock, n = r["worker_transfer_s"], r["socket_s"], r["nbytes"]
        lines.append(
            f"| {r['label']} {tuple(r['shape'])} | {r['dtype']} | {n / 1e6:.2f} "
            f"| {ms(median(r['wall_remote_s']))} / {ms(p90(r['wall_remote_s']))} "
            f"| {ms(median(r['wall_local_s']))} "
            f"| {ms(median(transfer))} / {ms(p90(transfer))} / {ms(min(transfer))} "
            f"| {gbps(n, median(transfer))} ({gbps(n, min(transfer))}) "
            f"| {ms(median(sock))} / {ms(p90(sock))} / {ms(min(sock))} "
            f"| {gbps(n, median(sock))} ({gbps(n, min(sock))}) "
            f"| {median(transfer) / median(sock):.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats, float32 only")
    parser.add_argument(
        "--repeats", type=int, default=None, help="default 30 (5 quick)"
    )
    parser.add_argument("--protocol", default="tcp", choices=("tcp", "ucx", "ucxx"))
    parser.add_argument(
        "--compression",
        default=None,
        help="distributed.comm.compression for the run (default: leave the config's)",
    )
    parser.add_argument("--data", default="random", choices=("random", "zeros"))
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 30)
    warmup = 2
    from dflow.bench.env import machine

    host = machine()
    dtypes = ("float32",) if args.quick else DTYPES
    if args.protocol != "tcp":
        for name, value in UCX_ENV.items():
            os.environ.setdefault(name, value)
    if args.compression is not None:
        setting = args.compression.lower()
        value = {"none": None, "false": False}.get(setting, setting)
        dask.config.set({"distributed.comm.compression": value})

    rows: list[dict[str, Any]] = [
        {"label": label, "shape": list(shape), "dtype": dtype}
        for label, shape in SHAPES
        for dtype in dtypes
    ]
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            protocol=args.protocol,
            host="127.0.0.1",
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        a, b = sorted(client.scheduler_info()["workers"])
        compression = client.run(setup_worker)
        for row in rows:
            row.update(
                dask_handoff(
                    client,
                    a,
                    b,
                    row["label"],
                    tuple(row["shape"]),
                    row["dtype"],
                    args.data,
                    repeats,
                    warmup,
                )
            )

    result = {
        "benchmark": "transport",
        "command": " ".join([sys.executable, *sys.argv]),
        "protocol": args.protocol,
        "ucx_env": {k: os.environ.get(k) for k in UCX_ENV}
        if args.protocol != "tcp"
        else None,
        "compression_on_workers": compression,
        "data": args.data,
        "repeats": repeats,
        "warmup": warmup,
        "machine": {**host, "loadavg_end": os.getloadavg()},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"transport-{args.protocol}-{args.data}"
    if args.compression is not None:
        name += f"-{args.compression}"
    path = args.out / f"{name}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(
        f"distributed {distributed.__version__}, protocol {args.protocol}, "
        f"compression on workers {sorted(set(compression.values()))}, data {args.data}, "
        f"{repeats} repeats after {warmup} warm-up"
    )
    print(table(args.protocol, rows))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
