#!/usr/bin/env python3
"""The LoRA training check on the lent GPU machine: SD-1.5's UNet with seeded random weights
(drawn as scripts/gpu-check-models.py draws them, rounded to fp16), rank 4 alpha 16 peft
adapters on every attention's to_q, to_k, to_v, to_out.0 (A = 0.1·N, B = 0.02·N, rounded to
fp16), one 512x512 example at batch 1 (latents and text embeddings given). Side by side in
one run:

- PyTorch: diffusers + peft the way diffusers' train_text_to_image_lora.py trains (frozen
  UNet in fp16, adapters in fp32, fp16 autocast, GradScaler, AdamW): step time (CUDA events,
  median) and peak allocated memory; the fp32 gradients (TF32 off) as the reference and the
  fp16 ones' error against them.
- atelier: `atelier bench --model DIR --train` on the same weights and inputs: step time,
  memory (tensors, and the whole process by nvidia-smi), gradients' error against the fp32
  reference. Bounds as tests/unet_train.rs: each tensor within 4x PyTorch fp16's error on
  it, all gradients concatenated within 1.5x.

Run by scripts/gpu-check.sh (part `train`), or alone on that machine:
    python3 scripts/gpu-check-train.py --atelier .device/bin/atelier --work /tmp/sd15-train
"""
import argparse
import importlib.util
import json
import os
import subprocess
import threading
import time

import torch

SEED = 1234
SIZE = 512
RANK, ALPHA = 4, 16
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def models_script():
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("gpu_check_models", os.path.join(here, "gpu-check-models.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def build_unet(gm, work):
    from diffusers import UNet2DConditionModel
    gen = torch.Generator().manual_seed(SEED)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280))
    gm.reinit_(unet, gen)
    os.makedirs(work, exist_ok=True)
    unet.half().save_pretrained(os.path.join(work, "unet"), safe_serialization=True)
    with open(os.path.join(work, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}, f)
    return unet.float()


def attach(unet, values=None):
    """peft adapters; A = 0.1·N, B = 0.02·N rounded to fp16 (or the given values).

    B's scale decides whether the check can tell right gradients from wrong ones. With
    B = 0.1·N (and alpha/r = 4) the adapters outweigh the frozen projections, attention
    softmaxes saturate and the network turns chaotic: rounding every activation to fp16 moves
    the LoRA gradients by 160% (measured on the CPU at 128x128, gradient norm 2e3), so fp16
    PyTorch itself was 1.40 off its fp32 reference and no bound meant anything. At 0.02·N the
    same rounding moves them 2.6e-3 at 512x512 (1.6e-3 at 128x128): a trained LoRA's regime."""
    from peft import LoraConfig
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS))
    gen = torch.Generator().manual_seed(SEED + 7)
    out = {}
    for name, m in unet.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            if values is None:
                va = (0.1 * torch.randn(a.shape, generator=gen)).half().float()
                vb = (0.02 * torch.randn(b.shape, generator=gen)).half().float()
            else:
                va, vb = values[f"lora.{name}.lora_A"], values[f"lora.{name}.lora_B"]
            a.data, b.data = va.to(a.device, a.dtype).clone(), vb.to(b.device, b.dtype).clone()
            out[f"lora.{name}.lora_A"], out[f"lora.{name}.lora_B"] = va, vb
    return out


def lora_params(unet):
    return [(n, p) for n, p in unet.named_parameters() if "lora_" in n]


def grad_name(n):
    # base name: down_blocks.0....to_q.lora_A.default.weight -> grad.down_blocks.0....to_q.lora_A
    return "grad." + n.replace(".default.weight", "")


