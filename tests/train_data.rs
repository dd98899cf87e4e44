//! The training dataset (src/train/data.rs): scanning, captions, preparation, buckets and the
//! epoch order, on small generated folders of images.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use atelier::rng::Rng;
use atelier::train::data::{Caption, Dataset, DatasetOptions, SkipReason, bucket_sizes};
use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};

/// A temporary folder, removed on drop.
struct Temp(PathBuf);

impl Temp {
    fn new(tag: &str) -> Temp {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "atelier-train-data-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Temp(dir)
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128]))
}

const PROMPTS: [&str; 3] = ["an oil portrait", "a charcoal sketch", "a watercolour"];

/// base/images/{a.png, b.jpg + b.txt, c.webp, gray.png, rgba.png, tiny.png, corrupt.png,
/// nested/deep/d.PNG, .hidden.png, notes.md, old.gif} and base/prompts.txt.
fn make_dataset(t: &Temp) -> (PathBuf, PathBuf) {
    let root = t.0.join("images");
    fs::create_dir_all(root.join("nested/deep")).unwrap();
    gradient(64, 48).save(root.join("a.png")).unwrap();
    gradient(48, 32).save(root.join("b.jpg")).unwrap();
    fs::write(root.join("b.txt"), "  a jpeg caption\n").unwrap();
    let webp = gradient(32, 40);
    let f = fs::File::create(root.join("c.webp")).unwrap();
    image::codecs::webp::WebPEncoder::new_lossless(f)
        .encode(webp.as_raw(), 32, 40, image::ExtendedColorType::Rgb8)
        .unwrap();
    GrayImage::from_fn(40, 40, |x, _| Luma([(x * 6) as u8])).save(root.join("gray.png")).unwrap();
    // Left half fully transparent red, right half opaque blue.
    RgbaImage::from_fn(32, 32, |x, _| if x < 16 { Rgba([255, 0, 0, 0]) } else { Rgba([0, 0, 255, 255]) })
        .save(root.join("rgba.png"))
        .unwrap();
    gradient(8, 8).save(root.join("tiny.png")).unwrap();
    fs::write(root.join("corrupt.png"), b"this is not a png at all").unwrap();
    gradient(32, 32).save(root.join("nested/deep/d.PNG")).unwrap();
    gradient(32, 32).save(root.join(".hidden.png")).unwrap();
    fs::write(root.join("notes.md"), "not an image").unwrap();
    fs::write(root.join("old.gif"), "GIF89a").unwrap();
    let prompts = t.0.join("prompts.txt");
    fs::write(&prompts, format!("# a comment\n\n{}\n  {}  \n{}\n", PROMPTS[0], PROMPTS[1], PROMPTS[2])).unwrap();
    (root, prompts)
}

fn opts(dir: &Path) -> DatasetOptions {
    DatasetOptions { resolution: 32, ..DatasetOptions::new(dir) }
}

