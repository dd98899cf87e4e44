//! The loss curve of a training run as a PNG (`loss.png` in the output folder, redrawn at
//! every checkpoint): each step's loss as light grey dots, the smoothed loss as a dark line,
//! on a linear step axis and a loss axis from the lowest to the highest value shown, with a
//! light grid at the quarters. Drawn with plain pixel writes (no plotting dependency); the
//! numbers are in log.csv beside it.

use std::path::Path;

use crate::error::Result;
use crate::images::{png_bytes, write_atomic};

const W: usize = 800;
const H: usize = 400;
const MARGIN: usize = 20;

/// Draws `history` rows of (step, smoothed loss, loss) to `path` (written atomically).
pub fn write_loss_curve(path: &Path, history: &[(usize, f64, f64)]) -> Result<()> {
    let rgb = draw(history);
    let text = format!("loss curve: {} steps", history.last().map(|h| h.0).unwrap_or(0));
    write_atomic(path, &png_bytes(&rgb, W, H, &text)?)
}

/// The picture as RGB8 [H, W, 3].
pub fn draw(history: &[(usize, f64, f64)]) -> Vec<u8> {
    let mut img = vec![255u8; W * H * 3];
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        if x < W && y < H {
            img[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&c);
        }
    };
    let (pw, ph) = (W - 2 * MARGIN, H - 2 * MARGIN);
    for q in 0..=4 {
        for i in 0..pw {
            put(MARGIN + i, MARGIN + q * ph / 4, [225, 225, 225]);
        }
        for j in 0..ph {
            put(MARGIN + q * pw / 4, MARGIN + j, [225, 225, 225]);
        }
    }
    let finite: Vec<&(usize, f64, f64)> = history.iter().filter(|h| h.1.is_finite() && h.2.is_finite()).collect();
    if finite.is_empty() {
        return img;
    }
    let last = finite.iter().map(|h| h.0).max().unwrap_or(1).max(1) as f64;
    let lo = finite.iter().map(|h| h.1.min(h.2)).fold(f64::INFINITY, f64::min);
    let hi = finite.iter().map(|h| h.1.max(h.2)).fold(f64::NEG_INFINITY, f64::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let px = |s: usize| MARGIN + ((s as f64 / last) * (pw - 1) as f64).round() as usize;
    let py = |v: f64| MARGIN + (((hi - v) / span) * (ph - 1) as f64).round() as usize;
    for h in &finite {
        let (x, y) = (px(h.0), py(h.2));
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            put(x + dx, y + dy, [170, 170, 170]);
        }
    }
    for pair in finite.windows(2) {
        let (x0, y0, x1, y1) = (px(pair[0].0) as f64, py(pair[0].1) as f64, px(pair[1].0) as f64, py(pair[1].1) as f64);
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1.0) as usize;
        for k in 0..=n {
            let t = k as f64 / n as f64;
            let (x, y) = ((x0 + t * (x1 - x0)).round() as usize, (y0 + t * (y1 - y0)).round() as usize);
            put(x, y, [30, 60, 160]);
            put(x, y + 1, [30, 60, 160]);
        }
    }
    img
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_points_and_line() {
        let h: Vec<(usize, f64, f64)> = (1..=50).map(|s| (s, 1.0 / s as f64, 1.2 / s as f64)).collect();
        let img = super::draw(&h);
        let dark = img.chunks(3).filter(|p| p == &[30, 60, 160]).count();
        let grey = img.chunks(3).filter(|p| p == &[170, 170, 170]).count();
        assert!(dark > 100 && grey > 10, "dark {dark}, grey {grey}");
        assert_eq!(super::draw(&[]).len(), super::W * super::H * 3);
    }
}
