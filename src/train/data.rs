//! The dataset of `atelier train`: a folder of images (png, jpg, jpeg, webp; searched
//! recursively, hidden files and folders skipped, paths sorted) with their captions, and the
//! CPU-side preparation of each example (decode, resize, crop, flip, scale to [-1, 1]).
//!
//! Choices made here (all documented so a run can be explained and resumed):
//! - **Captions**: a `.txt` (`caption_extension`) beside the image wins; else a random line of
//!   the `--prompts` file, drawn anew each time the image is used; else `--caption`. An image
//!   with none of these is an error. Caption files are UTF-8 (a UTF-8 BOM is ignored) or UTF-16
//!   with a BOM; anything else is an error naming the file (no lossy guessing: a silently
//!   garbled caption would train the wrong thing). The lines of a caption file are trimmed and
//!   joined with a space. An empty caption file counts as no caption file (with a warning).
//! - **Scan** reads image headers only. Files that can't be read and images whose shorter side
//!   (after EXIF orientation) is under half the resolution are skipped, each with a warning in
//!   [`Summary::warnings`]; nothing is printed here, the caller shows the summary.
//! - **Decoding** honours EXIF orientation; grayscale becomes RGB; alpha is composited on white
//!   (straight alpha, in sRGB); 16-bit images keep their precision (the work is done in f32).
//! - **Resizing** scales so the image covers the target (the shorter side for a square target)
//!   with Lanczos3, then crops: centered (offsets rounded down) or at a random offset.
//! - **Buckets** follow kohya: every (w, h) in multiples of `bucket_step` with w·h ≤
//!   resolution², w and h within [min_bucket, max_bucket], plus the largest square; each image
//!   goes to the bucket whose aspect ratio w/h is closest to its own (first on ties).
//! - **Randomness** all comes from [`Rng`]: the epoch order from (seed, epoch) alone, and the
//!   per-example draws (prompt, then crop x and y when random-cropping, then flip when
//!   flipping) from the generator the caller passes, e.g. [`Dataset::example_rng`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Rgb, Rgb32FImage};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// The image file extensions the dataset reads (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Image formats that are recognised but not read: they get a warning instead of silence.
const OTHER_IMAGE_EXTENSIONS: [&str; 9] = ["gif", "bmp", "tif", "tiff", "avif", "heic", "heif", "jxl", "tga"];

/// What `atelier train` was told about its data.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetOptions {
    /// The folder of images (searched recursively).
    pub dir: PathBuf,
    /// Side of the square training size, and the area (resolution²) buckets keep under.
    pub resolution: usize,
    /// Center crop (true) or a random crop (false) after resizing.
    pub center_crop: bool,
    /// Random horizontal flip with probability 0.5.
    pub flip: bool,
    /// How many times each image appears per epoch.
    pub repeats: usize,
    /// One caption for every image without a caption file (and without `prompts_file`).
    pub caption: Option<String>,
    /// A file of prompts, one per line; images without a caption file draw a random one.
    pub prompts_file: Option<PathBuf>,
    /// The caption file beside `a.png` is `a` + this (".txt").
    pub caption_extension: String,
    /// kohya-style aspect-ratio buckets instead of one square size.
    pub buckets: bool,
    /// Smallest bucket side.
    pub min_bucket: usize,
    /// Largest bucket side.
    pub max_bucket: usize,
    /// Bucket sides are multiples of this.
    pub bucket_step: usize,
}

impl DatasetOptions {
    /// The defaults for a folder: 512, center crop, no flip, 1 repeat, ".txt" captions, no
    /// buckets (256 to 1024 in steps of 64 when turned on).
    pub fn new(dir: impl Into<PathBuf>) -> DatasetOptions {
        DatasetOptions {
            dir: dir.into(),
            resolution: 512,
            center_crop: true,
            flip: false,
            repeats: 1,
            caption: None,
            prompts_file: None,
            caption_extension: ".txt".into(),
            buckets: false,
            min_bucket: 256,
            max_bucket: 1024,
            bucket_step: 64,
        }
    }
}