def example():
    g = torch.Generator().manual_seed(SEED + 3)
    lat = SIZE // 8
    x0 = torch.randn(1, 4, lat, lat, generator=g)
    noise = torch.randn(1, 4, lat, lat, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    t = 317
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    abar = torch.cumprod(1 - betas, 0)[t]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    return {"train.sample": x_t, "train.target": noise, "train.timestep": torch.tensor([float(t)]),
            "train.encoder_hidden_states": ctx}


def grads_fp32(unet, ex):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    unet = unet.cuda().float()
    for _, p in lora_params(unet):
        p.grad = None
    pred = unet(ex["train.sample"].cuda(), ex["train.timestep"].cuda(), encoder_hidden_states=ex["train.encoder_hidden_states"].cuda()).sample
    loss = torch.nn.functional.mse_loss(pred.float(), ex["train.target"].cuda())
    loss.backward()
    return loss.item(), {grad_name(n): p.grad.detach().double().cpu() for n, p in lora_params(unet)}


def torch_step_setup(unet):
    """diffusers' LoRA script: frozen base in fp16, adapters fp32, autocast fp16, GradScaler."""
    unet = unet.cuda()
    for n, p in unet.named_parameters():
        p.data = p.data.float() if "lora_" in n else p.data.half()
    params = [p for _, p in lora_params(unet)]
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    return unet, params, opt, scaler


def torch_step(unet, params, opt, scaler, ex):
    with torch.autocast("cuda", dtype=torch.float16):
        pred = unet(ex["train.sample"], ex["train.timestep"], encoder_hidden_states=ex["train.encoder_hidden_states"]).sample
    loss = torch.nn.functional.mse_loss(pred.float(), ex["train.target"].float())
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss


def write_png(path, rgb, w, h):
    """A plain RGB8 PNG (no PIL on the GPU machine)."""
    import struct
    import zlib
    raw = b"".join(b"\x00" + bytes(rgb[y * w * 3:(y + 1) * w * 3]) for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))


