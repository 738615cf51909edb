"""Stage costs on one GPU for the Wan 2.2 experiment and DiT batching (issues 13, 18).

Real-size architectures with random weights (they cost what real weights cost),
built directly on the GPU from dflow's presets (``configs/models``) and the public
Wan 2.2 A14B configs; diffusers, transformers and torchao, no dflow import, so it
runs on a machine with torch alone plus those wheels. Sections, in priority order:

``wan22``
    One Wan 2.2 A14B expert (``WanTransformer3DModel``, image-to-video: 36 input
    channels; both experts share the architecture) at 480x832x81, batch 1, no CFG:
    one denoising step in bf16, int8 weight-only, int8 weights with dynamic int8
    activations (W8A8) and fp8 weights with dynamic fp8 activations (torchao,
    the ``nn.Linear`` layers diffusers' ``TorchAoConfig`` would quantize), each
    one's output error against bf16 on the same inputs, and whether each quantized
    expert runs within a 24 GiB memory cap.
``offload``
    The monolithic baseline on a 24 GiB card: an expert under diffusers' block-level
    group offload with CUDA streams, capped by ``torch.cuda.set_per_process_memory_fraction``,
    in bf16 and int8, and the two-expert sequence the A14B pipeline runs across its
    boundary step.
``small``
    The Wan VAE (``AutoencoderKLWan``, Wan 2.1's): the image-to-video condition's
    encode (the image and 80 zero frames, as ``WanImageToVideoPipeline.prepare_latents``
    builds it) and an 81-frame decode; UMT5-XXL on 512 tokens; the GPU's ceilings
    (bf16, int8 and fp8 matrix rates, device copy, host-to-device copies).
``batch``
    One DiT step at batch 1, 2, 4, 8: PixArt-Sigma 1024px (CFG), Flux.1-dev 512px
    and 1024px, Wan 2.1 T2V 1.3B 480x832x81 (CFG), bf16.
``compiled``
    The bf16 and W8A8 expert again under ``compile_repeated_blocks`` (fuses the
    activation quantization the eager W8A8 path runs as separate kernels).

Each section runs in its own process (a memory cap or a crash stays inside it);
each measurement is guarded, so a failure is recorded and the next one runs; a
deadline skips what would not finish. Rows are appended to ``OUT/raw.jsonl`` as
they come; at the end the profile files and a table are written.

Usage::

    python benchmarks/gpu_costs.py --out results/ --budget 500
    python benchmarks/gpu_costs.py --tiny --out /tmp/costs  # CPU dry run, tiny configs
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

MODELS = Path(__file__).resolve().parent.parent / "configs" / "models"
GIB = 2**30
SECTIONS = ("wan22", "offload", "small", "batch", "compiled")
#: The memory of the seed's cards (NVIDIA A10 24 GB)
CAP_GIB = 24.0
#: Wan 2.2 A14B expert, from Wan-AI/Wan2.2-I2V-A14B-Diffusers transformer/config.json
#: (T2V: in_channels 16, otherwise the same; both experts share it)
WAN22_EXPERT = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
QUANTIZATIONS = ("bf16", "int8-weight-only", "int8-dynamic", "fp8-dynamic")


# -- shapes ---------------------------------------------------------------------------


def preset(name: str) -> dict[str, Any]:
    return yaml.safe_load((MODELS / f"{name}.yaml").read_text())


class Shapes:
    """Configs and input shapes of every measurement: real sizes, or tiny ones that
    run the same code on a CPU."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        wan_big = preset("tiny-wan" if tiny else "wan2.1-t2v-14b")["components"]
        if tiny:
            self.expert = {**wan_big["transformer"]["config"], "in_channels": 36}
        else:
            self.expert = dict(WAN22_EXPERT)
        self.vae = wan_big["vae"]["config"]
        self.umt5 = wan_big["text_encoder"]["config"]
        # (frames, height, width) of the video; latents are 4x / 8x smaller
        self.video = (9, 32, 32) if tiny else (81, 480, 832)
        self.text_tokens = 32 if tiny else 512
        self.batch_models = {
            "pixart-sigma": preset("tiny-pixart" if tiny else "pixart-sigma-1024"),
            "flux.1-dev": preset("tiny-flux" if tiny else "flux.1-dev"),
            "wan2.1-t2v-1.3b": preset("tiny-wan" if tiny else "wan2.1-t2v-1.3b"),
        }
        self.flux_sizes = (32, 64) if tiny else (512, 1024)
        self.pixart_size = 64 if tiny else 1024
        self.batches = (1, 2, 4, 8)

    @property
    def latent(self) -> tuple[int, int, int]:
        frames, height, width = self.video
        return (frames - 1) // 4 + 1, height // 8, width // 8


# -- measuring ------------------------------------------------------------------------