/// Where an image's caption comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caption {
    /// The text of its caption file.
    File(String),
    /// A random line of the prompt list, drawn each time.
    Prompts,
    /// The `--caption` text.
    Fixed(String),
}

/// One usable image found by the scan.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub path: PathBuf,
    /// Size after EXIF orientation.
    pub width: u32,
    pub height: u32,
    /// Index into [`Dataset::buckets`].
    pub bucket: usize,
    pub caption: Caption,
}

/// Why a file was left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The header could not be read (not an image, truncated, unsupported variant).
    Unreadable(String),
    /// The shorter side is under `min` (half the resolution).
    TooSmall { width: u32, height: u32, min: u32 },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::Unreadable(why) => write!(f, "cannot read the image ({why})"),
            SkipReason::TooSmall { width, height, min } => {
                write!(f, "{width}x{height} is too small (the shorter side must be at least {min} px, half the resolution)")
            }
        }
    }
}

/// A file left out of the dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: SkipReason,
}

/// Images per bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketCount {
    pub width: usize,
    pub height: usize,
    pub images: usize,
}

/// What the scan found, for messages and the LoRA file's metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub dir: PathBuf,
    /// Image files found (png/jpg/jpeg/webp), usable or not.
    pub found: usize,
    /// Usable images.
    pub images: usize,
    pub repeats: usize,
    /// Examples per epoch: images × repeats.
    pub total: usize,
    pub skipped: Vec<Skipped>,
    pub captions_from_files: usize,
    pub captions_from_prompts: usize,
    pub captions_fixed: usize,
    /// Prompts in the prompt file (0 without one).
    pub prompts: usize,
    /// The buckets in use, with their image counts (one square bucket without buckets).
    pub buckets: Vec<BucketCount>,
    /// One line per skipped file and per other oddity, for the user to see.
    pub warnings: Vec<String>,
}

impl Summary {
    fn skip_counts(&self) -> String {
        let unreadable = self.skipped.iter().filter(|s| matches!(s.reason, SkipReason::Unreadable(_))).count();
        let counts = [(unreadable, "unreadable"), (self.skipped.len() - unreadable, "too small")];
        let parts: Vec<String> = counts.iter().filter(|c| c.0 > 0).map(|(n, what)| format!("{n} {what}")).collect();
        format!("{} files skipped: {}", self.skipped.len(), parts.join(", "))
    }
}

impl fmt::Display for Summary {
    /// The warnings, one per line, then one summary line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        write!(f, "{} images in {} (x{} repeats = {} per epoch); captions: {} from files, {} from the prompt list ({} prompts), {} from --caption",
            self.images, self.dir.display(), self.repeats, self.total, self.captions_from_files,
            self.captions_from_prompts, self.prompts, self.captions_fixed)?;
        if !self.skipped.is_empty() {
            write!(f, "; {}", self.skip_counts())?;
        }
        if self.buckets.len() > 1 {
            let b: Vec<String> = self.buckets.iter().map(|b| format!("{}x{}: {}", b.width, b.height, b.images)).collect();
            write!(f, "; buckets {}", b.join(", "))?;
        }
        Ok(())
    }
}

/// One prepared training example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// NHWC without the N: [height, width, 3], RGB in [-1, 1].
    pub pixels: Vec<f32>,
    pub width: usize,
    pub height: usize,
    pub caption: String,
    pub path: PathBuf,
}

/// The scanned dataset.
#[derive(Clone, Debug)]
pub struct Dataset {
    options: DatasetOptions,
    entries: Vec<Entry>,
    prompts: Vec<String>,
    buckets: Vec<(usize, usize)>,
    summary: Summary,
}

/// kohya's bucket sizes for `resolution`: every (w, h) with sides multiples of `step` in
/// [min, max] and w·h ≤ resolution², the tallest h for each w (and its transpose), plus the
/// largest square; sorted.
pub fn bucket_sizes(resolution: usize, min: usize, max: usize, step: usize) -> Vec<(usize, usize)> {
    let area = resolution * resolution;
    let mut set = BTreeSet::new();
    let square = resolution / step * step;
    set.insert((square, square));
    let mut w = min;
    while w <= max {
        let h = max.min(area / w) / step * step;
        if h >= min {
            set.insert((w, h));
            set.insert((h, w));
        }
        w += step;
    }
    set.into_iter().collect()
}