fn names(ds: &Dataset) -> Vec<String> {
    ds.entries().iter().map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

#[test]
fn scan_counts_skips_and_captions() {
    let t = Temp::new("scan");
    let (root, prompts) = make_dataset(&t);
    let o = DatasetOptions { repeats: 3, prompts_file: Some(prompts.clone()), caption: Some("fixed".into()), ..opts(&root) };
    let ds = Dataset::scan(&o).unwrap();
    // Sorted paths, hidden and non-image files ignored, nested folder searched.
    assert_eq!(names(&ds), ["a.png", "b.jpg", "c.webp", "gray.png", "d.PNG", "rgba.png"]);
    let s = ds.summary();
    assert_eq!((s.found, s.images, s.repeats, s.total), (8, 6, 3, 18));
    assert_eq!(s.skipped.len(), 2);
    let skip: BTreeMap<String, &SkipReason> =
        s.skipped.iter().map(|k| (k.path.file_name().unwrap().to_string_lossy().into_owned(), &k.reason)).collect();
    assert!(matches!(skip["corrupt.png"], SkipReason::Unreadable(_)));
    assert_eq!(skip["tiny.png"], &SkipReason::TooSmall { width: 8, height: 8, min: 16 });
    for f in ["corrupt.png", "tiny.png", "old.gif"] {
        assert!(s.warnings.iter().any(|w| w.contains(f)), "no warning for {f}: {:?}", s.warnings);
    }
    let text = s.to_string();
    assert!(text.contains("2 files skipped: 1 unreadable, 1 too small"), "{text}");
    // Caption precedence: .txt beats prompts beats --caption.
    assert_eq!(ds.entries()[1].caption, Caption::File("a jpeg caption".into()));
    assert!(ds.entries().iter().enumerate().all(|(i, e)| i == 1 || e.caption == Caption::Prompts));
    assert_eq!((s.captions_from_files, s.captions_from_prompts, s.captions_fixed, s.prompts), (1, 5, 0, 3));
    assert_eq!(ds.prompts(), PROMPTS);

    // Prompt draws: from the list only, all of them eventually, reproducible from the rng.
    let draw = |seed| {
        let mut r = Rng::new(seed);
        (0..60).map(|_| ds.caption(0, &mut r).unwrap()).collect::<Vec<_>>()
    };
    let a = draw(5);
    assert_eq!(a, draw(5));
    assert_ne!(a, draw(6));
    assert_eq!(a.iter().map(String::as_str).collect::<HashSet<_>>(), PROMPTS.into_iter().collect());
    assert_eq!(ds.caption(1, &mut Rng::new(0)).unwrap(), "a jpeg caption");

    // Without prompts, --caption fills in.
    let o2 = DatasetOptions { prompts_file: None, ..o.clone() };
    let ds2 = Dataset::scan(&o2).unwrap();
    assert_eq!(ds2.entries()[0].caption, Caption::Fixed("fixed".into()));
    assert_eq!(ds2.entries()[1].caption, Caption::File("a jpeg caption".into()));
    assert_eq!(ds2.load(0, &mut Rng::new(1)).unwrap().caption, "fixed");

    // With neither: an error naming an image and the three fixes.
    let o3 = DatasetOptions { caption: None, ..o2 };
    let e = Dataset::scan(&o3).unwrap_err().to_string();
    for part in ["5 images have no caption", "a.png", "a.txt", "--prompts FILE", "--caption TEXT"] {
        assert!(e.contains(part), "{part:?} not in: {e}");
    }
}

#[test]
fn caption_encodings() {
    let t = Temp::new("enc");
    gradient(32, 32).save(t.0.join("u16.png")).unwrap();
    gradient(32, 32).save(t.0.join("u8bom.png")).unwrap();
    let mut u16 = vec![0xFF, 0xFE];
    u16.extend("un portrait à l'huile\r\nsecond line".encode_utf16().flat_map(|u| u.to_le_bytes()));
    fs::write(t.0.join("u16.txt"), u16).unwrap();
    fs::write(t.0.join("u8bom.txt"), b"\xEF\xBB\xBFcaf\xC3\xA9").unwrap();
    let ds = Dataset::scan(&opts(&t.0)).unwrap();
    assert_eq!(ds.entries()[0].caption, Caption::File("un portrait à l'huile second line".into()));
    assert_eq!(ds.entries()[1].caption, Caption::File("café".into()));
    // Latin-1 bytes: an error naming the caption file.
    fs::write(t.0.join("u8bom.txt"), b"caf\xE9").unwrap();
    let e = Dataset::scan(&opts(&t.0)).unwrap_err().to_string();
    assert!(e.contains("u8bom.txt") && e.contains("UTF-8"), "{e}");
    // An empty caption file counts as missing.
    fs::write(t.0.join("u8bom.txt"), "\n  \n").unwrap();
    let ds = Dataset::scan(&DatasetOptions { caption: Some("x".into()), ..opts(&t.0) }).unwrap();
    assert_eq!(ds.entries()[1].caption, Caption::Fixed("x".into()));
    assert!(ds.summary().warnings.iter().any(|w| w.contains("u8bom.txt")));
}

#[test]
fn load_sizes_ranges_gray_and_alpha() {
    let t = Temp::new("load");
    let (root, prompts) = make_dataset(&t);
    let o = DatasetOptions { prompts_file: Some(prompts), flip: true, center_crop: false, ..opts(&root) };
    let ds = Dataset::scan(&o).unwrap();
    let mut rng = Rng::new(3);
    for i in 0..ds.len() {
        let ex = ds.load(i, &mut rng).unwrap();
        assert_eq!((ex.width, ex.height, ex.pixels.len()), (32, 32, 32 * 32 * 3), "{}", ex.path.display());
        assert!(ex.pixels.iter().all(|v| v.is_finite() && (-1.0..=1.0).contains(v)));
        assert!(ex.pixels.iter().any(|&v| v < 0.0) || names(&ds)[i] == "rgba.png");
    }
    let name = |n: &str| names(&ds).iter().position(|x| x == n).unwrap();
    let gray = ds.load(name("gray.png"), &mut rng).unwrap();
    assert!(gray.pixels.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    // Transparent red is white; opaque blue stays blue (flip or not, one half each).
    let rgba = ds.load(name("rgba.png"), &mut rng).unwrap();
    let (mut white, mut blue) = (0, 0);
    for p in rgba.pixels.chunks(3) {
        if p == [1.0, 1.0, 1.0] {
            white += 1;
        } else if p == [-1.0, -1.0, 1.0] {
            blue += 1;
        }
    }
    assert_eq!((white, blue), (512, 512));
    // A load-time decoding failure names the file.
    fs::write(root.join("a.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let e = ds.load(0, &mut rng).unwrap_err().to_string();
    assert!(e.contains("a.png"), "{e}");
}

/// 16x8, four vertical stripes of 4 px: red, green, blue, white.
fn stripes(dir: &Path) {
    let c = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]];
    RgbImage::from_fn(16, 8, |x, _| Rgb(c[x as usize / 4])).save(dir.join("s.png")).unwrap();
}

fn column(ex: &atelier::train::data::Example, x: usize) -> [f32; 3] {
    let p = &ex.pixels[x * 3..x * 3 + 3];
    [p[0], p[1], p[2]]
}

#[test]
fn center_crop_random_crop_and_flip() {
    let t = Temp::new("crop");
    stripes(&t.0);
    let o = DatasetOptions { resolution: 8, caption: Some("s".into()), ..DatasetOptions::new(&t.0) };
    let ds = Dataset::scan(&o).unwrap();
    let ex = ds.load(0, &mut Rng::new(0)).unwrap();
    assert_eq!((ex.width, ex.height), (8, 8));
    // Center crop keeps columns 4..12: green then blue, on every row.
    for y in 0..8 {
        for x in 0..8 {
            let want = if x < 4 { [-1.0, 1.0, -1.0] } else { [-1.0, -1.0, 1.0] };
            assert_eq!(&ex.pixels[(y * 8 + x) * 3..(y * 8 + x) * 3 + 3], want, "({x}, {y})");
        }
    }
    // Flip: each load is the crop or its mirror, both happen, and the rng decides.
    let flip = Dataset::scan(&DatasetOptions { flip: true, ..o.clone() }).unwrap();
    let mut kinds = HashSet::new();
    for seed in 0..32 {
        let a = flip.load(0, &mut Rng::new(seed)).unwrap();
        assert_eq!(a, flip.load(0, &mut Rng::new(seed)).unwrap());
        let mirrored = (0..8).all(|x| column(&a, x) == column(&ex, 7 - x));
        assert!(a == ex || mirrored);
        kinds.insert(mirrored);
    }
    assert_eq!(kinds.len(), 2);
    // Random crop: a contiguous 8-column window of the source, at more than one offset.
    let rand = Dataset::scan(&DatasetOptions { center_crop: false, ..o }).unwrap();
    let src = |x: usize| {
        [[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, 1.0]][x / 4]
    };
    let mut offsets = HashSet::new();
    for seed in 0..32 {
        let a = rand.load(0, &mut Rng::new(seed)).unwrap();
        let off = (0..=8).find(|&x0| (0..8).all(|x| column(&a, x) == src(x0 + x))).expect("not a window of the source");
        offsets.insert(off);
    }
    assert!(offsets.len() > 2, "{offsets:?}");
}

#[test]
fn sixteen_bit_png_keeps_range() {
    let t = Temp::new("16bit");
    let img: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_fn(16, 16, |x, _| Luma([if x < 8 { 0 } else { 65535 }]));
    img.save(t.0.join("g16.png")).unwrap();
    let ds = Dataset::scan(&DatasetOptions { resolution: 16, caption: Some("x".into()), ..DatasetOptions::new(&t.0) }).unwrap();
    let ex = ds.load(0, &mut Rng::new(0)).unwrap();
    assert_eq!(column(&ex, 0), [-1.0; 3]);
    assert_eq!(column(&ex, 15), [1.0; 3]);
}

#[test]
fn buckets_for_wide_and_tall_images() {
    let b = bucket_sizes(512, 256, 1024, 64);
    assert!(b.contains(&(512, 512)) && b.contains(&(704, 320)) && b.contains(&(320, 704)) && b.contains(&(1024, 256)));
    assert!(b.iter().all(|&(w, h)| w % 64 == 0 && h % 64 == 0 && w * h <= 512 * 512 && (256..=1024).contains(&w) && (256..=1024).contains(&h)));

    let t = Temp::new("buckets");
    RgbImage::from_pixel(1024, 512, Rgb([10, 20, 30])).save(t.0.join("wide.png")).unwrap();
    RgbImage::from_pixel(300, 600, Rgb([10, 20, 30])).save(t.0.join("tall.png")).unwrap();
    RgbImage::from_pixel(600, 600, Rgb([10, 20, 30])).save(t.0.join("square.png")).unwrap();
    let o = DatasetOptions { buckets: true, caption: Some("x".into()), repeats: 3, ..DatasetOptions::new(&t.0) };
    let ds = Dataset::scan(&o).unwrap();
    assert_eq!(names(&ds), ["square.png", "tall.png", "wide.png"]);
    // Closest aspect ratio: 2.0 -> 704x320 (2.2; 640x384 is 1.67), 0.5 -> 320x704.
    assert_eq!(ds.target_size(0), (512, 512));
    assert_eq!(ds.target_size(1), (320, 704));
    assert_eq!(ds.target_size(2), (704, 320));
    let ex = ds.load(2, &mut Rng::new(0)).unwrap();
    assert_eq!((ex.width, ex.height, ex.pixels.len()), (704, 320, 704 * 320 * 3));
    assert_eq!(ds.summary().buckets.len(), 3);
    // Batches never mix buckets.
    for batch in ds.epoch_order(0, 1, 2) {
        assert!(batch.iter().all(|&i| ds.target_size(i) == ds.target_size(batch[0])), "{batch:?}");
    }
    // Without buckets, everything is square.
    let sq = Dataset::scan(&DatasetOptions { buckets: false, ..o }).unwrap();
    assert!((0..3).all(|i| sq.target_size(i) == (512, 512)));
    assert_eq!(sq.load(2, &mut Rng::new(0)).unwrap().width, 512);
}

#[test]
fn epoch_order_is_seeded_and_complete() {
    let t = Temp::new("order");
    let (root, prompts) = make_dataset(&t);
    let ds = Dataset::scan(&DatasetOptions { repeats: 3, prompts_file: Some(prompts), ..opts(&root) }).unwrap();
    let a = ds.epoch_order(0, 42, 4);
    assert_eq!(a, ds.epoch_order(0, 42, 4));
    assert_ne!(a, ds.epoch_order(1, 42, 4));
    assert_ne!(a, ds.epoch_order(0, 43, 4));
    // 6 images x 3 repeats = 18: four batches of 4 and one of 2, each image 3 times.
    let mut sizes: Vec<usize> = a.iter().map(Vec::len).collect();
    sizes.sort();
    assert_eq!(sizes, [2, 4, 4, 4, 4]);
    let mut count = vec![0; ds.len()];
    a.iter().flatten().for_each(|&i| count[i] += 1);
    assert_eq!(count, [3; 6]);
    // batch size 0 counts as 1; example_rng is a pure function of its inputs.
    assert_eq!(ds.epoch_order(2, 1, 0).len(), 18);
    assert_eq!(Dataset::example_rng(1, 2, 3, 4), Dataset::example_rng(1, 2, 3, 4));
    assert_ne!(Dataset::example_rng(1, 2, 3, 4), Dataset::example_rng(1, 2, 3, 5));
}

#[test]
fn errors_name_the_problem() {
    let t = Temp::new("errors");
    let empty = t.0.join("empty");
    fs::create_dir_all(empty.join("sub")).unwrap();
    fs::write(empty.join("readme.txt"), "hi").unwrap();
    let e = Dataset::scan(&opts(&empty)).unwrap_err().to_string();
    assert!(e.contains("no images in") && e.contains("empty") && e.contains(".png"), "{e}");

    let e = Dataset::scan(&opts(&t.0.join("missing"))).unwrap_err().to_string();
    assert!(e.contains("no such folder"), "{e}");

    let bad = t.0.join("bad");
    fs::create_dir_all(&bad).unwrap();
    fs::write(bad.join("x.jpg"), b"nope").unwrap();
    gradient(4, 4).save(bad.join("y.png")).unwrap();
    let e = Dataset::scan(&opts(&bad)).unwrap_err().to_string();
    assert!(e.contains("no usable images in") && e.contains("2 files skipped: 1 unreadable, 1 too small"), "{e}");

    let e = Dataset::scan(&DatasetOptions { resolution: 30, ..opts(&bad) }).unwrap_err().to_string();
    assert!(e.contains("multiple of 8"), "{e}");
    let e = Dataset::scan(&DatasetOptions { repeats: 0, ..opts(&bad) }).unwrap_err().to_string();
    assert!(e.contains("--repeats"), "{e}");

    let p = t.0.join("p.txt");
    fs::write(&p, "# only a comment\n\n").unwrap();
    let e = Dataset::scan(&DatasetOptions { prompts_file: Some(p), ..opts(&bad) }).unwrap_err().to_string();
    assert!(e.contains("p.txt") && e.contains("no prompts"), "{e}");
}

/// The prefetcher hands over exactly what `Dataset::load` gives for a center crop: images
/// scheduled ahead (more than its lookahead), one taken before its turn, one never scheduled,
/// one taken twice (the second time loaded anew), and an image that fails to decode (its error
/// at its turn, the others unaffected).
#[test]
fn prefetched_images_equal_loaded_ones() {
    use atelier::train::prefetch::{Prefetcher, LOOKAHEAD};
    let t = Temp::new("prefetch");
    let root = t.0.join("images");
    fs::create_dir_all(&root).unwrap();
    let n = LOOKAHEAD + 6;
    for i in 0..n {
        RgbImage::from_fn(40 + i as u32, 36, |x, y| Rgb([(x * 5 + i as u32) as u8, (y * 7) as u8, (i * 11) as u8])).save(root.join(format!("i{i:02}.png"))).unwrap();
    }
    let ds = Dataset::scan(&DatasetOptions { caption: Some("x".into()), ..opts(&root) }).unwrap();
    assert_eq!(ds.len(), n);
    let direct = |i: usize| ds.load(i, &mut Rng::new(0)).unwrap().pixels;
    let p = Prefetcher::new(&ds).expect("a thread");
    p.schedule((0..n - 1).rev());
    let mut order: Vec<usize> = (0..n - 1).rev().collect();
    order.swap(2, 9); // one taken before its turn, one after
    order.push(n - 1); // never scheduled
    order.push(order[0]); // again
    for i in order {
        assert!(p.take(i).unwrap().pixels == direct(i), "image {i} differs from Dataset::load");
    }
    drop(p);
    // A file that stops decoding after the scan: its error comes with its turn.
    fs::write(root.join("i03.png"), b"not a png any more").unwrap();
    let p = Prefetcher::new(&ds).unwrap();
    p.schedule(0..n);
    for i in 0..n {
        match p.take(i) {
            Ok(ex) => assert!(i != 3 && ex.pixels == direct(i)),
            Err(e) => assert!(i == 3 && e.to_string().contains("i03.png"), "image {i}: {e}"),
        }
    }
}
