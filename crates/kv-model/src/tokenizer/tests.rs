//! Unit tests for the byte-level BPE: the byte alphabet, pre-tokenization edge cases, merge
//! order, round trips, and construction from GGUF metadata.

use super::*;
use crate::gguf::tests::GgufWriter;

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [&str; 7] = ["Ġ t", "h e", "Ġt he", "b c", "a b", "a a", "Ċ Ċ"];

/// Specials, then the 256 byte tokens in byte order, then one token per merge.
fn vocab() -> Vec<String> {
    let mut v: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    v.extend(byte_to_char_table().iter().map(|c| c.to_string()));
    v.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    v
}

fn tokenizer(pre: PreTokenizer) -> Tokenizer {
    let merges: Vec<String> = MERGES.iter().map(|s| s.to_string()).collect();
    Tokenizer::new(vocab(), &merges, pre, Some(0), Some(2)).unwrap()
}

fn tokens(t: &Tokenizer, text: &str) -> Vec<String> {
    t.encode(text)
        .iter()
        .map(|&id| t.id_to_token(id).unwrap().to_owned())
        .collect()
}

#[test]
fn byte_alphabet_is_gpt2s() {
    let table = byte_to_char_table();
    assert_eq!(table[usize::from(b' ')], 'Ġ');
    assert_eq!(table[usize::from(b'\n')], 'Ċ');
    assert_eq!(table[usize::from(b'a')], 'a');
    assert_eq!(table[0], '\u{100}');
    assert_eq!(table[0xAD], '\u{143}');
    let mut sorted = table.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 256, "the map is injective");
}

#[test]
fn smollm_pre_tokenizer_isolates_digits_and_splits_space_runs() {
    let t = tokenizer(PreTokenizer::DigitsThenGpt2);
    assert_eq!(
        t.pre_tokenize_to_vec("Hello  world 123\n\nIt's"),
        [
            "Hello", " ", " world", " ", "1", "2", "3", "\n", "\n", "It", "'s"
        ]
    );
    assert_eq!(
        t.pre_tokenize_to_vec("Chapter 1\n\n\nIt"),
        ["Chapter", " ", "1", "\n\n", "\n", "It"]
    );
    // Trailing whitespace stays whole; punctuation takes one leading space.
    assert_eq!(t.pre_tokenize_to_vec("a  "), ["a", "  "]);
    assert_eq!(
        t.pre_tokenize_to_vec("ok ...!  --"),
        ["ok", " ...!", " ", " --"]
    );
    // Contractions are lower-case only; "’" is punctuation.
    assert_eq!(
        t.pre_tokenize_to_vec("I'M don't"),
        ["I", "'", "M", " don", "'t"]
    );
    assert_eq!(t.pre_tokenize_to_vec("x\u{2019}s"), ["x", "\u{2019}", "s"]);
    // Non-ASCII letters and numerals: "½" and "Ⅻ" are \p{N}.
    assert_eq!(t.pre_tokenize_to_vec("é½Ⅻ"), ["é", "½", "Ⅻ"]);
    assert_eq!(t.pre_tokenize_to_vec(""), Vec::<&str>::new());
}

#[test]
fn gpt2_pre_tokenizer_keeps_numbers_together() {
    let t = tokenizer(PreTokenizer::Gpt2);
    assert_eq!(t.pre_tokenize_to_vec("abc 123 x"), ["abc", " 123", " x"]);
    assert_eq!(t.pre_tokenize_to_vec(" \t\nx"), [" \t", "\n", "x"]);
}

#[test]
fn pieces_tile_the_input() {
    let t = tokenizer(PreTokenizer::DigitsThenGpt2);
    let text = "  Mr. Bennet's 2 daughters\u{a0}\u{a0}—“no!”\r\n\t 42  ";
    assert_eq!(t.pre_tokenize_to_vec(text).concat(), text);
}

#[test]
fn bpe_applies_lowest_rank_first_and_leftmost_on_ties() {
    let t = tokenizer(PreTokenizer::DigitsThenGpt2);
    assert_eq!(tokens(&t, " the"), ["Ġthe"]);
    assert_eq!(tokens(&t, "the"), ["t", "he"]);
    // "b c" (rank 3) beats "a b" (rank 4).
    assert_eq!(tokens(&t, "abc"), ["a", "bc"]);
    assert_eq!(tokens(&t, "ab"), ["ab"]);
    assert_eq!(tokens(&t, "aaa"), ["aa", "a"]);
    assert_eq!(tokens(&t, "aaaa"), ["aa", "aa"]);
    assert_eq!(tokens(&t, "\n\n\nthe"), ["ĊĊ", "Ċ", "t", "he"]);
}

