#!/usr/bin/env bash
# The GPU-only checks, for a machine with one CUDA GPU: the CUDA tests (tests/gpu), bench/unet.py in bf16 on each
# attention back end, and the quickstart trained on the GPU in bf16 and judged. Prints the figures docs/gpu.md records.
#
#   bash bench/gpu_checks.sh tests bench sampling mfu kernels cache quickstart quickstart_fp32    # any subset, in that order
#   bash bench/gpu_checks.sh perf    # the performance figures alone, in at most 9 minutes (each command bounded)
#   GPU_CHECKS_DRY_RUN=1 bash bench/gpu_checks.sh tests perf    # anywhere: check the commands start, run none
#
# Wheels the GPU machine lacks (hydra-core, omegaconf, antlr4, open_clip_torch, ftfy, webdataset, braceexpand,
# diffusers, xformers...) may sit in .whl/; they are installed first, without dependencies and without a network.
set -uo pipefail
OUT=${OUT:-outputs/gpu_checks}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_checks.log") 2>&1  # everything printed is kept in $OUT too, even if the run is cut short
export PYTHONUNBUFFERED=1 WANDB_MODE=offline PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DRY_RUN=${GPU_CHECKS_DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
    # On any machine: the commands below are written to $OUT/dry_run_commands.txt instead of run, and at the end
    # bench/parse_only.py checks that each script imports and its arguments parse (train.py's overrides compose and
    # pass its checks). The CUDA tests are only collected.
    : >"$OUT/dry_run_commands.txt"
    timeout() { shift; "$@"; }
    nvidia-smi() { echo "dry run: nvidia-smi not called"; }
    python3() {
        case "${1:-}" in
        *.py | -m)
            if [ "$1 ${2:-}" = "-m pytest" ]; then command python3 "$@" --collect-only; return; fi
            printf '%q ' python3 "$@" >>"$OUT/dry_run_commands.txt"
            echo >>"$OUT/dry_run_commands.txt"
            ;;
        *) command python3 "$@" ;;
        esac
    }
fi
if compgen -G ".whl/*.whl" >/dev/null; then  # a wheel that does not install is reported; the rest still runs
    timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl \
        || echo "warning: installing .whl/ failed; the checks that need those packages will say so"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 -c "import xformers; print('xformers', xformers.__version__)" 2>/dev/null || echo "xformers: not installed"
DIFFUSERS=1  # bench/unet.py and bench/pipeline.py compare against diffusers; bench/mfu.py needs only torch
python3 -c "import diffusers" 2>/dev/null || { DIFFUSERS=0; echo "diffusers: not importable; its comparisons are skipped"; }
filter() { grep --line-buffered "$@"; }  # a line per line, so a command cut short by its timeout keeps its output