/// The index of the bucket whose aspect ratio is closest to width/height (first on ties).
pub fn closest_bucket(buckets: &[(usize, usize)], width: u32, height: u32) -> usize {
    let error = |i: usize| (buckets[i].0 as f64 / buckets[i].1 as f64 - width as f64 / height as f64).abs();
    (0..buckets.len()).min_by(|&a, &b| error(a).total_cmp(&error(b))).unwrap_or(0)
}

fn check_options(o: &DatasetOptions) -> Result<()> {
    let (res, min, max, step) = (o.resolution, o.min_bucket, o.max_bucket, o.bucket_step);
    let problem = if res == 0 || !res.is_multiple_of(8) {
        format!("--resolution {res} must be a positive multiple of 8 (e.g. 512)")
    } else if o.repeats == 0 {
        "--repeats must be at least 1".into()
    } else if o.buckets && (step == 0 || !step.is_multiple_of(8)) {
        format!("the bucket step {step} must be a positive multiple of 8 (e.g. 64)")
    } else if o.buckets && (min == 0 || !min.is_multiple_of(step) || !max.is_multiple_of(step) || min > max) {
        format!("bucket sides {min} to {max} must be multiples of the step {step} with min <= max (e.g. 256 to 1024)")
    } else if o.buckets && (res < min || res > max) {
        format!("--resolution {res} must lie between the smallest and largest bucket sides ({min} to {max})")
    } else {
        return Ok(());
    };
    Err(Error::Usage(problem))
}

/// Text from a caption or prompt file: UTF-8 (BOM ignored) or UTF-16 with a BOM.
fn decode_text(path: &Path, bytes: &[u8]) -> Result<String> {
    let utf16 = |be: bool| -> Option<String> {
        let body = &bytes[2..];
        let units = body.chunks_exact(2).map(|c| if be { u16::from_be_bytes([c[0], c[1]]) } else { u16::from_le_bytes([c[0], c[1]]) });
        let text = char::decode_utf16(units).collect::<std::result::Result<String, _>>().ok();
        text.filter(|_| body.len().is_multiple_of(2))
    };
    let text = match bytes {
        [0xEF, 0xBB, 0xBF, rest @ ..] => std::str::from_utf8(rest).ok().map(str::to_string),
        [0xFF, 0xFE, ..] => utf16(false),
        [0xFE, 0xFF, ..] => utf16(true),
        _ => std::str::from_utf8(bytes).ok().map(str::to_string),
    };
    text.ok_or_else(|| {
        Error::Usage(format!("{}: not UTF-8 text (nor UTF-16 with a byte-order mark); save it as UTF-8", path.display()))
    })
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    decode_text(path, &bytes)
}

/// The prompts of a prompt file: trimmed lines, blank lines and `#` comments skipped.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let prompts: Vec<String> = read_text(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if prompts.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no prompts in the file (blank lines and lines starting with # are skipped); put one prompt per line",
            path.display()
        )));
    }
    Ok(prompts)
}

/// The first three paths, and "..." when there are more.
fn some_paths(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().take(3).map(|p| p.display().to_string()).collect();
    names.join(", ") + if paths.len() > 3 { ", ..." } else { "" }
}

fn lower_ext(path: &Path) -> Option<String> {
    path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase())
}

