//! `atelier sample` end to end on the tiny model: the PNG and its A1111 `parameters` chunk,
//! `--save-latents` and `--init-noise`, the same seed giving the same image twice, img2img and
//! LoRA runs, and bad input refused with a clear message, a non-zero exit and nothing written.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixtures::fixture;

fn atelier(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).output().expect("running atelier")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("atelier-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "atelier failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command that must fail; returns its error text.
fn fails(args: &[&str]) -> String {
    let out = atelier(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should fail; stderr: {err}");
    assert!(err.contains("error:"), "{args:?}: no error line in {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    err
}

#[test]
fn sample_writes_png_with_parameters_and_latents() {
    let model = fixture("tiny-sd");
    let dir = scratch("png");
    let (a, b, lat) = (dir.join("a.png"), dir.join("b.png"), dir.join("latents.safetensors"));
    let base = [
        "sample", "--model", s(&model), "--prompt", "a portrait of a lady, oil on canvas", "--negative-prompt", "blurry",
        "--steps", "4", "--width", "64", "--height", "64", "--seed", "1234",
    ];
    let mut args = base.to_vec();
    args.extend(["--output", s(&a), "--save-latents", s(&lat)]);
    let out = atelier(&args);
    ok(&out);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("a.png") && summary.contains("4 steps"), "summary: {summary}");

    let img = image::open(&a).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 64));
    let params = atelier::images::png_parameters(&a).unwrap().expect("a parameters chunk");
    let lines: Vec<&str> = params.lines().collect();
    assert_eq!(lines[0], "a portrait of a lady, oil on canvas");
    assert_eq!(lines[1], "Negative prompt: blurry");
    for want in ["Steps: 4", "Sampler: DPM++ 2M", "CFG scale: 7.5", "Seed: 1234", "Size: 64x64", "Model: tiny-sd", "Version: atelier"] {
        assert!(lines[2].contains(want), "{want:?} missing from {:?}", lines[2]);
    }
    let (shape, values) = atelier::images::read_latents(&lat).unwrap();
    assert_eq!(shape, vec![1, 4, 8, 8]);
    assert!(values.iter().all(|v| v.is_finite()));

    // The same seed gives the same image.
    let mut args = base.to_vec();
    args.extend(["--output", s(&b)]);
    ok(&atelier(&args));
    assert_eq!(img.as_raw(), image::open(&b).unwrap().to_rgb8().as_raw(), "same seed, same image");

    // A folder output numbers the files; --init-noise takes the latents format back.
    let folder = dir.join("out");
    let mut args = base.to_vec();
    args.extend(["--output", s(&folder), "--init-noise", s(&lat), "--sampler", "euler_a"]);
    ok(&atelier(&args));
    ok(&atelier(&args));
    let mut names: Vec<String> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, vec!["00000-1234.png", "00001-1234.png"]);
    let params = atelier::images::png_parameters(&folder.join("00000-1234.png")).unwrap().unwrap();
    assert!(params.contains("Sampler: Euler a, CFG scale"), "{params}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn img2img_and_lora_runs() {
    let model = fixture("tiny-sd");
    let dir = scratch("img2img");
    let out_png = dir.join("i.png");
    let init = fixture("init_64x64.png");
    let lora = fixture("lora/tiny_kohya.safetensors");
    let lora_arg = format!("{}:0.8", s(&lora));
    ok(&atelier(&[
        "sample", "--model", s(&model), "--prompt", "a lady", "--steps", "4", "--seed", "3", "--init-image", s(&init),
        "--strength", "0.5", "--lora", &lora_arg, "--sampler", "euler", "--karras", "--output", s(&out_png), "--num-images", "2",
    ]));
    for k in [1, 2] {
        let p = dir.join(format!("i-{k}.png"));
        let params = atelier::images::png_parameters(&p).unwrap().unwrap();
        assert!(params.contains("Denoising strength: 0.5"), "{params}");
        assert!(params.contains("Sampler: Euler, Schedule type: Karras"), "{params}");
        assert!(params.starts_with("a lady <lora:tiny_kohya:0.8>"), "{params}");
        assert!(params.contains("Lora hashes: \"tiny_kohya: "), "{params}");
        assert!(params.contains(&format!("Seed: {}", 3 + k - 1)), "{params}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let model = fixture("tiny-sd");
    let dir = scratch("bad");
    let out = dir.join("out");
    let o = s(&out);
    let m = s(&model);
    let base = |extra: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = ["sample", "--model", m, "--steps", "2", "--output", o]
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let run = |args: Vec<String>| fails(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let err = fails(&["sample", "--model", "no/such/model", "--prompt", "x"]);
    assert!(err.contains("no/such/model") && err.contains("--model"), "{err}");
    let err = run(base(&["--prompt-file", "no-such-prompts.txt"]));
    assert!(err.contains("no-such-prompts.txt"), "{err}");
    let err = run(base(&["--prompt", "x", "--width", "60"]));
    assert!(err.contains("multiples of 8"), "{err}");
    let err = run(base(&["--prompt", "x", "--width", "4096", "--height", "4096"]));
    assert!(err.contains("GPU") || err.contains("too large") || err.contains("limit"), "{err}");
    let sdxl = fixture("lora/sdxl_like.safetensors");
    let err = run([base(&["--prompt", "x", "--lora"]), vec![s(&sdxl).to_string()]].concat());
    assert!(err.contains("SDXL"), "{err}");
    let not_image = fixture("tiny-sd/model_index.json");
    let err = run([base(&["--prompt", "x", "--init-image"]), vec![s(&not_image).to_string()]].concat());
    assert!(err.contains("cannot read the image"), "{err}");
    let err = run(base(&["--prompt", "x", "--sampler", "ddpm"]));
    assert!(err.contains("dpmpp_2m"), "the sampler list: {err}");
    let err = run(base(&["--prompt", "x", "--sampler", "ddim", "--karras"]));
    assert!(err.contains("karras") || err.contains("Karras"), "{err}");
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(), "nothing written");

    // An output folder that can't be created (its parent is a file): refused before the model loads.
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under = file.join("sub");
    let err = fails(&["sample", "--model", m, "--prompt", "x", "--output", s(&under)]);
    assert!(err.contains("a-file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
