"""What the emulated backend charges (EMULATED figures, not measurements).

For each real-size model preset and each GPU type of the catalog
(``configs/gpus.yaml``), the emulated seconds of the preset's default request per
stage on a stage worker (encoder also per request in a batch of 8), whether each
stage fits the card, and what a monolithic worker (stage ``all``) pays: resident
when the pipeline fits, else the cheaper of model and group offload. Only the h200
rows rest on measurements of that GPU; every other row is the H200 profile scaled
as ``docs/emulation.md`` describes.

Run: ``python benchmarks/emulation_check.py`` (about half a minute, no GPU).
"""

from __future__ import annotations

from dflow.catalog import resolve
from dflow.emulation import cost_model
from dflow.errors import StageOutOfMemory
from dflow.hardware import GIB
from dflow.request import Request
from dflow.spec import STAGES

MODELS = ("flux.1-dev", "pixart-sigma-1024", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b")


def main() -> None:
    cost = cost_model()
    header = (
        "| model | GPU | encoder s | enc/req @b8 s | DiT s | VAE s | stages that fit "
        "| monolithic s | monolithic mode | peak GiB |"
    )
    print("EMULATED (dflow.emulation; only h200 rows rest on H200 measurements)")
    print(header)
    print("|---" * 10 + "|")
    for model in MODELS:
        spec = resolve(model)
        request = Request(model=model, prompt="a red bicycle", seed=0)
        features = request.features
        for gpu in cost.catalog.gpus:
            cells = [model, gpu]
            fits = []
            for stage in STAGES:
                seconds = cost.seconds(spec, stage, gpu, features)
                try:
                    cost.placement(spec, (stage,), gpu, features)
                    fits.append(stage)
                except StageOutOfMemory:
                    pass
                cells.append(f"{seconds:.3f}" if stage != "dit" else f"{seconds:.2f}")
                if stage == "encoder":
                    batch = cost.seconds(spec, stage, gpu, features, 8) / 8
                    cells.append(f"{batch:.3f}")
            cells.append(", ".join(fits) or "none")
            try:
                whole = cost.placement(spec, STAGES, gpu, features)
                cells += [
                    f"{whole.seconds:.2f}",
                    whole.mode,
                    f"{whole.peak_bytes / GIB:.1f}",
                ]
            except StageOutOfMemory:
                cells += ["—", "does not fit", "—"]
            print("| " + " | ".join(cells) + " |")
    offload = cost.offload_rates(cost.catalog.reference)
    print(
        f"\nOffload rates on the reference (solved from the measured Flux runs): "
        f"model offload {offload[0] / GIB:.2f} GiB/s, group offload "
        f"{offload[1] / GIB:.2f} GiB/s"
    )


if __name__ == "__main__":
    main()
