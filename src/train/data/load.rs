//! Loading one training example: decode, resize to cover the target, crop, flip, scale to
//! [-1, 1].
//!
//! - **Decoding** honours EXIF orientation; grayscale becomes RGB; alpha is composited on white
//!   (straight alpha, in sRGB); 16-bit images keep their precision (the work is done in f32).
//! - **Resizing** scales so the image covers the target (the shorter side for a square target)
//!   with Lanczos3, then crops: centered (offsets rounded down) or at a random offset.

use std::path::Path;

use image::imageops::FilterType;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Rgb, Rgb32FImage};

use super::{Dataset, Example, below};
use crate::error::{Error, Result};
use crate::rng::Rng;

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

impl Dataset {
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
}
