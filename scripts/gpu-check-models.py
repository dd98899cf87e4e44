#!/usr/bin/env python3
"""The full-size model check on the lent GPU machine: SD-1.5's text encoder, UNet and VAE with
seeded random weights (the configuration of runwayml/stable-diffusion-v1-5, weights drawn as
tests/fixtures/make_fixtures.py draws them and rounded to fp16), run by diffusers +
transformers in PyTorch and by atelier on the same inputs. Prints, per network: PyTorch fp16
time (eager, CUDA events, median), atelier's time (`atelier bench --model`), the relative L2
error of each against PyTorch's fp32 run (TF32 off) — the issue's bound is twice PyTorch's fp16
error — and the peak GPU memory of a 512x512 UNet (batch 2) + VAE decode run in both.

Run by scripts/gpu-check.sh (which installs the Vulkan loader), or alone on that machine:
    python3 scripts/gpu-check-models.py --atelier .device/bin/atelier --work /tmp/sd15
It needs diffusers (its wheel travels in .device/wheels, made by device-pack --wheels).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

import torch

SEED = 1234
UNET_BATCH = 2
VAE_BATCH = 1
SIZE = 512
DEV = "cuda"


def install_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError:
        wheels = [os.path.join(".device/wheels", f) for f in os.listdir(".device/wheels") if f.endswith(".whl")]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *wheels], check=True)


def reinit_(model, gen):
    """Every Linear/Conv weight N(0, 1/fan_in), biases 0.1·N(0,1), norms 1 + 0.1·N / 0.1·N,
    embeddings N(0,1) (positions 0.5·N), then rounded to fp16 so both runs use equal weights."""
    for _, m in model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=gen) / math.sqrt(fan_in)
            if m.bias is not None:
                m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=gen)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            m.weight.data = 1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=gen)
        elif isinstance(m, torch.nn.Embedding):
            scale = 0.5 if m.weight.shape[0] == 77 else 1.0
            m.weight.data = scale * torch.randn(m.weight.shape, generator=gen)
        else:
            raise SystemExit(f"reinit: no rule for {type(m).__name__}")
    for p in model.parameters():
        p.data = p.data.half().float()


def build(work):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    gen = torch.Generator().manual_seed(SEED)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      projection_dim=768))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    for m in (te, unet, vae):
        reinit_(m, gen)
        m.eval()
    os.makedirs(work, exist_ok=True)
    te.half().save_pretrained(os.path.join(work, "text_encoder"), safe_serialization=True)
    unet.half().save_pretrained(os.path.join(work, "unet"), safe_serialization=True)
    vae.half().save_pretrained(os.path.join(work, "vae"), safe_serialization=True)
    with open(os.path.join(work, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, f)
    return te, unet, vae


def inputs():
    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, 49406, (UNET_BATCH, 77), generator=g)
    ids[:, 0] = 49406
    for b, n in enumerate([12, 30][:UNET_BATCH]):
        ids[b, n:] = 49407
    lat = SIZE // 8
    return {
        "clip.input_ids": ids.to(torch.int32),
        "unet.sample": torch.randn(UNET_BATCH, 4, lat, lat, generator=g),
        "unet.timestep": torch.tensor([999.0, 500.0][:UNET_BATCH]),
        "unet.encoder_hidden_states": torch.randn(UNET_BATCH, 77, 768, generator=g),
        "vae.latent": torch.randn(VAE_BATCH, 4, lat, lat, generator=g),
        "vae.image": (torch.rand(VAE_BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1),
    }


def run_torch(te, unet, vae, x, dtype):
    dev = DEV
    te, unet, vae = (m.to(dev, dtype) for m in (te, unet, vae))
    c = lambda k: x[k].to(dev, dtype if x[k].is_floating_point() else x[k].dtype)
    with torch.inference_mode():
        fns = {
            "clip": lambda: te(x["clip.input_ids"].to(dev).long()).last_hidden_state,
            "unet": lambda: unet(c("unet.sample"), x["unet.timestep"].to(dev), encoder_hidden_states=c("unet.encoder_hidden_states")).sample,
            "vae decode": lambda: vae.decode(c("vae.latent")).sample,
            "vae encode": lambda: vae.encode(c("vae.image")).latent_dist.mean,
        }
        out = {k: f().float().cpu() for k, f in fns.items()}
    return out, fns


def time_torch(fns, repeat):
    times = {}
    if DEV != "cuda":
        return times
    with torch.inference_mode():
        for k, f in fns.items():
            for _ in range(3):
                f()
            ts = []
            for _ in range(repeat):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                f()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            times[k] = sorted(ts)[len(ts) // 2]
    return times


def torch_peak(unet, vae, x):
    """Peak allocated GPU memory of one UNet (batch 2) + VAE decode pass at 512x512, fp16."""
    if DEV != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        unet(x["unet.sample"].cuda().half(), x["unet.timestep"].cuda(), encoder_hidden_states=x["unet.encoder_hidden_states"].cuda().half())
        vae.decode(x["vae.latent"].cuda().half())
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def poll_memory(pid, stop, peak):
    while not stop.is_set():
        try:
            q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True).stdout
            for line in q.splitlines():
                p, m = [s.strip() for s in line.split(",")]
                if int(p) == pid:
                    peak[0] = max(peak[0], int(m))
        except Exception:
            pass
        time.sleep(0.05)


def main():
    global DEV, SIZE
    ap = argparse.ArgumentParser()
    ap.add_argument("--atelier", default=".device/bin/atelier")
    ap.add_argument("--work", default="/tmp/sd15-random")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cuda", help="torch device (cpu: a dry run of the script, no timings)")
    ap.add_argument("--size", type=int, default=SIZE, help="image side in pixels")
    a = ap.parse_args()
    DEV, SIZE = a.device, a.size
    install_diffusers()
    import diffusers
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    t0 = time.time()
    te, unet, vae = build(a.work)
    x = inputs()
    from safetensors.torch import save_file, load_file
    in_path, out_path = os.path.join(a.work, "inputs.safetensors"), os.path.join(a.work, "atelier-out.safetensors")
    save_file({k: v.contiguous() for k, v in x.items()}, in_path)
    print(f"models built and saved in {time.time() - t0:.0f} s (diffusers {diffusers.__version__}, torch {torch.__version__})")

    ref, _ = run_torch(te, unet, vae, x, torch.float32)
    half, fns = run_torch(te, unet, vae, x, torch.float16)
    torch_ms = time_torch(fns, a.repeat)
    torch_mem = torch_peak(unet, vae, x)
    del fns
    te, unet, vae = (m.cpu() for m in (te, unet, vae))
    torch.cuda.empty_cache()

    cmd = [a.atelier, "bench", "--model", a.work, "--batch", str(UNET_BATCH), "--vae-batch", str(VAE_BATCH),
           "--width", str(SIZE), "--height", str(SIZE), "--repeat", str(a.repeat), "--inputs", in_path, "--output", out_path]
    if a.profile:
        cmd.append("--profile")
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop, peak = threading.Event(), [0]
    th = threading.Thread(target=poll_memory, args=(proc.pid, stop, peak))
    th.start()
    log = proc.communicate()[0]
    stop.set()
    th.join()
    print(log)
    if proc.returncode != 0:
        raise SystemExit("atelier failed")
    ours = load_file(out_path)
    ours_ms = {}
    for line in log.splitlines():
        parts = line.split()
        for k in ("clip", "unet", "vae decode", "vae encode"):
            if line.startswith(k + " ") and len(parts) >= 5:
                try:
                    ours_ms[k] = float(parts[len(k.split()) + 1])
                except ValueError:
                    pass

    names = {"clip": "clip.last_hidden_state", "unet": "unet.out", "vae decode": "vae.decoded", "vae encode": "vae.mean"}
    print(f"\n{torch.cuda.get_device_name() if DEV == 'cuda' else DEV}, {SIZE}x{SIZE}: UNet and CLIP batch {UNET_BATCH}, VAE batch {VAE_BATCH}; errors are relative L2 vs PyTorch fp32 (TF32 off)")
    print(f"{'network':<11} {'torch fp16 ms':>13} {'atelier ms':>11} {'speed-up':>9} {'torch fp16 err':>15} {'atelier err':>12} {'bound (2x)':>11}  ok")
    for k, n in names.items():
        e_t, e_a = rel(half[k], ref[k]), rel(ours[n], ref[k])
        t_t, t_a = torch_ms.get(k, float("nan")), ours_ms.get(k, float("nan"))
        ok = "yes" if e_a <= 2 * e_t else "NO"
        print(f"{k:<11} {t_t:>13.2f} {t_a:>11.2f} {t_t / t_a:>8.2f}x {e_t:>15.3e} {e_a:>12.3e} {2 * e_t:>11.3e}  {ok}")
    print(f"peak GPU memory, UNet b{UNET_BATCH} + VAE decode: torch fp16 {torch_mem / 2**30:.2f} GiB allocated; "
          f"atelier process {peak[0] / 1024:.2f} GiB (nvidia-smi, whole process, all networks' plans held at once)")


if __name__ == "__main__":
    main()
