"""CLI: ``python -m ldm.convert SRC DST`` between diffusers folders and original SD single files."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from ldm.autoencoder import AutoencoderKL
from ldm.convert.diffusers_format import from_diffusers, to_diffusers
from ldm.convert.single_file import load_sd_checkpoint, read_state_dict, save_state_dict, to_sd_state_dict
from ldm.unet import UNet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _diffusers_text_encoder(folder: Path) -> dict[str, torch.Tensor] | None:
    """An SD1-style CLIP text encoder from ``folder/text_encoder`` in the SD layout (``transformer.text_model.*``)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        file = folder / "text_encoder" / name
        if file.is_file():
            sd = read_state_dict(file)
            if all(k.startswith("text_model.") for k in sd):
                return {"transformer." + k: v for k, v in sd.items()}
            warnings.warn("text encoder is not a transformers CLIPTextModel; not written", stacklevel=2)
            return None
    return None


def load_source(src: Path, unsafe_pickle: bool) -> tuple[UNet, AutoencoderKL, dict[str, torch.Tensor] | None]:
    """Our UNet and VAE (and the SD-layout text encoder state dict, when there is one) from a folder or a file."""
    if src.is_dir():
        import diffusers  # noqa: PLC0415

        unet = from_diffusers(diffusers.UNet2DConditionModel.from_pretrained(src, subfolder="unet"))
        vae = from_diffusers(diffusers.AutoencoderKL.from_pretrained(src, subfolder="vae"))
        return unet, vae, _diffusers_text_encoder(src)  # type: ignore[return-value]
    ckpt = load_sd_checkpoint(src, unsafe_pickle=unsafe_pickle)
    return ckpt.unet, ckpt.vae, ckpt.cond_stage_state_dict or None


def main(argv: list[str] | None = None) -> int:
    """Convert SRC (diffusers folder or SD single file) to DST (.safetensors / .ckpt file or diffusers folder)."""
    parser = argparse.ArgumentParser(prog="python -m ldm.convert", description=__doc__)
    parser.add_argument("src", type=Path, help="diffusers folder (unet/, vae/) or SD .ckpt/.safetensors file")
    parser.add_argument("dst", type=Path, help="output .safetensors/.ckpt file, or a folder for diffusers layout")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights before saving")
    parser.add_argument("--unsafe-pickle", action="store_true", help="allow full unpickling of trusted .ckpt files")
    args = parser.parse_args(argv)
    unet, vae, text = load_source(args.src, args.unsafe_pickle)
    if args.dtype:
        unet, vae = unet.to(DTYPES[args.dtype]), vae.to(DTYPES[args.dtype])
    if args.dst.suffix in (".safetensors", ".ckpt", ".pt", ".pth"):
        save_state_dict(to_sd_state_dict(unet, vae, text), args.dst)
    else:
        to_diffusers(unet).save_pretrained(args.dst / "unet")
        to_diffusers(vae).save_pretrained(args.dst / "vae")
        if text:
            print("note: the text encoder is not written to the diffusers folder", file=sys.stderr)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
