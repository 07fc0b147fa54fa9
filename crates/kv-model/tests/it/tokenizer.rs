//! The real GGUF tokenizer against the fixture ids of *Pride and Prejudice* (kvpress's
//! `input_ids`: the book's first 512 tokens, no BOS, tokenized by HF from the same GGUF).

use kv_model::tokenizer::{PreTokenizer, Tokenizer};

use crate::{assets_dir, pride_and_prejudice_ids, real_model};

fn real_tokenizer() -> Option<Tokenizer> {
    real_model().map(|f| Tokenizer::from_gguf(f).unwrap())
}

#[test]
fn real_tokenizer_metadata() {
    let Some(t) = real_tokenizer() else { return };
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.pre_tokenizer(), PreTokenizer::DigitsThenGpt2);
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
    assert!(!t.add_bos_token());
    assert_eq!(t.id_to_token(1), Some("<|im_start|>"));
    assert_eq!(t.id_to_token(2), Some("<|im_end|>"));
    assert_eq!(t.token_to_id("Ċ"), Some(198));
    assert_eq!(t.encode(""), Vec::<u32>::new());
}

#[test]
fn fixture_ids_decode_and_reencode_exactly() {
    let (Some(t), Some(ids)) = (real_tokenizer(), pride_and_prejudice_ids()) else {
        return;
    };
    let text = t.decode(&ids).unwrap();
    assert!(
        text.starts_with("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\n\n\nChapter 1\n\n\nIt is a truth universally acknowledged"),
        "decoded: {:?}",
        &text[..80.min(text.len())]
    );
    assert_eq!(t.encode(&text), ids);
}

#[test]
fn book_text_encodes_to_the_fixture_ids() {
    let (Some(t), Some(ids)) = (real_tokenizer(), pride_and_prejudice_ids()) else {
        return;
    };
    let path = assets_dir().join("text/prideprejudice.txt");
    let Ok(book) = std::fs::read_to_string(&path) else {
        kv_testkit::missing_data(&format!(
            "{} is absent; run cargo xtask setup",
            path.display()
        ));
        return;
    };
    // 512 tokens of this prose are about 2,300 bytes; cut well past them at a line end.
    let mut end = book.len().min(6000);
    while !book.is_char_boundary(end) {
        end -= 1;
    }
    let cut = book[..end].rfind('\n').unwrap_or(end);
    let encoded = t.encode(&book[..cut]);
    assert!(encoded.len() > 512);
    assert_eq!(encoded[..512], ids[..]);
}

#[test]
fn whole_book_round_trips() {
    let Some(t) = real_tokenizer() else { return };
    let path = assets_dir().join("text/prideprejudice.txt");
    let Ok(book) = std::fs::read_to_string(&path) else {
        kv_testkit::missing_data(&format!(
            "{} is absent; run cargo xtask setup",
            path.display()
        ));
        return;
    };
    let start = std::time::Instant::now();
    let ids = t.encode(&book);
    eprintln!(
        "encoded {} bytes into {} tokens in {:?}",
        book.len(),
        ids.len(),
        start.elapsed()
    );
    assert_eq!(t.decode(&ids).unwrap(), book);
}
