//! CLIP tokenizer tests: the embedded vocabulary, a diffusers `tokenizer/` folder (vocab.json +
//! merges.txt) and a tokenizer.json folder must all give exactly the reference ids in
//! tests/fixtures/tokenizer_ids.json (transformers' slow CLIPTokenizer with ftfy; made by
//! tests/fixtures/make_tokenizer_fixtures.py); every encoding is 77 ids with `<|endoftext|>`
//! last; broken tokenizer folders give errors that name the file, never panics.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use atelier::Error;
use atelier::tokenizer::{self, BOS, ClipTokenizer, EOS, MAX_LEN, VOCAB_SIZE};
use serde_json::Value;

// The trainer's data loader shares one tokenizer between threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ClipTokenizer>();
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

fn reference() -> &'static Value {
    static REF: OnceLock<Value> = OnceLock::new();
    REF.get_or_init(|| {
        let text = std::fs::read_to_string(fixtures().join("tokenizer_ids.json")).expect("reading tokenizer_ids.json");
        serde_json::from_str(&text).expect("parsing tokenizer_ids.json")
    })
}

fn embedded() -> &'static ClipTokenizer {
    static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
    TOK.get_or_init(|| ClipTokenizer::embedded().expect("building the embedded tokenizer"))
}

fn folder() -> &'static ClipTokenizer {
    static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
    TOK.get_or_init(|| ClipTokenizer::from_folder(&fixtures().join("tokenizer")).expect("loading the fixture folder"))
}

/// (name, prompt, ids, ids_full, truncated) of one fixture prompt.
type Case = (String, String, Vec<u32>, Vec<u32>, bool);

/// The cases of one list in the fixture file.
fn entries(list: &str) -> Vec<Case> {
    let ids = |v: &Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let cases = reference()[list].as_array().unwrap_or_else(|| panic!("fixture has no {list}"));
    cases
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap().to_owned();
            (s("name"), s("prompt"), ids(&c["ids"]), ids(&c["ids_full"]), c["truncated"].as_bool().unwrap())
        })
        .collect()
}

