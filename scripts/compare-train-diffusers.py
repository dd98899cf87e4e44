#!/usr/bin/env python3
"""A LoRA trained by `atelier train`, evaluated by diffusers itself, against one trained by
diffusers + peft with the same settings (CPU; the tiny model of tests/fixtures/tiny-sd).

1. A dataset of six striped 64x64 pictures with one caption (as tests/cli_train.rs makes).
2. `atelier train` on it: --steps N, rank 4, alpha 8, lr 3e-3, constant schedule, AdamW
   (weight decay 1e-2, clipping at 1), batch 1, kohya output.
3. The same training in PyTorch: diffusers' UNet with peft adapters on to_q/to_k/to_v/to_out.0
   (r 4, alpha 8), latents = the VAE's sample x 0.18215, uniform timesteps, epsilon target,
   fp32 on the CPU.
4. Both evaluated by diffusers: atelier's file through StableDiffusionPipeline.load_lora_weights
   (its kohya converter), the peft-trained adapters as trained; denoising MSE on the training
   images over fixed timesteps and noise, against the base model.

    pip install torch diffusers==0.42.1 transformers peft safetensors pillow
    python3 scripts/compare-train-diffusers.py --atelier target/release/atelier [--steps 60]
"""
import argparse
import os
import subprocess
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "tests", "fixtures", "tiny-sd")
TOKENIZER = os.path.join(HERE, "..", "tests", "fixtures", "tokenizer")
CAPTION = "a picture of stripes"


def dataset(d):
    from PIL import Image
    rng = np.random.default_rng(11)
    for i in range(6):
        c = (rng.random(3) * 255).astype(np.uint8)
        img = np.full((64, 64, 3), 255, np.uint8)
        for x in range(64):
            if (x // 4) % 2 == 0:
                img[:, x] = c
        Image.fromarray(img).save(os.path.join(d, f"stripes{i}.png"))
        open(os.path.join(d, f"stripes{i}.txt"), "w").write(CAPTION)


def components():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    unet = UNet2DConditionModel.from_pretrained(os.path.join(MODEL, "unet"), torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(os.path.join(MODEL, "vae"), variant="fp16", torch_dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(os.path.join(MODEL, "text_encoder"), torch_dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return unet, vae, te, tok, sched


def images(d):
    from PIL import Image
    px = [np.asarray(Image.open(os.path.join(d, f"stripes{i}.png")).convert("RGB"), np.float32) / 127.5 - 1 for i in range(6)]
    return torch.tensor(np.stack(px)).permute(0, 3, 1, 2)


@torch.no_grad()
def context(te, tok):
    ids = tok(CAPTION, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return te(ids)[0]


@torch.no_grad()
def denoising_loss(unet, vae, ctx, px, sched):
    g = torch.Generator().manual_seed(99)
    lat = vae.encode(px).latent_dist.mean * 0.18215
    total, n = 0.0, 0
    for t in [50, 250, 450, 650, 850]:
        noise = torch.randn(lat.shape, generator=g)
        tt = torch.full((lat.shape[0],), t)
        x = sched.add_noise(lat, noise, tt)
        pred = unet(x, tt, encoder_hidden_states=ctx.expand(lat.shape[0], -1, -1)).sample
        total += torch.nn.functional.mse_loss(pred, noise).item()
        n += 1
    return total / n


def train_peft(unet, vae, ctx, px, sched, steps, lr):
    from peft import LoraConfig
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        dist = vae.encode(px).latent_dist
        lat = dist.sample(generator=g) * 0.18215
    for s in range(steps):
        i = s % 6
        x0 = lat[i:i + 1]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    return unet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--atelier", default="target/release/atelier")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-3)
    a = ap.parse_args()
    from diffusers import StableDiffusionPipeline
    work = tempfile.mkdtemp(prefix="atelier-compare-")
    data = os.path.join(work, "data")
    os.makedirs(data)
    dataset(data)
    out = os.path.join(work, "run")
    subprocess.run([a.atelier, "train", "--model", MODEL, "--data", data, "--output", out, "--steps", str(a.steps),
                    "--resolution", "64", "--lr", str(a.lr), "--rank", "4", "--alpha", "8", "--seed", "5"], check=True)

    unet, vae, te, tok, sched = components()
    px, ctx = images(data), context(te, tok)
    base = denoising_loss(unet, vae, ctx, px, sched)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(os.path.join(out, "lora.safetensors"))
    ours = denoising_loss(pipe.unet, vae, ctx, px, sched)
    pipe.unload_lora_weights()

    unet2, vae2, te2, _, _ = components()
    peft_unet = train_peft(unet2, vae2, ctx, px, sched, a.steps, a.lr)
    theirs = denoising_loss(peft_unet, vae2, ctx, px, sched)
    print(f"\ndenoising MSE on the training images (diffusers evaluating, {a.steps} steps, rank 4, alpha 8, lr {a.lr}):")
    print(f"  base model                      {base:.5f}")
    print(f"  atelier's LoRA (kohya file)     {ours:.5f}  ({100 * (base - ours) / base:+.1f}% lower)")
    print(f"  diffusers + peft trained LoRA   {theirs:.5f}  ({100 * (base - theirs) / base:+.1f}% lower)")


if __name__ == "__main__":
    main()
