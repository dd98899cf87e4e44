//! The dataset of `atelier train`: a folder of images (png, jpg, jpeg, webp; searched
//! recursively, hidden files and folders skipped, paths sorted) with their captions, and the
//! CPU-side preparation of each example (decode, resize, crop, flip, scale to [-1, 1]).
//!
//! Choices made here (all documented so a run can be explained and resumed): the captions and
//! the scan are described in `scan` (the folder, the caption and prompt files, the image
//! headers), decoding and resizing in `load` (one example's pixels); here the types, and:
//! - **Buckets** follow kohya: every (w, h) in multiples of `bucket_step` with w·h ≤
//!   resolution², w and h within [min_bucket, max_bucket], plus the largest square; each image
//!   goes to the bucket whose aspect ratio w/h is closest to its own (first on ties).
//! - **Randomness** all comes from [`Rng`]: the epoch order from (seed, epoch) alone, and the
//!   per-example draws (prompt, then crop x and y when random-cropping, then flip when
//!   flipping) from the generator the caller passes, e.g. [`Dataset::example_rng`].

mod load;
mod scan;

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::rng::Rng;

pub use load::decode_rgb;
pub use scan::{IMAGE_EXTENSIONS, read_prompts};

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