def loop_check(gm, a, runs=(40, 200), images=16):
    """End to end: `atelier train` on a folder of 512x512 pictures (caching included) against
    the diffusers train_text_to_image_lora.py loop (VAE encode and CLIP each step, then the
    training step) on the same model: steps per second, for a short run (start-up and the
    caching epoch weigh most) and a longer one."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    work = a.work + "-full"
    if not os.path.exists(os.path.join(work, "vae")):
        gm.build(work)
    ds = os.path.join(work, "data")
    os.makedirs(ds, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    for i in range(images):
        img = (torch.rand(SIZE, SIZE, 3, generator=g) * 64 + torch.linspace(0, 191, SIZE).view(1, SIZE, 1)).clamp(0, 255).byte()
        write_png(os.path.join(ds, f"img{i:02d}.png"), img.flatten().tolist(), SIZE, SIZE)
        with open(os.path.join(ds, f"img{i:02d}.txt"), "w") as f:
            f.write(f"a painting number {i}, oil on canvas")
    results = []
    for steps in runs:
        out = os.path.join(work, "run")
        subprocess.run(["rm", "-rf", out])
        t0 = time.time()
        r = subprocess.run([a.atelier, "train", "--model", work, "--data", ds, "--output", out, "--steps", str(steps),
                            "--rank", "4", "--alpha", "16"], capture_output=True, text=True)
        wall = time.time() - t0
        print(r.stderr[-1500:])
        rows = [l.split(",") for l in open(os.path.join(out, "log.csv")).read().splitlines()[1:]] if r.returncode == 0 else []
        at_sps = len(rows) / float(rows[-1][6]) if rows else float("nan")
        results.append((steps, len(rows), at_sps, wall))
        if len(rows) > images + 2:
            # Where the time goes: the first step builds the plans, the first epoch encodes
            # each image once (caching), later steps run the UNet step alone.
            # (log.csv's times are in ms; builds before session 8 wrote 10 ms steps, too
            # coarse for a median of differences, so the mean over the later steps.)
            secs = [float(r[6]) for r in rows]
            later = (secs[-1] - secs[images]) / (len(secs) - images - 1)
            print(f"atelier train timeline ({steps} steps): step 1 done at {secs[0]:.2f} s, first epoch ({images} steps, "
                  f"caching) at {secs[images - 1]:.2f} s, later steps {1000 * later:.1f} ms on average "
                  f"({1 / later:.2f} steps/s)")

    te = CLIPTextModel.from_pretrained(os.path.join(work, "text_encoder"), torch_dtype=torch.float16).cuda()
    vae = AutoencoderKL.from_pretrained(os.path.join(work, "vae"), torch_dtype=torch.float16).cuda()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(work, "unet"), torch_dtype=torch.float16)
    attach(unet)
    unet, params, opt, scaler = torch_step_setup(unet)
    px = (torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1).cuda().half()
    ids = torch.randint(0, 49406, (1, 77), generator=g).cuda()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0).cuda()

    def step():
        with torch.no_grad():
            lat = vae.encode(px).latent_dist.sample() * 0.18215
            ctx = te(ids)[0]
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (1,), device="cuda")
        x_t = abar[t].sqrt().view(-1, 1, 1, 1) * lat + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * noise
        torch_step(unet, params, opt, scaler, {"train.sample": x_t, "train.timestep": t, "train.encoder_hidden_states": ctx,
                                               "train.target": noise})

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t1 = time.time()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    torch_sps = 20 / (time.time() - t1)
    for steps, done, at_sps, wall in results:
        print(f"\nend to end, 512x512 rank 4 batch 1, {steps} steps: atelier train {at_sps:.2f} steps/s over {done} steps "
              f"(caching of {images} images included; {wall:.1f} s wall with loading), diffusers-style loop "
              f"{torch_sps:.2f} steps/s (VAE + CLIP + step each time): {at_sps / torch_sps:.2f}x (target 2x)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--atelier", default=".device/bin/atelier")
    ap.add_argument("--work", default="/tmp/sd15-train")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--loop", action="store_true", help="also time `atelier train` end to end against a diffusers-style loop")
    ap.add_argument("--ours-only", action="store_true", help="only atelier's step (time and profile), no PyTorch reference")
    a = ap.parse_args()
    gm = models_script()
    gm.install_diffusers()
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    t0 = time.time()
    unet = build_unet(gm, a.work)
    values = attach(unet)
    ex = example()
    print(f"model built and saved in {time.time() - t0:.1f} s")
    in_path, out_path = os.path.join(a.work, "train-inputs.safetensors"), os.path.join(a.work, "train-out.safetensors")
    cmd = [a.atelier, "bench", "--model", a.work, "--train", "--batch", "1", "--width", str(SIZE), "--height", str(SIZE),
           "--repeat", str(a.repeat), "--inputs", in_path, "--output", out_path] + (["--profile"] if a.profile else [])
    env = {**os.environ, "ATELIER_PROFILE_SHAPES": "1"} if a.profile else None
    if a.ours_only:
        save_file({k: v.float().contiguous() for k, v in {**ex, **values}.items()}, in_path)
        print(subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env).stdout)
        if a.loop:
            loop_check(gm, a)
        return

    # Reference gradients (fp32, TF32 off), then PyTorch's own fp16 step: its gradients (first
    # step, unscaled) and its timing and peak memory.
    ref_loss, ref = grads_fp32(unet, ex)
    del unet
    torch.cuda.empty_cache()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(a.work, "unet"), torch_dtype=torch.float16)
    attach(unet, values)
    unet, params, opt, scaler = torch_step_setup(unet)
    exc = {k: v.cuda() for k, v in ex.items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    # Scaled as atelier scales it (from 2^14, the number of predicted values, halved while a
    # gradient overflows fp16, as GradScaler backs off), then unscaled.
    scale = 2.0 ** 14
    while True:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            pred = unet(exc["train.sample"], exc["train.timestep"], encoder_hidden_states=exc["train.encoder_hidden_states"]).sample
        loss16 = torch.nn.functional.mse_loss(pred.float(), exc["train.target"])
        (loss16 * scale).backward()
        g16 = {grad_name(n): p.grad.detach().double().cpu() / scale for n, p in lora_params(unet)}
        if all(torch.isfinite(v).all() for v in g16.values()) or scale <= 1:
            break
        scale /= 2
    print(f"PyTorch fp16 gradients at loss scale {scale:g}")
    opt.zero_grad(set_to_none=True)
    for _ in range(3):
        torch_step(unet, params, opt, scaler, exc)
    ts = []
    for _ in range(a.repeat):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch_step(unet, params, opt, scaler, exc)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    torch_ms = sorted(ts)[len(ts) // 2]
    torch_peak = torch.cuda.max_memory_allocated() / 2**30
    del unet, params, opt, scaler, exc
    torch.cuda.empty_cache()

    # atelier on the same weights and inputs.
    save_file({k: v.float().contiguous() for k, v in {**ex, **values}.items()}, in_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    stop, peak = threading.Event(), [0]
    th = threading.Thread(target=gm.poll_memory, args=(proc.pid, stop, peak))
    th.start()
    text = proc.communicate()[0]
    stop.set()
    th.join()
    print(text)
    if proc.returncode != 0:
        raise SystemExit("atelier failed")
    # Again with the transformers recomputed at the backward (less memory).
    rc = subprocess.run(cmd[:cmd.index("--inputs")] + ["--recompute"], capture_output=True, text=True)
    print(rc.stdout[-1500:])
    rc_ms = float(rc.stdout.split("training step")[1].split("median ")[1].split(" ms")[0]) if rc.returncode == 0 else float("nan")
    rc_held = float(rc.stdout.split("= ")[-1].split(" GiB")[0]) if rc.returncode == 0 else float("nan")
    ours = load_file(out_path)
    at_ms = float(text.split("training step")[1].split("median ")[1].split(" ms")[0])
    held = float(text.split("= ")[-1].split(" GiB")[0]) if "GiB" in text else float("nan")

    worst, ratios, fails, rows = (0.0, ""), [], [], []
    cat_ref, cat_ours, cat_16 = [], [], []
    for name, t in [("reference", ref), ("PyTorch fp16", g16), ("atelier", {k: ours[k] for k in ref})]:
        bad = [k for k, v in t.items() if not torch.isfinite(v).all()]
        if bad:
            print(f"{name}: {len(bad)} gradient tensors hold inf or NaN, e.g. {bad[:3]}")
    for k, r in ref.items():
        o = ours[k].double()
        e_ours, e16 = gm.rel(o, r), gm.rel(g16[k], r)
        rows.append((e_ours / e16, k, r.norm().item(), g16[k].norm().item(), o.norm().item(), e16, e_ours))
        ratios.append(e_ours / e16)
        if e_ours > 4 * e16:
            fails.append(f"{k}: {e_ours:.3e} > 4 x {e16:.3e}")
        if e_ours / e16 > worst[0]:
            worst = (e_ours / e16, k)
        cat_ref.append(r.flatten()), cat_ours.append(o.flatten()), cat_16.append(g16[k].flatten())
    cat_ref, cat_ours, cat_16 = torch.cat(cat_ref), torch.cat(cat_ours), torch.cat(cat_16)
    e_all, e16_all = gm.rel(cat_ours, cat_ref), gm.rel(cat_16, cat_ref)
    ratios.sort()
    rows.sort(reverse=True)
    print(f"\n{'worst tensors':<72} {'|ref|':>9} {'|fp16|':>9} {'|ours|':>9} {'fp16 err':>9} {'our err':>9}")
    for rr in rows[:8]:
        print(f"{rr[1]:<72} {rr[2]:>9.2e} {rr[3]:>9.2e} {rr[4]:>9.2e} {rr[5]:>9.2e} {rr[6]:>9.2e}")
    loss_ours = ours["train.loss"].item()
    print(f"\nloss: fp32 {ref_loss:.6f}, PyTorch fp16 {loss16.item():.6f}, atelier {loss_ours:.6f}")
    print(f"gradients ({len(ref)} tensors): atelier / PyTorch-fp16 error ratio per tensor median {ratios[len(ratios) // 2]:.2f}, "
          f"max {ratios[-1]:.2f} ({worst[1]})")
    print(f"all gradients concatenated: atelier {e_all:.3e}, PyTorch fp16 {e16_all:.3e} (bound {1.5 * e16_all:.3e})")
    ok = not fails and e_all <= 1.5 * e16_all
    for f in fails[:10]:
        print("  over bound:", f)
    print(f"\n{'':<26} {'PyTorch':>10} {'atelier':>10}")
    print(f"{'step ms (512x512, b1)':<26} {torch_ms:>10.1f} {at_ms:>10.1f}   speed-up {torch_ms / at_ms:.2f}x (target 2x)")
    print(f"{'peak GPU memory GiB':<26} {torch_peak:>10.2f} {held:>10.2f}   (atelier: tensors; whole process {peak[0] / 1024:.2f} GiB by nvidia-smi)")
    print(f"{'with recompute: step ms':<26} {'':>10} {rc_ms:>10.1f}   memory {rc_held:.2f} GiB (tensors; target < 3 GiB)")
    print(f"{'gradients within bound':<26} {'':>10} {'yes' if ok else 'NO':>10}")
    if a.loop:
        loop_check(gm, a)


if __name__ == "__main__":
    main()