class Recorder:
    """Appends result rows to ``raw.jsonl`` and skips what the deadline cannot fit."""

    def __init__(self, out: Path, section: str, deadline: float, tiny: bool):
        self.path = out / "raw.jsonl"
        self.section = section
        self.deadline = deadline
        self.tiny = tiny

    def write(self, row: dict[str, Any]) -> None:
        row = {"section": self.section, **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, item: str, seconds: float) -> bool:
        """Whether ``item`` (estimated at ``seconds`` on the GPU) fits the deadline."""
        if self.tiny or self.left() > seconds:
            return True
        self.write(
            {"item": item, "skipped": f"needs ~{seconds:.0f}s, {self.left():.0f}s left"}
        )
        return False

    def attempt(self, item: str, fn: Callable[[], Any]) -> Any:
        """Run one measurement; a failure becomes an error row, not a crash."""
        import torch

        try:
            return fn()
        except Exception as error:  # each measurement stands alone
            message = f"{type(error).__name__}: {str(error).strip()[:600]}"
            self.write({"item": item, "error": message})
            return None
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device() -> str:
    return "cuda" if cuda() else "cpu"


def sync() -> None:
    import torch

    if cuda():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[list[float], Any]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` calls (CUDA events
    on a GPU), and the last call's result."""
    import torch

    result = None
    for _ in range(warmup):
        result = fn()
    sync()
    times = []
    for _ in range(repeats):
        if cuda():
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - begin) * 1000)
    return times, result


def reset_peak() -> None:
    import torch

    if cuda():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / GIB if cuda() else None


def tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor holds, through tensor subclasses (torchao's quantized weights)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def weights_gib(model: Any) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor_bytes(t) for t in tensors) / GIB


def env_row() -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    row: dict[str, Any] = {
        "item": "env",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
    try:
        import torchao

        row["torchao"] = torchao.__version__
    except Exception as error:
        row["torchao"] = f"unavailable: {error}"
    if cuda():
        props = torch.cuda.get_device_properties(0)
        row.update(
            device=torch.cuda.get_device_name(),
            memory_mib=props.total_memory // 2**20,
            capability=list(torch.cuda.get_device_capability()),
            multiprocessors=props.multi_processor_count,
        )
    else:
        row["device"] = "cpu"
    return row


def output_error(out: Any, reference: Any) -> dict[str, float]:
    """Relative L2 error of ``out`` against ``reference``, and the PSNR over the
    reference's range."""
    import torch

    out, reference = out.float(), reference.float()
    diff = out - reference
    mse = torch.mean(diff**2).item()
    span = (reference.max() - reference.min()).item()
    return {
        "rel_l2": (
            torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(reference)
        ).item(),
        "psnr_db": 10 * math.log10(span**2 / mse) if mse > 0 else float("inf"),
        "finite": bool(torch.isfinite(out).all().item()),
    }


def set_cap(gib: float | None) -> None:
    """Cap this process's CUDA allocations at ``gib`` (None: lift the cap)."""
    import torch

    if not cuda():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(
        1.0 if gib is None else gib * GIB / total
    )


# -- building -------------------------------------------------------------------------


def build(
    cls: Any, config: dict[str, Any], dtype: Any = None, on: str | None = None
) -> Any:
    """A model of ``cls`` with seeded random weights, built on the device (or ``on``)
    in ``dtype``, keeping the modules diffusers keeps in float32 in float32."""
    import torch

    dtype = dtype or torch.bfloat16
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(on or device()):
            if hasattr(cls, "config_class") and hasattr(cls.config_class, "model_type"):
                model = cls(cls.config_class(**config))  # transformers
            else:
                model = cls.from_config(config)  # diffusers
    finally:
        torch.set_default_dtype(previous)
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, parameter in model.named_parameters():
        if any(module in name for module in keep):
            parameter.data = parameter.data.float()
    return model.eval().requires_grad_(False)


def quantize(model: Any, kind: str) -> None:
    """Quantize the ``nn.Linear`` weights diffusers' ``TorchAoConfig`` would (all but
    the model's ``_keep_in_fp32_modules``), in place."""
    import torch
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    configs = {
        "int8-weight-only": Int8WeightOnlyConfig,
        "int8-dynamic": Int8DynamicActivationInt8WeightConfig,
        "fp8-dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow()
        ),
    }
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()

    def quantized(module: Any, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not any(
            f"{k}." in f"{name}." for k in keep
        )

    quantize_(model, configs[kind](), filter_fn=quantized)


def expert_inputs(shapes: Shapes, batch: int = 1) -> dict[str, Any]:
    import torch

    generator = torch.Generator(device()).manual_seed(1)
    frames, height, width = shapes.latent
    options = {"device": device(), "dtype": torch.bfloat16, "generator": generator}
    return {
        "hidden_states": torch.randn(
            batch, shapes.expert["in_channels"], frames, height, width, **options
        ),
        "timestep": torch.full((batch,), 750.0, device=device()),
        "encoder_hidden_states": torch.randn(
            batch, shapes.text_tokens, shapes.expert["text_dim"], **options
        ),
        "return_dict": False,
    }


def tokens(shapes: Shapes) -> int:
    frames, height, width = shapes.latent
    return frames * (height // 2) * (width // 2)


# -- section: the Wan 2.2 expert ------------------------------------------------------


def section_wan22(rec: Recorder, shapes: Shapes, repeats: int) -> None:
    import torch
    from diffusers import WanTransformer3DModel

    inputs = expert_inputs(shapes)
    note = f"latent={'x'.join(map(str, shapes.latent))} tokens={tokens(shapes)}, no CFG"
    reference = None
    step_s = 4.0  # a guess until bf16 is measured
    for kind in QUANTIZATIONS:
        if (
            kind == "fp8-dynamic"
            and cuda()
            and torch.cuda.get_device_capability() < (8, 9)
        ):
            rec.write({"item": kind, "skipped": "fp8 needs compute capability >= 8.9"})
            continue
        if kind == "fp8-dynamic" and not cuda():
            rec.write({"item": kind, "skipped": "fp8 matmuls need a GPU"})
            continue
        if not rec.fits(kind, 15 + (2 + repeats) * step_s * 1.3):
            continue

        def run(kind: str = kind) -> None:
            nonlocal reference, step_s
            begin = time.perf_counter()
            model = build(WanTransformer3DModel, shapes.expert)
            sync()
            build_s = time.perf_counter() - begin
            quantize_s = 0.0
            if kind != "bf16":
                begin = time.perf_counter()
                quantize(model, kind)
                sync()
                quantize_s = time.perf_counter() - begin
            gc.collect()
            if cuda():
                torch.cuda.empty_cache()
            allocated = torch.cuda.memory_allocated() / GIB if cuda() else None
            reset_peak()
            with torch.no_grad():
                times, out = timed(lambda: model(**inputs)[0], 1, repeats)
            row = {
                "item": kind,
                "model": "wan2.2-i2v-a14b",
                "stage": "dit_step",
                "quantization": kind,
                "batch": 1,
                "ms": statistics.median(times),
                "ms_all": times,
                "weights_gib": weights_gib(model),
                "allocated_gib": allocated,
                "peak_gib": peak_gib(),
                "build_s": build_s,
                "quantize_s": quantize_s,
                "note": note,
            }
            if reference is None:
                reference = out.float()
                step_s = row["ms"] / 1000
                row["finite"] = bool(torch.isfinite(out).all().item())
            else:
                row.update(output_error(out, reference))
            del out
            rec.write(row)
            if kind != "bf16":
                rec.attempt(
                    f"{kind} capped", lambda: capped_step(rec, model, kind, inputs)
                )

        rec.attempt(kind, run)


def capped_step(rec: Recorder, model: Any, kind: str, inputs: dict[str, Any]) -> None:
    """One step of the resident expert with allocations capped at ``CAP_GIB``."""
    import torch

    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
    set_cap(CAP_GIB)
    reset_peak()
    row: dict[str, Any] = {
        "item": f"{kind} capped",
        "quantization": kind,
        "cap_gib": CAP_GIB,
    }
    try:
        with torch.no_grad():
            times, _ = timed(lambda: model(**inputs)[0], 0, 1)
        row.update(fits=True, ms=times[0], peak_gib=peak_gib())
    except torch.OutOfMemoryError as error:
        row.update(fits=False, oom=str(error).splitlines()[0][:300])
    finally:
        set_cap(None)
    rec.write(row)


# -- section: VAE, UMT5, ceilings ----------------------------------------------------


def section_small(rec: Recorder, shapes: Shapes, repeats: int) -> None:
    if rec.fits("vae", 25):
        rec.attempt("vae", lambda: vae_costs(rec, shapes, repeats))
    if rec.fits("umt5", 15):
        rec.attempt("umt5", lambda: umt5_cost(rec, shapes))
    if rec.fits("ceilings", 15):
        rec.attempt("ceilings", lambda: ceilings(rec, shapes))


def vae_costs(rec: Recorder, shapes: Shapes, repeats: int) -> None:
    import torch
    from diffusers import AutoencoderKLWan

    vae = build(AutoencoderKLWan, shapes.vae)
    frames, height, width = shapes.video
    generator = torch.Generator(device()).manual_seed(2)
    image = (
        torch.rand(1, 3, 1, height, width, device=device(), generator=generator) * 2 - 1
    )
    # what WanImageToVideoPipeline.prepare_latents encodes: the image, then zeros
    condition = torch.cat(
        [image, image.new_zeros(1, 3, frames - 1, height, width)], dim=2
    ).to(torch.bfloat16)
    common = {"model": "wan2.2-i2v-a14b", "batch": 1, "weights_gib": weights_gib(vae)}
    reset_peak()
    with torch.no_grad():
        times, latent = timed(
            lambda: vae.encode(condition).latent_dist.mode(), 1, repeats
        )
    rec.write(
        {
            **common,
            "item": "vae_encode",
            "stage": "vae_encode",
            "ms": statistics.median(times),
            "ms_all": times,
            "peak_gib": peak_gib(),
            "note": f"I2V condition: image + {frames - 1} zero frames, {height}x{width}",
            "latent_shape": list(latent.shape),
        }
    )
    latents = torch.randn(
        1, shapes.vae["z_dim"], *shapes.latent, device=device(), dtype=torch.bfloat16
    )
    reset_peak()
    with torch.no_grad():
        times, video = timed(
            lambda: vae.decode(latents, return_dict=False)[0], 1, repeats
        )
    rec.write(
        {
            **common,
            "item": "vae_decode",
            "stage": "vae_decode",
            "ms": statistics.median(times),
            "ms_all": times,
            "peak_gib": peak_gib(),
            "note": f"{frames}f {height}x{width}",
            "video_shape": list(video.shape),
        }
    )


def umt5_cost(rec: Recorder, shapes: Shapes) -> None:
    import torch
    from transformers import UMT5EncoderModel

    encoder = build(UMT5EncoderModel, shapes.umt5)
    generator = torch.Generator(device()).manual_seed(3)
    ids = torch.randint(
        0,
        shapes.umt5["vocab_size"],
        (1, shapes.text_tokens),
        device=device(),
        generator=generator,
    )
    mask = torch.ones_like(ids)
    reset_peak()
    with torch.no_grad():
        times, _ = timed(
            lambda: encoder(input_ids=ids, attention_mask=mask).last_hidden_state, 2, 5
        )
    rec.write(
        {
            "item": "umt5",
            "model": "wan2.2-i2v-a14b",
            "stage": "encoder",
            "batch": 1,
            "ms": statistics.median(times),
            "ms_all": times,
            "weights_gib": weights_gib(encoder),
            "peak_gib": peak_gib(),
            "note": f"UMT5-XXL seq={shapes.text_tokens}",
        }
    )


def ceilings(rec: Recorder, shapes: Shapes) -> None:
    """Matrix rates (bf16, int8, fp8), device copy and host-to-device rates."""
    import torch

    n = 256 if shapes.tiny else 8192
    row: dict[str, Any] = {"item": "ceilings"}
    generator = torch.Generator(device()).manual_seed(4)
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device(), dtype=torch.bfloat16, generator=generator)
    times, _ = timed(lambda: a @ b, 3, 10)
    row["bf16_matmul_tflops"] = 2 * n**3 / (statistics.median(times) / 1000) / 1e12
    ai = torch.randint(
        -127, 127, (n, n), device=device(), dtype=torch.int8, generator=generator
    )
    bi = torch.randint(
        -127, 127, (n, n), device=device(), dtype=torch.int8, generator=generator
    )
    bi_cols = bi.t().contiguous().t()  # the layout cuBLASLt's int8 GEMM takes
    try:
        times, _ = timed(lambda: torch._int_mm(ai, bi_cols), 3, 10)
        row["int8_matmul_tops"] = 2 * n**3 / (statistics.median(times) / 1000) / 1e12
    except Exception as error:
        row["int8_matmul_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    if cuda() and torch.cuda.get_device_capability() >= (8, 9):
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=device())
        times, _ = timed(
            lambda: torch._scaled_mm(
                a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16
            ),
            3,
            10,
        )
        row["fp8_matmul_tflops"] = 2 * n**3 / (statistics.median(times) / 1000) / 1e12
    if cuda():
        size = GIB
        src = torch.empty(size, dtype=torch.uint8, device=device())
        dst = torch.empty_like(src)
        times, _ = timed(lambda: dst.copy_(src), 2, 10)
        row["device_copy_gbs"] = 2 * size / (statistics.median(times) / 1000) / 1e9
        for kind, host in (
            ("pinned", torch.empty(size, dtype=torch.uint8).pin_memory()),
            ("pageable", torch.empty(size, dtype=torch.uint8)),
        ):
            times, _ = timed(lambda host=host: dst.copy_(host, non_blocking=True), 1, 5)
            row[f"h2d_{kind}_gibs"] = size / GIB / (statistics.median(times) / 1000)
    rec.write(row)


# -- section: block offload on a 24 GiB card ------------------------------------------


def section_offload(rec: Recorder, shapes: Shapes, repeats: int) -> None:
    import torch
    from diffusers import WanTransformer3DModel
    from diffusers.hooks import apply_group_offloading

    inputs = expert_inputs(shapes)

    def offloaded(kind: str) -> tuple[Any, float]:
        set_cap(None)
        begin = time.perf_counter()
        model = build(WanTransformer3DModel, shapes.expert)
        if kind != "bf16":
            quantize(model, kind)
        # moves every weight to pinned host memory; blocks stream back in on use
        apply_group_offloading(
            model,
            onload_device=torch.device(device()),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=cuda(),
            non_blocking=True,
        )
        gc.collect()
        if cuda():
            torch.cuda.empty_cache()
        setup_s = time.perf_counter() - begin
        set_cap(CAP_GIB)
        return model, setup_s

    common = {
        "model": "wan2.2-i2v-a14b",
        "stage": "dit_step",
        "batch": 1,
        "cap_gib": CAP_GIB,
        "offload": "group offload, block level, 1 block a group, CUDA stream, pinned host memory",
    }
    experts: dict[str, Any] = {}

    def one(kind: str) -> None:
        model, setup_s = offloaded(kind)
        reset_peak()
        with torch.no_grad():
            times, _ = timed(lambda: model(**inputs)[0], 1, repeats)
        rec.write(
            {
                **common,
                "item": f"offload {kind}",
                "quantization": kind,
                "ms": statistics.median(times),
                "ms_all": times,
                "weights_gib": weights_gib(model),
                "peak_gib": peak_gib(),
                "setup_s": setup_s,
                **pinned_host_gib(),
            }
        )
        experts[kind] = model

    def swap(kind: str) -> None:
        # the low-noise expert joins the high-noise one on the host; the pipeline's
        # boundary step is the first call of the second after the first
        high = experts.pop(kind, None) or offloaded(kind)[0]
        low, setup_s = offloaded(kind)
        reset_peak()
        times = []
        with torch.no_grad():
            for model in (high, high, low, low):
                step_times, _ = timed(lambda model=model: model(**inputs)[0], 0, 1)
                times.extend(step_times)
        rec.write(
            {
                **common,
                "item": f"offload swap {kind}",
                "quantization": kind,
                "sequence": ["high", "high", "low", "low"],
                "ms_all": times,
                "peak_gib": peak_gib(),
                "setup_s": setup_s,
                **pinned_host_gib(),
            }
        )

    def free() -> None:
        experts.clear()
        gc.collect()
        release_pinned()

    # The seed's baseline first: int8 experts, block-offloaded, swapped at the
    # boundary step. Pinned host memory is rounded up to powers of two (a bf16
    # expert takes 40 GiB of it), so two int8 experts or one bf16 are on the host
    # at once.
    int8 = "int8-weight-only"
    if rec.fits(f"offload {int8}", 35 + (1 + repeats) * 4.5):
        rec.attempt(f"offload {int8}", lambda: one(int8))
    if int8 in experts and rec.fits(f"offload swap {int8}", 35 + 4 * 4.5):
        rec.attempt(f"offload swap {int8}", lambda: swap(int8))
    free()
    if rec.fits("offload bf16", 35 + (1 + repeats) * 4.5):
        rec.attempt("offload bf16", lambda: one("bf16"))
    free()


def pinned_host_gib() -> dict[str, float]:
    """Pinned host memory in use and held by torch's host allocator."""
    import torch

    try:
        stats = torch.cuda.host_memory_stats()
        return {
            "pinned_allocated_gib": stats["allocated_bytes.current"] / GIB,
            "pinned_reserved_gib": stats["reserved_bytes.current"] / GIB,
        }
    except Exception:
        return {}


def release_pinned() -> None:
    """Give cached pinned host memory back (it is rounded up to powers of two and
    kept for reuse), so the next offloaded model has the host's memory."""
    import torch

    if not cuda():
        return
    for release in (
        getattr(torch.accelerator, "empty_host_cache", None),
        getattr(torch._C, "_host_emptyCache", None),
    ):
        if release is not None:
            release()
            return


# -- section: DiT batching --------------------------------------------------------------


def section_batch(rec: Recorder, shapes: Shapes, repeats: int) -> None:
    import torch
    from diffusers import (
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        WanTransformer3DModel,
    )

    bf16 = {"device": device(), "dtype": torch.bfloat16}

    def pixart(model: Any, batch: int) -> Callable[[], Any]:
        config = shapes.batch_models["pixart-sigma"]["components"]["transformer"][
            "config"
        ]
        side = shapes.pixart_size // 8
        seq = shapes.batch_models["pixart-sigma"]["defaults"]["max_sequence_length"]
        rows = 2 * batch  # classifier-free guidance: one call on both halves
        latents = torch.randn(rows, config["in_channels"], side, side, **bf16)
        text = torch.randn(rows, seq, config["caption_channels"], **bf16)
        mask = torch.ones(rows, seq, device=device())
        timestep = torch.full((rows,), 500, device=device())
        added = {"resolution": None, "aspect_ratio": None}
        return lambda: model(
            latents,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            timestep=timestep,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def flux(model: Any, batch: int, size: int) -> Callable[[], Any]:
        from diffusers import FluxPipeline

        entry = shapes.batch_models["flux.1-dev"]
        config = entry["components"]["transformer"]["config"]
        seq = entry["defaults"]["max_sequence_length"]
        side = size // 16  # 8x VAE, then 2x2 packing
        latents = torch.randn(batch, side * side, config["in_channels"], **bf16)
        text = torch.randn(batch, seq, config["joint_attention_dim"], **bf16)
        pooled = torch.randn(batch, config["pooled_projection_dim"], **bf16)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch, side, side, device(), torch.bfloat16
        )
        text_ids = torch.zeros(seq, 3, **bf16)
        timestep = torch.full((batch,), 0.5, **bf16)
        guidance = torch.full((batch,), 3.5, device=device(), dtype=torch.float32)
        return lambda: model(
            hidden_states=latents,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]

    def wan(model: Any, batch: int) -> Callable[[], Any]:
        config = shapes.batch_models["wan2.1-t2v-1.3b"]["components"]["transformer"][
            "config"
        ]
        latents = torch.randn(batch, config["in_channels"], *shapes.latent, **bf16)
        text = torch.randn(batch, shapes.text_tokens, config["text_dim"], **bf16)
        negative = torch.randn(batch, shapes.text_tokens, config["text_dim"], **bf16)
        timestep = torch.full((batch,), 750.0, device=device())

        def step() -> Any:
            # WanPipeline's guidance: a conditional and an unconditional call
            cond = model(latents, timestep, text, return_dict=False)[0]
            uncond = model(latents, timestep, negative, return_dict=False)[0]
            return uncond + 5.0 * (cond - uncond)

        return step

    frames, height, width = shapes.video
    flux_small, flux_large = shapes.flux_sizes
    cases = [
        (
            "pixart-sigma",
            PixArtTransformer2DModel,
            "dit_step_cfg",
            pixart,
            (shapes.pixart_size, shapes.pixart_size, 1),
            0.04,
        ),
        (
            "flux.1-dev",
            FluxTransformer2DModel,
            "dit_step",
            lambda m, b: flux(m, b, flux_small),
            (flux_small, flux_small, 1),
            0.05,
        ),
        (
            "flux.1-dev",
            FluxTransformer2DModel,
            "dit_step",
            lambda m, b: flux(m, b, flux_large),
            (flux_large, flux_large, 1),
            0.18,
        ),
        (
            "wan2.1-t2v-1.3b",
            WanTransformer3DModel,
            "dit_step_cfg",
            wan,
            (height, width, frames),
            1.25,
        ),
    ]
    built: dict[str, Any] = {}
    for name, cls, stage, make, (h, w, f), guess_s in cases:
        item = f"batch {name} {h}x{w}" + (f"x{f}" if f > 1 else "")
        if not rec.fits(item, 10 + 3 * guess_s * 3):
            continue

        def run(
            name=name,
            cls=cls,
            stage=stage,
            make=make,
            h=h,
            w=w,
            f=f,
            guess_s=guess_s,
            item=item,
        ) -> None:
            if name not in built:
                built.clear()
                gc.collect()
                if cuda():
                    torch.cuda.empty_cache()
                config = shapes.batch_models[name]["components"]["transformer"][
                    "config"
                ]
                built[name] = build(cls, config)
            model = built[name]
            step_s = guess_s
            for batch in shapes.batches:
                estimate = (1 + repeats) * step_s * batch * 1.1
                if not rec.fits(f"{item} b{batch}", estimate):
                    break

                def measure(batch: int = batch) -> float:
                    fn = make(model, batch)
                    reset_peak()
                    with torch.no_grad():
                        times, _ = timed(fn, 1, repeats)
                    ms = statistics.median(times)
                    rec.write(
                        {
                            "item": f"{item} b{batch}",
                            "model": name,
                            "stage": stage,
                            "batch": batch,
                            "height": h,
                            "width": w,
                            "frames": f,
                            "ms": ms,
                            "ms_all": times,
                            "weights_gib": weights_gib(model),
                            "peak_gib": peak_gib(),
                        }
                    )
                    return ms

                ms = rec.attempt(f"{item} b{batch}", measure)
                if ms is None:
                    break
                step_s = ms / 1000 / batch

        rec.attempt(item, run)


# -- section: compiled experts ------------------------------------------------------------


def section_compiled(rec: Recorder, shapes: Shapes, repeats: int) -> None:
    import torch
    from diffusers import WanTransformer3DModel

    inputs = expert_inputs(shapes)
    # W8A8 first: whether fused activation quantization beats bf16 is the question
    for kind in ("int8-dynamic", "bf16"):
        if not rec.fits(f"compiled {kind}", 100):
            continue

        def run(kind: str = kind) -> None:
            model = build(WanTransformer3DModel, shapes.expert)
            if kind != "bf16":
                quantize(model, kind)
            model.compile_repeated_blocks(fullgraph=True)
            with torch.no_grad():
                begin = time.perf_counter()
                model(**inputs)
                sync()
                compile_s = time.perf_counter() - begin
                reset_peak()
                times, _ = timed(lambda: model(**inputs)[0], 1, repeats)
            rec.write(
                {
                    "item": f"compiled {kind}",
                    "model": "wan2.2-i2v-a14b",
                    "stage": "dit_step",
                    "quantization": kind,
                    "compiled": "compile_repeated_blocks(fullgraph=True)",
                    "batch": 1,
                    "ms": statistics.median(times),
                    "ms_all": times,
                    "first_call_s": compile_s,
                    "peak_gib": peak_gib(),
                }
            )

        rec.attempt(f"compiled {kind}", run)


def run_section(
    name: str, out: Path, deadline: float, tiny: bool, repeats: int
) -> None:
    # torchao's deprecation notices would bury the log
    warnings.filterwarnings("ignore", category=UserWarning, module="torchao")
    warnings.filterwarnings("ignore", category=FutureWarning)
    rec = Recorder(out, name, deadline, tiny)
    rec.write(env_row())
    shapes = Shapes(tiny)
    sections = {
        "wan22": section_wan22,
        "small": section_small,
        "offload": section_offload,
        "batch": lambda rec, shapes, repeats: section_batch(
            rec, shapes, min(repeats, 2)
        ),
        "compiled": section_compiled,
    }
    sections[name](rec, shapes, repeats)


def weight_counts() -> dict[str, float]:
    """Bytes of one Wan 2.2 A14B expert, counted on the meta device (no GPU): in bf16,
    with torchao's int8 weight-only layout (int8 data, a bf16 scale and an int64 zero
    point per output row), and the pinned host memory group offload takes for each
    (torch's host allocator rounds every tensor up to a power of two)."""
    import torch
    from diffusers import WanTransformer3DModel

    model = build(WanTransformer3DModel, WAN22_EXPERT, on="meta")
    keep = model._keep_in_fp32_modules
    linears = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not any(f"{k}." in f"{name}." for k in keep)
    }

    def pinned(size: int) -> int:
        return 1 << (size - 1).bit_length()

    totals = dict.fromkeys(("bf16", "int8", "bf16_pinned", "int8_pinned"), 0)
    for name, parameter in model.named_parameters():
        size = parameter.numel() * parameter.element_size()
        totals["bf16"] += size
        totals["bf16_pinned"] += pinned(size)
        if name.endswith(".weight") and name[: -len(".weight")] in linears:
            rows = parameter.shape[0]
            parts = [parameter.numel(), rows * 2, rows * 8]
        else:
            parts = [size]
        totals["int8"] += sum(parts)
        totals["int8_pinned"] += sum(pinned(part) for part in parts)
    count = sum(p.numel() for p in model.parameters())
    return {
        "parameters_billion": count / 1e9,
        **{f"{k}_gib": v / GIB for k, v in totals.items()},
    }


# -- the driver: sections in processes, then the profile files --------------------------


def gpu_slug(device_name: str) -> str:
    """``h100`` for 'NVIDIA H100 80GB HBM3' and the like."""
    match = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", device_name.replace("NVIDIA", ""))
    return match.group(1).lower() if match else re.sub(r"\W+", "-", device_name).lower()


def profiles(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The GPU's slug, its Wan 2.2 profile and its DiT batch profile, from raw rows."""
    env = next(r for r in rows if r.get("item") == "env")
    name = env["device"]
    slug = gpu_slug(name)
    device_text = (
        f"{name} ({env.get('memory_mib', '?')} MiB), torch {env['torch']}, diffusers "
        f"{env['diffusers']}, transformers {env['transformers']}, torchao {env['torchao']}, "
        f"random weights, eager PyTorch (SDPA attention), measured {time.strftime('%Y-%m-%d')}"
    )
    by_item = {
        r["item"]: r
        for r in rows
        if "item" in r and "error" not in r and "skipped" not in r
    }
    keys = ("model", "stage", "batch", "ms", "weights_gib", "peak_gib", "note")

    def row(raw: dict[str, Any], **extra: Any) -> dict[str, Any]:
        out = {k: raw[k] for k in keys if k in raw}
        for k in ("ms", "weights_gib", "peak_gib"):
            if isinstance(out.get(k), float):
                out[k] = round(out[k], 1 if k == "ms" else 2)
        return {**out, **extra}

    wan_rows = []
    for kind in QUANTIZATIONS:
        if kind in by_item:
            raw = by_item[kind]
            extra: dict[str, Any] = {"quantization": kind}
            if "rel_l2" in raw:
                extra["error_vs_bf16"] = {
                    "rel_l2": round(raw["rel_l2"], 5),
                    "psnr_db": round(raw["psnr_db"], 2),
                }
            capped = by_item.get(f"{kind} capped")
            if capped:
                extra["resident_in_24gib"] = {
                    "fits": capped["fits"],
                    **(
                        {"peak_gib": round(capped["peak_gib"], 2)}
                        if capped.get("peak_gib")
                        else {}
                    ),
                }
            wan_rows.append(row(raw, **extra))
    for item in ("compiled bf16", "compiled int8-dynamic"):
        if item in by_item:
            raw = by_item[item]
            wan_rows.append(
                row(
                    raw,
                    quantization=raw["quantization"],
                    compiled=raw["compiled"],
                    note="either expert, compiled; first call (compile) "
                    f"{raw['first_call_s']:.0f} s",
                )
            )
    for item in ("umt5", "vae_encode", "vae_decode"):
        if item in by_item:
            wan_rows.append(row(by_item[item], quantization="bf16"))
    offload: dict[str, Any] = {
        "what": "one Wan 2.2 A14B expert step (480x832x81, batch 1, no CFG) under diffusers' "
        "apply_group_offloading (block_level, num_blocks_per_group=1, use_stream=True, "
        f"non_blocking), allocations capped at {CAP_GIB:g} GiB by "
        "torch.cuda.set_per_process_memory_fraction"
    }
    for kind in ("bf16", "int8-weight-only"):
        raw = by_item.get(f"offload {kind}")
        if raw:
            offload[kind] = {
                "ms_per_step": round(raw["ms"], 1),
                "peak_gib": round(raw["peak_gib"], 2) if raw.get("peak_gib") else None,
                "weights_gib": round(raw["weights_gib"], 2),
                "setup_s": round(raw["setup_s"], 1),
            }
            resident = by_item.get(kind)
            if resident:
                offload[kind]["resident_ms_per_step"] = round(resident["ms"], 1)
                offload[kind]["overhead_ms_per_step"] = round(
                    raw["ms"] - resident["ms"], 1
                )
        else:
            failure = next(
                (r for r in rows if r.get("item") == f"offload {kind}"), None
            )
            if failure:
                offload[kind] = {
                    k: failure[k] for k in ("error", "skipped") if k in failure
                }
    swap = by_item.get("offload swap int8-weight-only") or by_item.get(
        "offload swap bf16"
    )
    if swap:
        high_ms, low_ms = swap["ms_all"][1], swap["ms_all"][2]
        offload["two_experts"] = {
            "quantization": swap["quantization"],
            "sequence": swap["sequence"],
            "ms_per_step": [round(t, 1) for t in swap["ms_all"]],
            "boundary_step_extra_ms": round(low_ms - high_ms, 1),
            "peak_gib": round(swap["peak_gib"], 2) if swap.get("peak_gib") else None,
        }
    ceiling = by_item.get("ceilings", {})
    wan_profile = {
        "device": device_text,
        "gpu": name,
        "ceilings": {
            k: round(v, 1) for k, v in ceiling.items() if isinstance(v, float)
        },
        "rows": wan_rows,
        "monolithic_wan22_i2v_a14b_24gib": offload,
    }
    batch_rows = []
    for raw in rows:
        if raw.get("section") == "batch" and "ms" in raw and "error" not in raw:
            one = next(
                (
                    r
                    for r in rows
                    if r.get("section") == "batch"
                    and r.get("model") == raw["model"]
                    and r.get("height") == raw["height"]
                    and r.get("batch") == 1
                    and "ms" in r
                ),
                None,
            )
            extra = {
                "height": raw["height"],
                "width": raw["width"],
                "frames": raw["frames"],
            }
            if one:
                extra["per_request_speedup"] = round(
                    one["ms"] * raw["batch"] / raw["ms"], 2
                )
            batch_rows.append(row(raw, **extra))
    batch_profile = {
        "device": device_text,
        "gpu": name,
        "dtype": "bfloat16",
        "rows": batch_rows,
    }
    return slug, wan_profile, batch_profile


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'section':9} {'item':44} {'ms':>9} {'peak GiB':>9} {'wts GiB':>8}  extra"
    ]
    for r in rows:
        if r.get("item") == "env":
            continue
        if "error" in r or "skipped" in r:
            extra = (
                ("ERROR " + r["error"])
                if "error" in r
                else ("skipped: " + r["skipped"])
            )
            lines.append(
                f"{r['section']:9} {r.get('item', ''):44} {'':>9} {'':>9} {'':>8}  {extra[:150]}"
            )
            continue
        if r.get("item") == "ceilings":
            values = ", ".join(
                f"{k}={v:.0f}" for k, v in r.items() if isinstance(v, float)
            )
            lines.append(
                f"{r['section']:9} {'ceilings':44} {'':>9} {'':>9} {'':>8}  {values}"
            )
            continue
        extra = []
        for k in ("rel_l2", "psnr_db", "fits", "ms_all", "first_call_s"):
            if k in r:
                v = r[k]
                extra.append(
                    f"{k}={[round(t) for t in v] if k == 'ms_all' else (round(v, 4) if isinstance(v, float) else v)}"
                )
        ms = f"{r['ms']:.1f}" if "ms" in r else ""
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else ""
        weights = f"{r['weights_gib']:.2f}" if "weights_gib" in r else ""
        lines.append(
            f"{r['section']:9} {r.get('item', ''):44} {ms:>9} {peak:>9} {weights:>8}  {' '.join(extra)}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument(
        "--budget", type=float, default=500, help="seconds for all sections"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--tiny", action="store_true", help="tiny configs (a CPU dry run)"
    )
    parser.add_argument(
        "--weights",
        action="store_true",
        help="print one expert's weight and pinned-host bytes (meta device, no GPU)",
    )
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.weights:
        print(json.dumps(weight_counts(), indent=1))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.section:
        run_section(args.section, args.out, args.deadline, args.tiny, args.repeats)
        return
    started = time.time()
    deadline = started + args.budget
    raw = args.out / "raw.jsonl"
    raw.unlink(missing_ok=True)
    for name in args.sections.split(","):
        left = deadline - time.time()
        if left < 20:
            with raw.open("a") as f:
                f.write(
                    json.dumps(
                        {"section": name, "item": name, "skipped": f"{left:.0f}s left"}
                    )
                    + "\n"
                )
            continue
        command = [
            sys.executable,
            __file__,
            "--section",
            name,
            "--deadline",
            str(deadline),
            "--out",
            str(args.out),
            "--repeats",
            str(args.repeats),
        ]
        command += ["--tiny"] if args.tiny else []
        print(f"== {name} ({left:.0f}s left)", flush=True)
        try:
            code = subprocess.run(
                command, timeout=left + 15, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        if code != 0:
            with raw.open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "section": name,
                            "item": name,
                            "error": f"section process ended: {code}",
                        }
                    )
                    + "\n"
                )
    rows = []
    for line in raw.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a section killed mid-write
            continue
    (args.out / "gpu-costs-raw.json").write_text(json.dumps(rows, indent=1))
    try:
        slug, wan_profile, batch_profile = profiles(rows)
        for kind, profile in (("wan22", wan_profile), ("dit-batch", batch_profile)):
            path = args.out / f"{slug}-{kind}.json"
            path.write_text(json.dumps(profile, indent=1) + "\n")
    except Exception as error:  # the raw rows are still there
        print(f"profile files not written: {type(error).__name__}: {error}")
    print(f"\n{time.time() - started:.0f}s in all\n{table(rows)}", flush=True)


if __name__ == "__main__":
    main()