/// Checks every reference case; reports all mismatches (name, first differing index) at once.
fn check_all(tok: &ClipTokenizer) {
    let cases = entries("cases");
    assert!(cases.len() >= 40, "expected the full prompt set, found {}", cases.len());
    let mut failures = Vec::new();
    for (name, prompt, ids, full, truncated) in &cases {
        let got_full = tok.encode_full(prompt).unwrap();
        let got = tok.encode(prompt).unwrap();
        if &got_full != full {
            failures.push(format!("{name}: encode_full {}", first_difference(&got_full, full)));
        }
        if &got != ids {
            failures.push(format!("{name}: encode {}", first_difference(&got, ids)));
        }
        if tok.is_truncated(prompt).unwrap() != *truncated {
            failures.push(format!("{name}: is_truncated should be {truncated}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} prompts differ ({}):\n{}",
        failures.len(),
        cases.len(),
        tok.source(),
        failures.join("\n")
    );
}

/// Where two id lists first differ, with a few ids of context.
fn first_difference(got: &[u32], want: &[u32]) -> String {
    let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    let window = |v: &[u32]| v[at.saturating_sub(3)..(at + 5).min(v.len())].to_vec();
    format!(
        "differs at {at} (lengths {} vs {}): got ..{:?}.., want ..{:?}..",
        got.len(),
        want.len(),
        window(got),
        window(want)
    )
}

#[test]
fn embedded_matches_reference_ids() {
    check_all(embedded());
}

#[test]
fn folder_matches_reference_ids() {
    check_all(folder());
    assert!(folder().source().ends_with("tokenizer"), "source: {}", folder().source());
}

#[test]
fn tokenizer_json_folder_matches_reference_ids() {
    let dir = temp_dir("json");
    let src = fixtures().join("tokenizer");
    let bpe = tokenizers::models::bpe::BPE::from_file(
        src.join("vocab.json").to_str().unwrap(),
        src.join("merges.txt").to_str().unwrap(),
    )
    .end_of_word_suffix("</w>".into())
    .unk_token("<|endoftext|>".into())
    .build()
    .unwrap();
    tokenizers::Tokenizer::new(bpe).save(dir.join("tokenizer.json"), false).unwrap();
    let tok = ClipTokenizer::from_folder(&dir).expect("loading a tokenizer.json folder");
    check_all(&tok);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn known_differences_from_ftfy_are_as_documented() {
    // Mojibake repair and HTML5-only entity names: atelier keeps the text as it is. If this
    // fails because atelier now matches ftfy, move the prompt into "cases".
    let known = entries("known_differences");
    assert!(!known.is_empty());
    for (i, (name, prompt, ids, full, _)) in known.iter().enumerate() {
        let reference_full = &reference()["known_differences"][i]["reference_ids_full"];
        for tok in [embedded(), folder()] {
            let got = tok.encode_full(prompt).unwrap();
            assert_eq!(&got, full, "{name}");
            assert_eq!(&tok.encode(prompt).unwrap(), ids, "{name}");
            assert_ne!(serde_json::json!(got), *reference_full, "{name} now matches ftfy");
        }
    }
}

#[test]
fn for_model_prefers_the_folder_and_falls_back_to_embedded() {
    assert_eq!(ClipTokenizer::for_model(None).unwrap().source(), embedded().source());
    let model = temp_dir("model");
    assert_eq!(ClipTokenizer::for_model(Some(&model)).unwrap().source(), embedded().source());
    let sub = model.join("tokenizer");
    std::fs::create_dir_all(&sub).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixtures().join("tokenizer").join(f), sub.join(f)).unwrap();
    }
    let tok = ClipTokenizer::for_model(Some(&model)).unwrap();
    assert_eq!(Path::new(tok.source()), sub);
    assert_eq!(tok.encode("a photo of a cat").unwrap(), embedded().encode("a photo of a cat").unwrap());
    // A broken tokenizer/ folder is an error, not a silent fallback.
    std::fs::write(sub.join("merges.txt"), "#version: 0.2\nnot a pair at all\n").unwrap();
    let err = ClipTokenizer::for_model(Some(&model)).unwrap_err().to_string();
    assert!(err.contains("merges.txt") && err.contains("not a pair"), "{err}");
    let _ = std::fs::remove_dir_all(&model);
}

#[test]
fn always_77_ids_with_eos_last_and_no_panics() {
    let mut prompts: Vec<String> = entries("cases").into_iter().map(|c| c.1).collect();
    prompts.extend([
        "\0\0\0".to_string(),
        "\u{1b}[".to_string(),
        "&#;&#x;&;&&&&#999999999999999999999999;&#xFFFFFFFFFFFFFFFFFFFFFFF;".to_string(),
        "\u{fffd}\u{ffff}\u{10ffff}\u{e000}\u{85}\u{2028}".to_string(),
        "<|endoftext|>".repeat(200),
        "<|startoftext|>".to_string(),
        "a".repeat(100_000),
        "ﬃ ＡＢＣ ".repeat(5_000),
        "word, ".repeat(20_000),
    ]);
    // Pseudo-random byte soup, decoded lossily: control characters, stray continuation bytes...
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..50 {
        let bytes: Vec<u8> = (0..300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        prompts.push(String::from_utf8_lossy(&bytes).into_owned());
    }
    for p in &prompts {
        let short: String = p.chars().take(40).collect();
        let full = embedded().encode_full(p).unwrap();
        let ids = embedded().encode(p).unwrap();
        assert_eq!(ids.len(), MAX_LEN, "{short:?}");
        assert_eq!((full[0], *full.last().unwrap()), (BOS, EOS), "{short:?}");
        assert!(full.iter().all(|&id| (id as usize) < VOCAB_SIZE), "{short:?}");
        if full.len() > MAX_LEN {
            assert_eq!(ids[..MAX_LEN - 1], full[..MAX_LEN - 1], "{short:?}");
            assert_eq!(ids[MAX_LEN - 1], EOS, "{short:?}");
        } else {
            assert_eq!(ids[..full.len()], full[..], "{short:?}");
            assert!(ids[full.len()..].iter().all(|&id| id == EOS), "{short:?}");
        }
    }
}

#[test]
fn truncation_keeps_eos_last() {
    let tok = embedded();
    let a = tok.encode_full("a").unwrap()[1];
    for (n, truncated) in [(74, false), (75, false), (76, true), (300, true)] {
        let prompt = "a ".repeat(n);
        let full = tok.encode_full(&prompt).unwrap();
        assert_eq!(full.len(), n + 2);
        assert_eq!(tok.is_truncated(&prompt).unwrap(), truncated, "{n} tokens");
        let ids = tok.encode(&prompt).unwrap();
        assert_eq!(ids[0], BOS);
        assert!(ids[1..n.min(75) + 1].iter().all(|&id| id == a), "{n} tokens");
        assert_eq!(ids[n.min(75) + 1], EOS, "{n} tokens");
        assert_eq!(ids.len(), MAX_LEN);
    }
    assert_eq!(tokenizer::pad_and_truncate(&[BOS, EOS]), [&[BOS][..], &[EOS; 76][..]].concat());
    assert_eq!(tok.encode("").unwrap(), [&[BOS][..], &[EOS; 76][..]].concat());
}

#[test]
fn broken_folders_give_clear_errors() {
    let expect_model_error = |dir: &Path, file: &str, words: &str| {
        let err = ClipTokenizer::from_folder(dir).expect_err("a broken folder must not load");
        let msg = err.to_string();
        assert!(matches!(err, Error::Model { .. } | Error::Io { .. }), "{msg}");
        assert!(msg.contains(file) && msg.contains(words), "error {msg:?} should name {file} and say {words:?}");
    };
    let src = fixtures().join("tokenizer");
    let vocab = std::fs::read_to_string(src.join("vocab.json")).unwrap();
    let merges = std::fs::read_to_string(src.join("merges.txt")).unwrap();

    let dir = temp_dir("broken");
    expect_model_error(&dir.join("nope"), "nope", "not found");
    expect_model_error(&dir, "vocab.json", "missing");
    std::fs::write(dir.join("vocab.json"), &vocab).unwrap();
    expect_model_error(&dir, "merges.txt", "missing");
    std::fs::write(dir.join("merges.txt"), &merges).unwrap();
    ClipTokenizer::from_folder(&dir).expect("the intact copy loads");

    std::fs::write(dir.join("vocab.json"), &vocab[..vocab.len() / 2]).unwrap();
    expect_model_error(&dir, "vocab.json", "not a CLIP vocab.json");
    std::fs::write(dir.join("vocab.json"), "[1, 2, 3]").unwrap();
    expect_model_error(&dir, "vocab.json", "not a CLIP vocab.json");
    // A merge whose parts aren't in the vocabulary.
    std::fs::write(dir.join("vocab.json"), &vocab).unwrap();
    std::fs::write(dir.join("merges.txt"), format!("#version: 0.2\nzzzqqq xxxyyy\n{merges}")).unwrap();
    expect_model_error(&dir, "merges.txt", "does not match vocab.json");
    // Cut in the middle of a line (a half-downloaded file), then at a line end.
    let cut = merges.char_indices().filter(|&(_, c)| c == ' ').nth(20_000).unwrap().0 + 1;
    std::fs::write(dir.join("merges.txt"), &merges[..cut]).unwrap();
    expect_model_error(&dir, "merges.txt", "not a pair of tokens");
    let cut = merges[..cut].rfind('\n').unwrap() + 1;
    std::fs::write(dir.join("merges.txt"), &merges[..cut]).unwrap();
    ClipTokenizer::from_folder(&dir).expect("fewer merges still load (as in the slow tokenizer)");
    // Special tokens with the wrong ids.
    std::fs::write(dir.join("merges.txt"), &merges).unwrap();
    std::fs::write(dir.join("vocab.json"), vocab.replace("\"<|endoftext|>\":49407", "\"<|endoftext|>\":7")).unwrap();
    expect_model_error(&dir, "<|endoftext|>", "49407");
    std::fs::write(
        dir.join("vocab.json"),
        vocab.replace("\"<|endoftext|>\":49407", "\"<|endoftext|>\":49407,\"zz\":50000"),
    )
    .unwrap();
    expect_model_error(&dir, "50000", "49408");
    // Non-UTF-8 bytes.
    std::fs::write(dir.join("vocab.json"), [0xffu8, 0xfe, 0x00]).unwrap();
    expect_model_error(&dir, "vocab.json", "");

    // tokenizer.json only: garbage, then a model that isn't CLIP's BPE.
    let json_dir = temp_dir("broken-json");
    std::fs::write(json_dir.join("tokenizer.json"), "{ not json").unwrap();
    expect_model_error(&json_dir, "tokenizer.json", "not a readable tokenizer.json");
    let wordlevel = tokenizers::models::wordlevel::WordLevel::builder().build().unwrap();
    tokenizers::Tokenizer::new(wordlevel).save(json_dir.join("tokenizer.json"), false).unwrap();
    expect_model_error(&json_dir, "tokenizer.json", "is not a CLIP tokenizer");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&json_dir);
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("atelier-tokenizer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