#[test]
fn bytes_missing_from_the_vocabulary_are_dropped_before_merging() {
    let mut v = vocab();
    v.retain(|s| s != "x" && s != "\u{100}");
    let merges: Vec<String> = MERGES.iter().map(|s| s.to_string()).collect();
    let t = Tokenizer::new(v, &merges, PreTokenizer::DigitsThenGpt2, None, None).unwrap();
    // "x" is gone, so "a" and "b" meet and merge (rank 4), as in HF.
    assert_eq!(tokens(&t, "axb"), ["ab"]);
    assert_eq!(tokens(&t, "x"), Vec::<String>::new());
    assert_eq!(t.decode(&t.encode("a\0b")).unwrap(), "ab");
}

#[test]
fn encode_decode_round_trips_any_text() {
    let t = tokenizer(PreTokenizer::DigitsThenGpt2);
    for text in [
        "",
        "the theme",
        "naïve café 😀 日本語 1999",
        "\0\u{7f}\u{ffff}",
        "<|im_start|>",
    ] {
        let ids = t.encode(text);
        assert_eq!(t.decode(&ids).unwrap(), text);
    }
    // Special tokens in text are plain characters; their ids decode to their text.
    assert!(!t.encode("<|endoftext|>").contains(&0));
    assert_eq!(t.decode(&[0, 1]).unwrap(), "<|endoftext|><|im_start|>");
}

#[test]
fn decode_errors_and_lossy_decoding() {
    let t = tokenizer(PreTokenizer::DigitsThenGpt2);
    assert!(matches!(
        t.decode(&[100_000]),
        Err(ModelError::UnknownTokenId { id: 100_000, .. })
    ));
    let euro = t.encode("€");
    assert_eq!(euro.len(), 3);
    assert!(matches!(
        t.decode(&euro[..2]),
        Err(ModelError::InvalidUtf8(_))
    ));
    assert_eq!(t.decode_lossy(&euro[..2]).unwrap(), "\u{FFFD}");
}

#[test]
fn accessors() {
    let t = tokenizer(PreTokenizer::DigitsThenGpt2);
    assert_eq!(t.vocab_size(), 3 + 256 + MERGES.len());
    assert_eq!(t.merges_len(), MERGES.len());
    assert_eq!((t.bos_id(), t.eos_id()), (Some(0), Some(2)));
    assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(
        t.token_to_id("Ġthe").and_then(|id| t.id_to_token(id)),
        Some("Ġthe")
    );
    assert_eq!(t.token_to_id("zzz"), None);
    assert!(format!("{t:?}").contains("vocab_size"));
}

#[test]
fn inconsistent_vocabularies_are_rejected() {
    let merges = |m: &[&str]| m.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let pre = PreTokenizer::Gpt2;
    let err = |r: Result<Tokenizer>| match r {
        Err(e) => e,
        Ok(_) => panic!("expected an error"),
    };
    assert!(matches!(
        err(Tokenizer::new(vocab(), &merges(&["x"]), pre, None, None)),
        ModelError::Tokenizer { .. }
    ));
    assert!(matches!(
        err(Tokenizer::new(vocab(), &merges(&["q z"]), pre, None, None)),
        ModelError::Tokenizer { .. }
    ));
    assert!(matches!(
        err(Tokenizer::new(vocab(), &[], pre, Some(10_000), None)),
        ModelError::UnknownTokenId { id: 10_000, .. }
    ));
}

fn gguf_with(model: &str, pre: Option<&str>) -> GgufFile {
    let mut w = GgufWriter::new();
    w.kv_str("tokenizer.ggml.model", model);
    if let Some(pre) = pre {
        w.kv_str("tokenizer.ggml.pre", pre);
    }
    w.kv_str_array("tokenizer.ggml.tokens", &vocab())
        .kv_str_array("tokenizer.ggml.merges", &MERGES)
        .kv_u32("tokenizer.ggml.bos_token_id", 1)
        .kv_u32("tokenizer.ggml.eos_token_id", 2)
        .kv_bool("tokenizer.ggml.add_bos_token", false);
    GgufFile::from_bytes(w.finish()).unwrap()
}

#[test]
fn from_gguf_reads_the_metadata() {
    let t = Tokenizer::from_gguf(&gguf_with("gpt2", Some("smollm"))).unwrap();
    assert_eq!(t.pre_tokenizer(), PreTokenizer::DigitsThenGpt2);
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.add_bos_token()),
        (Some(1), Some(2), false)
    );
    assert_eq!(tokens(&t, " the 12"), ["Ġthe", "Ġ", "1", "2"]);
    let t = Tokenizer::from_gguf(&gguf_with("gpt2", None)).unwrap();
    assert_eq!(t.pre_tokenizer(), PreTokenizer::Gpt2);
    assert!(matches!(
        Tokenizer::from_gguf(&gguf_with("llama", Some("smollm"))),
        Err(ModelError::Tokenizer { .. })
    ));
    assert!(matches!(
        Tokenizer::from_gguf(&gguf_with("gpt2", Some("qwen2"))),
        Err(ModelError::Tokenizer { detail, .. }) if detail == "qwen2"
    ));
}
