//! Scanning the folder of `atelier train`: the image files (searched recursively, hidden
//! files and folders skipped, paths sorted), their sizes from the headers, and their captions.
//!
//! - **Captions**: a `.txt` (`caption_extension`) beside the image wins; else a random line of
//!   the `--prompts` file, drawn anew each time the image is used; else `--caption`. An image
//!   with none of these is an error. Caption files are UTF-8 (a UTF-8 BOM is ignored) or UTF-16
//!   with a BOM; anything else is an error naming the file (no lossy guessing: a silently
//!   garbled caption would train the wrong thing). The lines of a caption file are trimmed and
//!   joined with a space. An empty caption file counts as no caption file (with a warning).
//! - **Scan** reads image headers only. Files that can't be read and images whose shorter side
//!   (after EXIF orientation) is under half the resolution are skipped, each with a warning in
//!   [`Summary::warnings`]; nothing is printed here, the caller shows the summary.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use image::metadata::Orientation;
use image::{ImageDecoder, ImageReader};

use super::{
    BucketCount, Caption, Dataset, DatasetOptions, Entry, SkipReason, Skipped, Summary, bucket_sizes,
    closest_bucket,
};
use crate::error::{Error, Result};

/// The image file extensions the dataset reads (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Image formats that are recognised but not read: they get a warning instead of silence.
const OTHER_IMAGE_EXTENSIONS: [&str; 9] = ["gif", "bmp", "tif", "tiff", "avif", "heic", "heif", "jxl", "tga"];

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
}
