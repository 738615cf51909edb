"""What encoding a Wan 2.2 image-to-video request's input image costs (issue 13).

The image-to-video pipeline encodes the image followed by ``num_frames - 1`` zero
frames with the Wan VAE (``WanImageToVideoPipeline.prepare_latents``); dflow runs
that encode on the encoder stage (docs/wan22.md). This script measures, on this
machine's CPU:

1. the encoder stage of ``tiny-wan22-i2v`` with and without its image (the
   prompt alone is ``tiny-wan22-t2v``'s encoder: the same UMT5), and the VAE
   stage's decode of the same request, through dflow's stage runtimes;
2. the real-size Wan VAE (``wan2.1-t2v-14b``'s, random weights) encoding the
   condition and decoding its latents at a reduced size, timed and counted in
   FLOPs (``torch.utils.flop_counter``), so the encode's cost follows from the
   H200's measured 81-frame decode by the encode/decode ratio.

Usage::

    python benchmarks/wan22_encode.py --out benchmarks/results/wan22-encode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import dask.config

from dflow import presets
from dflow.request import Request
from dflow.runtime import StageRuntime

#: The H200 decode of 81 frames of 480x832 (configs/profiles/h200-stages.json)
H200_DECODE_S = 1.8196


def timed(call: Any, repeats: int) -> float:
    """Median seconds of ``call`` over ``repeats`` runs after one warm-up."""
    call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def tiny_stages(repeats: int) -> dict[str, float]:
    """Encoder with and without the image, and the VAE's decode, of the tiny
    preset's default request (32x32, 9 frames), through dflow's runtimes."""
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with_image = Request(
        model="tiny-wan22-i2v", prompt="a fox", seed=0, guidance_scale=1.0, image=image
    )
    prompt_only = Request(
        model="tiny-wan22-t2v", prompt="a fox", seed=0, guidance_scale=1.0
    )
    i2v = StageRuntime("tiny-wan22-i2v", "encoder", device="cpu")
    t2v = StageRuntime("tiny-wan22-t2v", "encoder", device="cpu")
    vae = StageRuntime("tiny-wan22-i2v", "vae", device="cpu")
    latents = {"latents": vae.zero_latents(with_image)}
    return {
        "encoder_with_image_s": timed(lambda: i2v.encode(with_image), repeats),
        "encoder_prompt_only_s": timed(lambda: t2v.encode(prompt_only), repeats),
        "vae_decode_s": timed(lambda: vae.decode(with_image, latents), repeats),
    }


def real_vae(frames: int, height: int, width: int, repeats: int) -> dict[str, Any]:
    """The real-size Wan VAE in float32 on the CPU: the condition's encode (an
    image and ``frames - 1`` zero frames) and the decode of as many latent frames."""
    from diffusers import AutoencoderKLWan

    config = presets.get("wan2.1-t2v-14b")["components"]["vae"]["config"]
    torch.manual_seed(0)
    vae = AutoencoderKLWan.from_config(config).eval()
    video = torch.zeros(1, 3, frames, height, width)
    video[:, :, 0] = torch.rand(1, 3, height, width) * 2 - 1
    latent_frames = (frames - 1) // 4 + 1
    latents = torch.randn(1, 16, latent_frames, height // 8, width // 8)

    def encode() -> Any:
        return vae.encode(video).latent_dist.mode()

    def decode() -> Any:
        return vae.decode(latents).sample

    result: dict[str, Any] = {"frames": frames, "height": height, "width": width}
    with torch.inference_mode():
        for name, call in (("encode", encode), ("decode", decode)):
            with FlopCounterMode(display=False) as counter:
                call()
            result[f"{name}_gflop"] = counter.get_total_flops() / 1e9
            result[f"{name}_s"] = timed(call, repeats)
    result["time_ratio"] = result["encode_s"] / result["decode_s"]
    result["flop_ratio"] = result["encode_gflop"] / result["decode_gflop"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--size",
        default="17x96x160",
        help="frames x height x width of the real-size VAE's runs",
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    frames, height, width = (int(v) for v in args.size.split("x"))
    with dask.config.set({"dflow.runtime.device": "cpu"}):
        tiny = tiny_stages(args.repeats)
    real = real_vae(frames, height, width, max(1, args.repeats // 2))
    # the 81-frame 480x832 encode on the H200, by either ratio
    derived = {
        "by_time_ratio_s": H200_DECODE_S * real["time_ratio"],
        "by_flop_ratio_s": H200_DECODE_S * real["flop_ratio"],
    }
    report = {
        "device": f"cpu, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "tiny_wan22": tiny,
        "real_vae": real,
        "h200_encode_derived": derived,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