for what in "$@"; do
    case $what in
    tests)  # one process (no pytest-xdist workers sharing the GPU; the wheels in .whl/ may not include it)
        python3 -m pytest -q -p no:cacheprovider -o addopts= -m cuda tests/gpu 2>&1 \
            | tee "$OUT/pytest_gpu.log" | tail -40
        ;;
    bench)
        [ "$DIFFUSERS" = 1 ] || continue
        for cfg in sd15 small; do
            for backend in sdpa xformers math; do
                echo "== bench/unet.py --config $cfg --dtype bf16 --backend $backend"
                opt=adamw  # sd15 with math attention under AdamW: about 72 GiB, beyond an H100's 80 with overheads
                [ "$cfg/$backend" = sd15/math ] && opt=sgd
                timeout 180 python3 bench/unet.py --config "$cfg" --device cuda --dtype bf16 --backend "$backend" \
                    --batch 8 --repeats 10 --optimizer "$opt" 2>&1 | filter -v Warning
            done
        done
        echo "== bench/unet.py --config sd15 --dtype bf16 --backend sdpa --batch 32"   # math's logits would not fit
        timeout 180 python3 bench/unet.py --config sd15 --device cuda --dtype bf16 --backend sdpa --batch 32 --repeats 10 \
            2>&1 | filter -v Warning
        echo "== bench/unet.py --config sd15 --dtype fp32 --backend sdpa"
        timeout 180 python3 bench/unet.py --config sd15 --device cuda --dtype fp32 --backend sdpa --batch 8 --repeats 10
        ;;
    perf)
        # docs/performance.md's GPU rows in one run of at most 9 minutes: the timeouts add up to 480 s, and the set-up
        # above to at most 60 s more. Ours against diffusers in bf16 at batch 8 and at batches >= 32 (sdpa), sd15's MFU
        # and largest batch at 256 and 512 px (with checkpointing too), and eager sampling
        for spec in "sd15 8" "sd15 32" "small 32" "tiny 64"; do
            [ "$DIFFUSERS" = 1 ] || break
            read -r cfg batch <<<"$spec"
            echo "== bench/unet.py --config $cfg --dtype bf16 --batch $batch"
            timeout 45 python3 bench/unet.py --config "$cfg" --device cuda --dtype bf16 --backend sdpa \
                --batch "$batch" --repeats 3 2>&1 | filter -v Warning
        done
        for spec in "60 --latent 32" "70 --latent 64" "110 --latent 64 --checkpointing"; do
            read -r limit args <<<"$spec"
            echo "== bench/mfu.py --config sd15 --max-batch $args"
            timeout "$limit" python3 bench/mfu.py --config sd15 --max-batch --steps 5 $args 2>&1 | filter -v Warning
        done
        if [ "$DIFFUSERS" = 1 ]; then
            echo "== bench/pipeline.py --config sd15 --dtype bf16"
            timeout 60 python3 bench/pipeline.py --config sd15 --device cuda --dtype bf16 --batch 8 --steps 25 \
                --repeats 2 2>&1 | filter -E "config=|latent difference|images/s|Error"
        fi
        ;;
    sampling)
        # the pipeline against diffusers' on sd15 in bf16: eager (context reuse and shared input, the latter also
        # ablated), compiled, compiled with CUDA graphs
        for args in "--ablate-shared-input" "--compile ours" "--compile ours --compile-mode reduce-overhead" "--compile both"; do
            [ "$DIFFUSERS" = 1 ] || break
            echo "== bench/pipeline.py --config sd15 --dtype bf16 $args"
            timeout 300 python3 bench/pipeline.py --config sd15 --device cuda --dtype bf16 --batch 8 --steps 25 \
                --repeats 5 $args 2>&1 | filter -E "config=|latent difference|images/s|Error"
        done
        ;;
    mfu)
        # sd15's training step in bf16: MFU at 256 and 512 px at the largest batch that fits, and that batch at 512 px
        # with gradient checkpointing
        for args in "--latent 32" "--latent 64" "--latent 64 --checkpointing"; do
            echo "== bench/mfu.py --config sd15 --max-batch $args"
            timeout 240 python3 bench/mfu.py --config sd15 --max-batch $args 2>&1 | filter -v Warning
        done
        ;;
    kernels)
        # where sd15's bf16 training step goes, by kernel family, each family's TFLOP/s against a large bf16 matmul
        for batch in 8 32; do
            echo "== bench/kernel_families.py --config sd15 --batch $batch --dtype bf16"
            timeout 120 python3 bench/kernel_families.py --config sd15 --batch "$batch" --device cuda --dtype bf16 --steps 3 \
                --top 10 2>&1 | filter -v Warning
        done
        ;;
    cache)
        # the latent cache's encoder (SD's KL-f8 VAE at 512 px): float32, bf16 autocast, compiled
        echo "== bench/vae_encode.py --config kl_f8 --size 512 --batch 16"
        timeout 300 python3 bench/vae_encode.py --config kl_f8 --size 512 --batch 16 --repeats 5 --device cuda 2>&1 \
            | filter -v Warning
        ;;
    quickstart | quickstart_fp32)
        precision=bf16-mixed
        [ "$what" = quickstart_fp32 ] && precision=32-true
        run=$OUT/$what
        start=$(date +%s)
        timeout 300 python3 train.py trainer=gpu trainer.precision=$precision logger=csv "hydra.run.dir=$run" 2>&1 \
            | filter -E "stage|Error|error" | tail -20
        echo "quickstart on the GPU ($precision): $(($(date +%s) - start)) s wall (with data generation and start-up)"
        python3 - "$run" <<'EOF'
import csv, sys, pathlib, statistics
for f in sorted(pathlib.Path(sys.argv[1]).rglob("metrics.csv")):
    rows = list(csv.DictReader(open(f)))
    ips = [float(r["perf/images_per_s"]) for r in rows if r.get("perf/images_per_s")]
    loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    if ips:
        print(f"{f.parent}: median images/s {statistics.median(ips):.0f}, last loss {loss[-1] if loss else None}")
EOF
        ckpt=$run/ldm/checkpoints/last.ckpt
        # the judge samples on the CPU (16 cores there): n=500 at guidance 1, 3 and 5
        timeout 240 python3 -m ldm.eval.shapes "$ckpt" --n 500 --guidance 1 3 5 --json "$OUT/judge_$what.json" 2>&1 | tail -5
        ;;
    *)
        echo "unknown check: $what (tests bench perf sampling mfu kernels cache quickstart quickstart_fp32)"
        [ "$DRY_RUN" = 1 ] && exit 2
        ;;
    esac
done
if [ "$DRY_RUN" = 1 ]; then
    command python3 bench/parse_only.py "$OUT/dry_run_commands.txt"
fi