/// Image files under `dir`, recursively, hidden entries skipped, symlinked folders visited once.
fn walk(dir: &Path, visited: &mut HashSet<PathBuf>, out: &mut Vec<PathBuf>, other: &mut Vec<PathBuf>, warnings: &mut Vec<String>) -> Result<()> {
    if let Ok(canon) = fs::canonicalize(dir)
        && !visited.insert(canon)
    {
        return Ok(());
    }
    let entries = fs::read_dir(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                if let Err(e) = walk(&path, visited, out, other, warnings) {
                    warnings.push(format!("{}: folder skipped ({e})", path.display()));
                }
            }
            Ok(m) if m.is_file() => match lower_ext(&path) {
                Some(e) if IMAGE_EXTENSIONS.contains(&e.as_str()) => out.push(path),
                Some(e) if OTHER_IMAGE_EXTENSIONS.contains(&e.as_str()) => other.push(path),
                _ => {}
            },
            Ok(_) => {}
            Err(e) => warnings.push(format!("{}: skipped ({e})", path.display())),
        }
    }
    Ok(())
}

/// The oriented size from the header alone.
fn header_size(path: &Path) -> std::result::Result<(u32, u32), String> {
    let reader = ImageReader::open(path).map_err(|e| e.to_string())?.with_guessed_format().map_err(|e| e.to_string())?;
    let mut dec = reader.into_decoder().map_err(|e| e.to_string())?;
    let (w, h) = dec.dimensions();
    if w == 0 || h == 0 {
        return Err(format!("it is {w}x{h}"));
    }
    use Orientation::*;
    let swapped = matches!(dec.orientation(), Ok(Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH));
    Ok(if swapped { (h, w) } else { (w, h) })
}

/// Decodes an image to RGB f32 in [0, 1]: EXIF orientation applied, gray to RGB, alpha
/// composited on white, 16-bit kept at full precision.
pub fn decode_rgb(path: &Path) -> Result<Rgb32FImage> {
    let bad = |e: image::ImageError| {
        Error::Usage(format!("{}: cannot decode the image ({e}); re-save it as PNG or JPEG, or remove it from the folder", path.display()))
    };
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let reader = ImageReader::open(path).map_err(io)?.with_guessed_format().map_err(io)?;
    let mut dec = reader.into_decoder().map_err(bad)?;
    let orientation = dec.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(dec).map_err(bad)?;
    img.apply_orientation(orientation);
    if !img.color().has_alpha() {
        return Ok(img.to_rgb32f());
    }
    let rgba = img.to_rgba32f();
    Ok(Rgb32FImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        Rgb([r * a + 1.0 - a, g * a + 1.0 - a, b * a + 1.0 - a])
    }))
}

/// A uniform index in 0..n (n ≥ 1).
fn below(rng: &mut Rng, n: usize) -> usize {
    ((rng.uniform() * n as f64) as usize).min(n - 1)
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, below(rng, i + 1));
    }
}

