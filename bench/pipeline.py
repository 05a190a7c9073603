"""Sampling throughput: LatentDiffusionPipeline against diffusers' StableDiffusionPipeline on the same weights.

The diffusers pipeline is built from the converted UNet and VAE (``to_diffusers``), the same scheduler settings
(``schedule_to_diffusers``), steps, guidance scale and initial noise, and takes the same text embeddings
(``prompt_embeds``). The two are alternated in one process; the script checks that their latents agree, then prints
median images/s and the ratio ours/diffusers (>= 1.0: we are no slower).

    python bench/pipeline.py --config tiny --batch 8 --steps 25 --repeats 5 --threads 2
    python bench/pipeline.py --config sd15 --device cuda --dtype bf16 --compile ours --compile-mode reduce-overhead
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from alternate import alternated_times  # noqa: E402
from unet import CONFIGS  # noqa: E402  (the UNet configs bench/unet.py compares)

from ldm.autoencoder import AutoencoderKL  # noqa: E402
from ldm.convert import schedule_to_diffusers, to_diffusers  # noqa: E402
from ldm.diffusion.schedules import SD_SCHEDULE  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm.unet import UNet  # noqa: E402

#: first stages per UNet config: (channel multipliers, base channels); 2 ** (len - 1) is the downsampling factor
VAES = {"tiny": ((1, 2, 2), 32, 1), "small": ((1, 2, 2, 4), 64, 1), "sd15": ((1, 2, 4, 4), 128, 2)}  # + res blocks
CONTEXT_TOKENS = 77


class FixedText(torch.nn.Module):
    """A text encoder with one fixed embedding per prompt, so diffusers can take the same ones as prompt_embeds."""

    def __init__(self, dim: int, prompts: list[str], device: torch.device) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.table = {p: torch.randn(CONTEXT_TOKENS, dim, generator=g).to(device) for p in ["", *prompts]}

    def encode(self, prompts: list[str]) -> SimpleNamespace:
        return SimpleNamespace(hidden=torch.stack([self.table[p] for p in prompts]))


class UnsharedInputPipeline(LatentDiffusionPipeline):
    """Ours with the latents repeated for [uncond; cond] in a guided step, as diffusers does: the shared input
    ablated."""

    @property
    def share_guided_input(self) -> bool:
        return False


def main() -> None:
    """Build both pipelines on the same weights, check they agree, time them alternately, print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--sampler", choices=["ddim", "dpm_solver++"], default="dpm_solver++")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: ours with dtype='bf16' (text encoder and UNet under bf16 autocast, the VAE "
                             "decoding in fp32), diffusers' under a bf16 autocast around the whole call (its VAE "
                             "decodes under it; on a CPU without bf16 units that decode dominates its time). Our "
                             "pipeline computes in the precision its dtype names, whatever autocast encloses it")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile's mode, e.g. reduce-overhead (CUDA graphs on a GPU)")
    parser.add_argument("--compile", choices=["none", "ours", "both"], default="none",
                        help="torch.compile the UNet of our pipeline (compile_unet: no context reuse), or of both "
                             "(timed after warm-up)")
    parser.add_argument("--no-context-reuse", action="store_true",
                        help="recompute cross-attention keys and values at every step, as diffusers does")
    parser.add_argument("--no-shared-input", action="store_true",
                        help="give the UNet the latents twice in a guided step, as diffusers does, instead of once "
                             "with both contexts (contexts_per_input=2)")
    parser.add_argument("--ablate-shared-input", action="store_true",
                        help="also time ours without the shared input, alternated with the two others, and print "
                             "ours against it")
    args = parser.parse_args()
    if args.no_context_reuse:
        import contextlib

        import ldm.pipeline

        ldm.pipeline.reuse_context_projections = lambda model: contextlib.nullcontext()
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    cfg = dict(CONFIGS[args.config])
    latent = cfg.pop("latent")
    torch.manual_seed(0)
    unet = UNet(**cfg).eval()
    mult, ch, res_blocks = VAES[args.config]
    vae = AutoencoderKL(ch=ch, ch_mult=mult, num_res_blocks=res_blocks).eval()  # sd15: SD's kl_f8 (2 res blocks)
    with torch.no_grad():  # non-zero everywhere, so every op does real work
        for p in [*unet.parameters(), *vae.parameters()]:
            p.normal_(0, 0.02)
    size = latent * 2 ** (len(mult) - 1)
    prompts = [f"prompt {i}" for i in range(args.batch)]
    device = torch.device(args.device)
    text = FixedText(cfg["context_dim"], prompts, device)
    pipeline = UnsharedInputPipeline if args.no_shared_input else LatentDiffusionPipeline
    ours = pipeline(unet, text, vae, SD_SCHEDULE, "epsilon", {"image_size": size}).to(device)
    kw = schedule_to_diffusers(SD_SCHEDULE, "epsilon")
    scheduler = (diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing", **kw)
                 if args.sampler == "ddim" else diffusers.DPMSolverMultistepScheduler(**kw))
    theirs = diffusers.StableDiffusionPipeline(
        vae=to_diffusers(vae).eval(), text_encoder=None, tokenizer=None,
        unet=to_diffusers(unet, sample_size=latent).eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    theirs.to(device)
    if args.compile != "none":  # the product's path: compiled in place, without the context reuse
        ours.compile_unet(mode=args.compile_mode)
    if args.compile == "both":
        theirs.unet = torch.compile(theirs.unet, mode=args.compile_mode)
    noise = torch.randn(args.batch, 4, latent, latent, generator=torch.Generator().manual_seed(11)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=size, width=size)

    def finished(out: torch.Tensor) -> torch.Tensor:  # a GPU's queued work done, so the timings are honest
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    @torch.inference_mode()
    def run_ldm(pipe: LatentDiffusionPipeline, output_type: str = "tensor") -> torch.Tensor:
        return finished(pipe(prompts, latents=noise, sampler=args.sampler, output_type=output_type,
                             dtype="bf16" if args.dtype == "bf16" else None, **common))

    def run_ours(output_type: str = "tensor") -> torch.Tensor:
        return run_ldm(ours, output_type)

    @torch.inference_mode()
    def run_theirs(output_type: str = "pt") -> torch.Tensor:
        with autocast:
            return finished(theirs(prompt_embeds=text.encode(prompts).hidden,
                                   negative_prompt_embeds=text.encode([""] * args.batch).hidden, latents=noise,
                                   output_type=output_type, **common).images)

    start = time.perf_counter()
    diff = (run_ours("latent").float() - run_theirs("latent").float()).abs().max().item()
    if diff > (1e-3 if args.dtype == "fp32" else 5e-2):  # e.g. ddim where 1000 % steps != 0 (diffusers' t - 1000 // n)
        raise SystemExit(f"ours and diffusers' latents disagree (max |difference| {diff:.2e}): the two arms do not "
                         "run the same sampler here; not a comparison")
    run_ours(), run_theirs()  # warm-up (and compilation) of the decoding path too
    warmup = time.perf_counter() - start
    runs = {"ours": run_ours, "diffusers": run_theirs}
    if args.ablate_shared_input:
        unshared = UnsharedInputPipeline(unet, text, vae, SD_SCHEDULE, "epsilon", {"image_size": size})
        shared_diff = (run_ours("latent").float() - run_ldm(unshared, "latent").float()).abs().max().item()
        run_ldm(unshared)
        runs["unshared"] = lambda: run_ldm(unshared)
    times = alternated_times(runs, args.repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    ratios = [d / o for d, o in zip(times["diffusers"], times["ours"], strict=True)]
    print(f"config={args.config} batch={args.batch} size={size}px latent={latent} sampler={args.sampler} "
          f"steps={args.steps} guidance={args.guidance} repeats={args.repeats} threads={torch.get_num_threads()} "
          f"device={device} dtype={args.dtype} context_reuse={not args.no_context_reuse and args.compile == 'none'} "
          f"compile={args.compile} mode={args.compile_mode}")
    print(f"max |latent difference| ours vs diffusers: {diff:.2e}; warm-up {warmup:.1f} s; shared input "
          f"{ours.share_guided_input}")
    print(f"images/s  ours {args.batch / med['ours']:8.3g}   diffusers {args.batch / med['diffusers']:8.3g}   "
          f"ratio ours/diffusers {med['diffusers'] / med['ours']:.3f} "
          f"(per repeat {min(ratios):.2f}..{max(ratios):.2f})")
    if args.ablate_shared_input:
        gains = [u / o for u, o in zip(times["unshared"], times["ours"], strict=True)]
        print(f"images/s  without the shared input {args.batch / med['unshared']:8.3g}   ratio ours/without "
              f"{med['unshared'] / med['ours']:.3f} (per repeat {min(gains):.2f}..{max(gains):.2f}); max |latent "
              f"difference| {shared_diff:.2e}")


if __name__ == "__main__":
    main()
