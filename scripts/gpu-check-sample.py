#!/usr/bin/env python3
"""End-to-end text-to-image on the lent GPU: diffusers' StableDiffusionPipeline (fp16, eager) and
`atelier sample` on the same full-size SD-1.5 architecture with seeded random weights (made by
scripts/gpu-check-models.py's builder), the same initial latents, prompt, sampler and steps.

Prints both wall times (model already loaded: prompt to decoded image, after one warm-up run;
atelier's after a warm-up process too),
both peak GPU memory figures, and the relative L2 difference of the final latents (random weights
amplify f16 differences over the steps, so this is a sanity check, not an accuracy bound: the
accuracy of the pipeline is tested against diffusers on the tiny model in tests/pipeline.rs).

Run on the GPU machine from the repository root (scripts/gpu-check.sh sample does):
    python3 scripts/gpu-check-sample.py --atelier .device/bin/atelier [--steps 25] [--sampler dpmpp_2m]
"""

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "a portrait of a lady in a blue silk dress, oil on canvas, 18th century"
NEGATIVE = "blurry, lowres, bad hands"


def models_module():
    spec = importlib.util.spec_from_file_location("gpu_check_models", os.path.join(HERE, "gpu-check-models.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--atelier", default=".device/bin/atelier")
    ap.add_argument("--work", default="/tmp/sd15-random")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    m = models_module()
    m.install_diffusers()
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizer

    te, unet, vae = m.build(a.work)
    root = os.path.dirname(HERE)
    shutil.copytree(os.path.join(root, "tests/fixtures/tokenizer"), os.path.join(a.work, "tokenizer"), dirs_exist_ok=True)
    shutil.copytree(os.path.join(root, "tests/fixtures/tiny-sd/scheduler"), os.path.join(a.work, "scheduler"), dirs_exist_ok=True)
    tok = CLIPTokenizer.from_pretrained(os.path.join(a.work, "tokenizer"))
    sched = DPMSolverMultistepScheduler.from_pretrained(os.path.join(a.work, "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    lat = a.size // 8
    init = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(77))
    noise_path = os.path.join(a.work, "init-noise.safetensors")
    # Every atelier image starts from the same latents (the first is a warm-up).
    save_file({"latents": init.repeat(a.repeat + 1, 1, 1, 1).contiguous()}, noise_path)

    def torch_run(output_type):
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=a.steps, guidance_scale=a.guidance,
                    height=a.size, width=a.size, latents=init.to("cuda", torch.float16), output_type=output_type)

    with torch.inference_mode():
        torch_run("pil")  # warm-up
        times = []
        for _ in range(a.repeat):
            torch.cuda.synchronize()
            t = time.perf_counter()
            torch_run("pil")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        torch.cuda.reset_peak_memory_stats()
        torch_run("pil")  # the peak of a whole prompt-to-image run, VAE decode included
        torch_peak = torch.cuda.max_memory_allocated()
        torch_latents = torch_run("latent").images.float().cpu()
    torch_s = sorted(times)[len(times) // 2]
    del pipe
    te, unet, vae = (x.cpu() for x in (te, unet, vae))
    torch.cuda.empty_cache()

    out_dir = os.path.join(a.work, "atelier-samples")
    lat_path = os.path.join(a.work, "atelier-latents.safetensors")
    cmd = [a.atelier, "sample", "--model", a.work, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
           "--steps", str(a.steps), "--guidance", str(a.guidance), "--width", str(a.size), "--height", str(a.size),
           "--sampler", "dpmpp_2m", "--seed", "77", "--init-noise", noise_path, "--output", out_dir,
           "--save-latents", lat_path, "--num-images", str(a.repeat + 1), "--profile"]
    # A warm-up process first, as diffusers had its warm-up run: it fills the NVIDIA driver's
    # shader cache (~/.nv/ComputeCache), so the timed process's text encoder, which runs once
    # for all its images and is charged to each, is not timed compiling its pipelines (0.49 s
    # of a 1.27 s figure on a fresh machine, session 14).
    warm = cmd[:cmd.index("--init-noise")] + ["--output", os.path.join(a.work, "atelier-warmup.png"), "--num-images", "1"]
    subprocess.run(warm, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop, peak = threading.Event(), [0]
    th = threading.Thread(target=m.poll_memory, args=(proc.pid, stop, peak))
    th.start()
    text = proc.communicate()[0]
    stop.set()
    th.join()
    print(text[-3000:])
    if proc.returncode != 0:
        raise SystemExit(f"atelier failed ({proc.returncode})")
    # The summary line: "... in X s (...)" for all images; the first is a warm-up of the plans'
    # pipelines, so the per-image time is read from the "image k: s" lines when present.
    per_image = [float(x) for x in re.findall(r"image \d+ done in ([0-9.]+) s", text)]
    total = float(re.search(r" in ([0-9.]+) s \(", text).group(1))
    atelier_s = sorted(per_image[1:])[len(per_image[1:]) // 2] if len(per_image) > 1 else total / (a.repeat + 1)
    ours = load_file(lat_path)["latents"][:1].float()
    diff = ((ours.double() - torch_latents.double()).norm() / torch_latents.double().norm()).item()
    print()
    print(f"{torch.cuda.get_device_name()}, {a.size}x{a.size}, {a.steps} steps DPM++ 2M, guidance {a.guidance}, batch 1 "
          f"(CFG: UNet batch 2)")
    print(f"{'engine':<28}{'prompt -> image s':>18}{'peak GPU memory':>18}")
    print(f"{'diffusers fp16 eager':<28}{torch_s:>18.3f}{torch_peak / 2**30:>14.2f} GiB (allocated)")
    print(f"{'atelier':<28}{atelier_s:>18.3f}{peak[0] / 1024:>14.2f} GiB (nvidia-smi, whole process)")
    mem = re.search(r"weights ([0-9.]+) MiB; .*CLIP ([0-9.]+) MiB, UNet ([0-9.]+) MiB, VAE decode ([0-9.]+) MiB", text)
    if mem:
        w, *plans = (float(x) for x in mem.groups())
        print(f"{'atelier, tensors only':<28}{'':>18}{(w + max(plans)) / 1024:>14.2f} GiB (weights + the largest plan; "
              f"comparable to torch's allocated figure)")
    text_s = re.search(r"\(text ([0-9.]+) s", text)
    if text_s:
        print(f"atelier's text encoder: {float(text_s.group(1)):.3f} s of each image's figure (the prompt is encoded once "
              f"for the process's {a.repeat + 1} images)")
    print(f"speed-up {torch_s / atelier_s:.2f}x; final latents differ by {diff:.2e} (relative L2, random weights)")


if __name__ == "__main__":
    main()