impl Dataset {
    /// Finds the images and their captions and checks every image's header.
    pub fn scan(options: &DatasetOptions) -> Result<Dataset> {
        check_options(options)?;
        let dir = &options.dir;
        if !dir.is_dir() {
            return Err(Error::Usage(format!("{}: no such folder; pass the folder of training images", dir.display())));
        }
        let prompts = match &options.prompts_file {
            Some(p) => read_prompts(p)?,
            None => Vec::new(),
        };
        let mut warnings = Vec::new();
        let (mut paths, mut other) = (Vec::new(), Vec::new());
        walk(dir, &mut HashSet::new(), &mut paths, &mut other, &mut warnings)?;
        paths.sort();
        other.sort();
        if !other.is_empty() {
            warnings.push(format!(
                "{} files in formats not read here ignored ({}); convert them to PNG, JPEG or WebP to use them",
                other.len(), some_paths(&other)
            ));
        }
        if paths.is_empty() {
            return Err(Error::Usage(format!(
                "no images in {} (looked for .png, .jpg, .jpeg and .webp files, in subfolders too); put the training images there or pass the right folder",
                dir.display()
            )));
        }

        let min_side = (options.resolution / 2) as u32;
        let mut skipped = Vec::new();
        let mut usable = Vec::new();
        for path in &paths {
            let reason = match header_size(path) {
                Err(why) => SkipReason::Unreadable(why),
                Ok((w, h)) if w.min(h) < min_side => SkipReason::TooSmall { width: w, height: h, min: min_side },
                Ok(size) => {
                    usable.push((path.clone(), size));
                    continue;
                }
            };
            warnings.push(format!("{}: skipped: {reason}", path.display()));
            skipped.push(Skipped { path: path.clone(), reason });
        }

        let mut summary = Summary {
            dir: dir.clone(),
            found: paths.len(),
            images: usable.len(),
            repeats: options.repeats,
            total: usable.len() * options.repeats,
            skipped,
            captions_from_files: 0,
            captions_from_prompts: 0,
            captions_fixed: 0,
            prompts: prompts.len(),
            buckets: Vec::new(),
            warnings,
        };
        if usable.is_empty() {
            return Err(Error::Usage(format!(
                "no usable images in {} ({}); see the warnings above, and give PNG, JPEG or WebP images at least {min_side} px on the shorter side",
                dir.display(), summary.skip_counts()
            )));
        }

        let buckets = if options.buckets {
            bucket_sizes(options.resolution, options.min_bucket, options.max_bucket, options.bucket_step)
        } else {
            vec![(options.resolution, options.resolution)]
        };
        let ext = options.caption_extension.trim_start_matches('.');
        let mut entries = Vec::with_capacity(usable.len());
        let mut uncaptioned = Vec::new();
        for (path, (width, height)) in usable {
            let cap_path = path.with_extension(ext);
            let mut text = None;
            if cap_path.is_file() {
                let t = read_text(&cap_path)?.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
                if t.is_empty() {
                    summary.warnings.push(format!("{}: empty caption file, treated as missing", cap_path.display()));
                } else {
                    text = Some(t);
                }
            }
            let caption = match (text, prompts.is_empty(), &options.caption) {
                (Some(t), _, _) => Caption::File(t),
                (None, false, _) => Caption::Prompts,
                (None, true, Some(c)) => Caption::Fixed(c.clone()),
                (None, true, None) => {
                    uncaptioned.push(path);
                    continue;
                }
            };
            match caption {
                Caption::File(_) => summary.captions_from_files += 1,
                Caption::Prompts => summary.captions_from_prompts += 1,
                Caption::Fixed(_) => summary.captions_fixed += 1,
            }
            let bucket = if options.buckets { closest_bucket(&buckets, width, height) } else { 0 };
            entries.push(Entry { path, width, height, bucket, caption });
        }
        if !uncaptioned.is_empty() {
            let first = &uncaptioned[0];
            return Err(Error::Usage(format!(
                "{} images have no caption ({}). Put a caption in a {ext} file beside each image ({} for {}), \
                 or pass --prompts FILE (one prompt per line) or --caption TEXT for the images without one",
                uncaptioned.len(), some_paths(&uncaptioned),
                first.with_extension(ext).file_name().unwrap_or_default().to_string_lossy(),
                first.file_name().unwrap_or_default().to_string_lossy(),
            )));
        }
        let mut counts = BTreeMap::new();
        for e in &entries {
            *counts.entry(e.bucket).or_insert(0) += 1;
        }
        summary.buckets =
            counts.into_iter().map(|(b, images)| BucketCount { width: buckets[b].0, height: buckets[b].1, images }).collect();
        Ok(Dataset { options: options.clone(), entries, prompts, buckets, summary })
    }

    /// Usable images (without repeats); a scanned dataset is never empty.
    pub fn len(&self) -> usize { self.entries.len() }
    pub fn is_empty(&self) -> bool { self.entries.is_empty() }
    pub fn entries(&self) -> &[Entry] { &self.entries }
    pub fn options(&self) -> &DatasetOptions { &self.options }
    pub fn summary(&self) -> &Summary { &self.summary }
    /// The prompts of the prompt file (empty without one).
    pub fn prompts(&self) -> &[String] { &self.prompts }
    /// All candidate buckets (one square without buckets), as (width, height).
    pub fn buckets(&self) -> &[(usize, usize)] { &self.buckets }

    /// The (width, height) image `index` (< len()) is prepared at.
    pub fn target_size(&self, index: usize) -> (usize, usize) {
        self.buckets[self.entries[index].bucket]
    }

