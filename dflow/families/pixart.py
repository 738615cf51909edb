"""PixArt-Sigma (and Alpha): T5 text encoder with attention masks, a DiT, AutoencoderKL."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dflow.families.base import Family


class PixArt(Family):
    name = "pixart"
    pipelines = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    components = {
        "text_encoder": "encoder",
        "tokenizer": "encoder",
        "transformer": "dit",
        "scheduler": "dit",
        "vae": "vae",
    }
    attention_masks = True
    max_sequence_length = 300
    defaults = {"height": 1024, "width": 1024, "steps": 20, "guidance_scale": 4.5}
    # sizes are the request's own, and prompts are embedded as given
    call_options = {"use_resolution_binning": False, "clean_caption": False}

    def geometry(self, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        transformer, vae = configs["transformer"], configs["vae"]
        return {
            "vae_scale": 2 ** (len(vae["block_out_channels"]) - 1),
            "vae_scale_temporal": 1,
            "patch": transformer["patch_size"],
            "latent_channels": transformer["in_channels"],
            "text_dim": configs["text_encoder"]["d_model"],
            "pooled_dim": 0,
        }


FAMILY = PixArt()