    fn entry(&self, index: usize) -> Result<&Entry> {
        self.entries.get(index).ok_or_else(|| Error::Usage(format!("image index {index} out of range (the dataset has {})", self.len())))
    }

    /// The caption for one use of image `index`: a prompt-list image draws one value from `rng`.
    pub fn caption(&self, index: usize, rng: &mut Rng) -> Result<String> {
        Ok(match &self.entry(index)?.caption {
            Caption::File(t) | Caption::Fixed(t) => t.clone(),
            Caption::Prompts => self.prompts[below(rng, self.prompts.len())].clone(),
        })
    }

    /// Decodes and prepares image `index`: caption, resize to cover the target, crop, flip,
    /// scale to [-1, 1]. Random draws, in order: the prompt (prompt-list captions), crop x and y
    /// (random crop), flip (with `flip`).
    pub fn load(&self, index: usize, rng: &mut Rng) -> Result<Example> {
        let entry = self.entry(index)?;
        let caption = self.caption(index, rng)?;
        let (tw, th) = self.target_size(index);
        let img = decode_rgb(&entry.path)?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let scale = f64::max(tw as f64 / w as f64, th as f64 / h as f64);
        let rw = ((w as f64 * scale).round() as usize).max(tw);
        let rh = ((h as f64 * scale).round() as usize).max(th);
        let img = if (rw, rh) == (w, h) { img } else { image::imageops::resize(&img, rw as u32, rh as u32, FilterType::Lanczos3) };
        let (x0, y0) = if self.options.center_crop {
            ((rw - tw) / 2, (rh - th) / 2)
        } else {
            let x = below(rng, rw - tw + 1);
            (x, below(rng, rh - th + 1))
        };
        let flip = self.options.flip && rng.uniform() < 0.5;
        let raw = img.as_raw();
        let mut pixels = Vec::with_capacity(tw * th * 3);
        for y in 0..th {
            for x in 0..tw {
                let sx = if flip { x0 + tw - 1 - x } else { x0 + x };
                let at = ((y0 + y) * rw + sx) * 3;
                pixels.extend(raw[at..at + 3].iter().map(|&v| v.clamp(0.0, 1.0) * 2.0 - 1.0));
            }
        }
        Ok(Example { pixels, width: tw, height: th, caption, path: entry.path.clone() })
    }

    /// The batches of one epoch: every image `repeats` times, shuffled, grouped into batches of
    /// `batch_size` within each bucket (a last partial batch per bucket is kept), and the
    /// batches shuffled. Depends on (seed, epoch) and the dataset alone, so a resumed run
    /// regenerates it. A `batch_size` of 0 counts as 1.
    pub fn epoch_order(&self, epoch: usize, seed: u64, batch_size: usize) -> Vec<Vec<usize>> {
        let bs = batch_size.max(1);
        let mut rng = Rng::new(Rng::new(seed).next_u64().wrapping_add(epoch as u64));
        let mut items: Vec<usize> = (0..self.len()).flat_map(|i| std::iter::repeat_n(i, self.options.repeats)).collect();
        shuffle(&mut items, &mut rng);
        let mut per_bucket = vec![Vec::new(); self.buckets.len()];
        for i in items {
            per_bucket[self.entries[i].bucket].push(i);
        }
        let mut batches: Vec<Vec<usize>> = per_bucket.iter().flat_map(|b| b.chunks(bs).map(<[usize]>::to_vec)).collect();
        shuffle(&mut batches, &mut rng);
        batches
    }

    /// A generator for the draws of one example (slot `slot` of batch `batch` in `epoch`),
    /// independent of the others, so examples can be prepared in any order or after a resume.
    pub fn example_rng(seed: u64, epoch: usize, batch: usize, slot: usize) -> Rng {
        let mut r = Rng::new(seed ^ 0x6174_656c_6965_7244); // "atelierD"
        let mut x = r.next_u64();
        for v in [epoch, batch, slot] {
            x = Rng::new(x ^ v as u64).next_u64();
        }
        Rng::new(x)
    }
}
