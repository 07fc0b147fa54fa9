//! The GPT-2-style byte-level BPE tokenizer stored in a GGUF file (`tokenizer.ggml.*`).
//!
//! # Algorithm
//!
//! 1. **Pre-tokenization** splits the text into pieces that BPE never merges across.
//!    - Pre-tokenizer `"smollm"` (SmolLM/SmolLM2; Hugging Face's
//!      `Sequence[Digits(individual_digits), ByteLevel(use_regex)]`, llama.cpp's `SMOLLM`):
//!      every numeric character (`\p{N}`) becomes a piece of its own, and the text between them
//!      is split by the GPT-2 pattern below.
//!    - Pre-tokenizer `"gpt2"`: the GPT-2 pattern alone.
//!
//!    The GPT-2 pattern is
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`: so
//!    `"a  b"` splits as `"a"`, `" "`, `" b"` (a run of spaces gives its last space to the next
//!    word), and `"Chapter 1"` under `"smollm"` as `"Chapter"`, `" "`, `"1"`.
//! 2. **Byte-level mapping**: each UTF-8 byte of a piece starts as its own symbol (the GPT-2
//!    byte-to-unicode alphabet, `' '` ↔ `'Ġ'`, `'\n'` ↔ `'Ċ'`).
//! 3. **BPE**: repeatedly merge the adjacent pair with the lowest merge rank (leftmost first on
//!    ties) until no listed merge applies; each final symbol is a vocabulary token.
//!
//! # Bytes missing from the vocabulary
//!
//! A vocabulary may lack some of the 256 byte tokens (SmolLM2's lacks 21: the control bytes
//! 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, and 0xC0, 0xC1, 0xF1, 0xF2, 0xF5..=0xFF, most of which
//! never occur in UTF-8). Such bytes are dropped before merging, as Hugging Face's BPE does when
//! it has no unknown token, so `decode(encode(text))` loses them.
//!
//! # Special tokens
//!
//! [`Tokenizer::encode`] treats its input as plain text: control tokens written in the text
//! (`"<|im_start|>"`, `"<|endoftext|>"`) are tokenized as ordinary characters, not mapped to their
//! special ids, and no BOS is added. That is what perplexity on plain prose needs. Insert special
//! ids yourself (see [`Tokenizer::bos_id`], [`Tokenizer::token_to_id`]) when you need them.
//! [`Tokenizer::decode`] writes special tokens out as their text, as Hugging Face's `decode`
//! does without `skip_special_tokens`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

use regex::Regex;

use crate::gguf::GgufFile;
use crate::{ModelError, Result};

#[cfg(test)]
mod tests;

/// The GPT-2 pre-tokenization pattern without its `\s+(?!\S)` alternative, which the `regex`
/// crate cannot express; [`Tokenizer::split_gpt2`] applies that lookahead by hand.
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

/// How text is split before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PreTokenizer {
    /// The GPT-2 regex (`tokenizer.ggml.pre = "gpt2"`).
    Gpt2,
    /// Each numeric character alone, then the GPT-2 regex (`tokenizer.ggml.pre = "smollm"`).
    DigitsThenGpt2,
}

impl PreTokenizer {
    /// The pre-tokenizer for a `tokenizer.ggml.pre` name, or `None` if unsupported.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        match name {
            "gpt2" => Some(Self::Gpt2),
            "smollm" => Some(Self::DigitsThenGpt2),
            _ => None,
        }
    }
}

/// A byte-level BPE tokenizer (vocabulary, merge ranks, pre-tokenizer, special ids).
#[derive(Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    token_ids: HashMap<String, u32>,
    /// `(left, right) -> (rank, merged)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// The token id of each single byte, `None` for bytes the vocabulary lacks.
    byte_ids: [Option<u32>; 256],
    /// Inverse of the byte-to-unicode map, for decoding.
    char_to_byte: HashMap<char, u8>,
    pre: PreTokenizer,
    split: Regex,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("merges", &self.merges.len())
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    ///
    /// Reads `model` (must be `"gpt2"`, i.e. byte-level BPE), `pre` (`"smollm"` or `"gpt2"`;
    /// absent means `"gpt2"`), `tokens`, `merges`, and the optional `bos_token_id`,
    /// `eos_token_id` and `add_bos_token`.
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingMetadata`] / [`ModelError::MetadataType`] for absent or mistyped keys,
    /// and as [`Tokenizer::new`].
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer {
                what: "unsupported tokenizer model (only byte-level BPE, \"gpt2\")",
                detail: model.to_owned(),
            });
        }
        let pre_name = match file.metadata("tokenizer.ggml.pre") {
            None => "gpt2",
            Some(_) => file.get_str("tokenizer.ggml.pre")?,
        };
        let pre = PreTokenizer::from_gguf_name(pre_name).ok_or_else(|| ModelError::Tokenizer {
            what: "unsupported pre-tokenizer",
            detail: pre_name.to_owned(),
        })?;
        let opt_u32 = |key: &str| match file.metadata(key) {
            None => Ok(None),
            Some(_) => file.get_u32(key).map(Some),
        };
        let add_bos = match file.metadata("tokenizer.ggml.add_bos_token") {
            None => false,
            Some(_) => file.get_bool("tokenizer.ggml.add_bos_token")?,
        };
        let mut tok = Self::new(
            file.get_str_array("tokenizer.ggml.tokens")?.to_vec(),
            file.get_str_array("tokenizer.ggml.merges")?,
            pre,
            opt_u32("tokenizer.ggml.bos_token_id")?,
            opt_u32("tokenizer.ggml.eos_token_id")?,
        )?;
        tok.add_bos = add_bos;
        Ok(tok)
    }

    /// Builds a tokenizer from its parts.
    ///
    /// `tokens[i]` is the byte-level string of token `i`; `merges[r]` is `"left right"`, the
    /// merge of rank `r` (lower merges first). When a token string or a merge pair occurs
    /// twice, the first occurrence wins. The vocabulary need not hold all 256 byte tokens:
    /// [`Tokenizer::encode`] drops bytes it lacks (see the module docs).
    ///
    /// # Errors
    ///
    /// [`ModelError::Tokenizer`] when a merge is not two space-separated tokens of the
    /// vocabulary whose concatenation is also in the vocabulary, or the vocabulary has more than
    /// `u32::MAX` entries;
    /// [`ModelError::UnknownTokenId`] when `bos` or `eos` is outside the vocabulary.
    pub fn new(
        tokens: Vec<String>,
        merges: &[String],
        pre: PreTokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Self> {
        if u32::try_from(tokens.len()).is_err() {
            return Err(ModelError::Tokenizer {
                what: "vocabulary too large",
                detail: tokens.len().to_string(),
            });
        }
        let mut token_ids = HashMap::with_capacity(tokens.len());
        for (id, t) in (0u32..).zip(&tokens) {
            token_ids.entry(t.clone()).or_insert(id);
        }
        let byte_chars = byte_to_char_table();
        let byte_ids =
            byte_chars.map(|c| token_ids.get(c.encode_utf8(&mut [0; 4]) as &str).copied());
        let char_to_byte = (0u8..=255).zip(byte_chars).map(|(b, c)| (c, b)).collect();

        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in (0u32..).zip(merges) {
            let bad = || ModelError::Tokenizer {
                what: "merge is not two vocabulary tokens whose concatenation is one too",
                detail: m.clone(),
            };
            let (a, b) = m.split_once(' ').ok_or_else(bad)?;
            let a_id = *token_ids.get(a).ok_or_else(bad)?;
            let b_id = *token_ids.get(b).ok_or_else(bad)?;
            let merged = *token_ids.get(&format!("{a}{b}")).ok_or_else(bad)?;
            merge_map.entry((a_id, b_id)).or_insert((rank, merged));
        }

        let vocab_size = tokens.len();
        for id in [bos, eos].into_iter().flatten() {
            if id as usize >= vocab_size {
                return Err(ModelError::UnknownTokenId { id, vocab_size });
            }
        }
        let split = Regex::new(GPT2_PATTERN).map_err(|e| ModelError::Tokenizer {
            what: "pre-tokenizer pattern does not compile",
            detail: e.to_string(),
        })?;
        Ok(Self {
            tokens,
            token_ids,
            merges: merge_map,
            byte_ids,
            char_to_byte,
            pre,
            split,
            bos,
            eos,
            add_bos: false,
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Number of merge rules.
    pub fn merges_len(&self) -> usize {
        self.merges.len()
    }

    /// The beginning-of-sequence id, if the file names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence id, if the file names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model expects a BOS at the start of a prompt (`tokenizer.ggml.add_bos_token`).
    /// [`Tokenizer::encode`] never adds one.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// The pre-tokenizer in use.
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// The id of the token whose (byte-level) string is `token`, such as `"Ġthe"` or
    /// `"<|endoftext|>"`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.token_ids.get(token).copied()
    }

    /// The (byte-level) string of token `id`.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Tokenizes plain text: no BOS, no special-token parsing (see the module docs).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        self.pre_tokenize(text, |piece| self.bpe(piece, &mut ids));
        ids
    }

    /// The pre-tokenized pieces of `text` (step 1 of the algorithm), mainly for tests.
    pub fn pre_tokenize_to_vec<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = Vec::new();
        self.pre_tokenize(text, |p| pieces.push(p));
        pieces
    }

    /// The bytes that `ids` stand for.
    ///
    /// # Errors
    ///
    /// [`ModelError::UnknownTokenId`] for an id outside the vocabulary.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let token = self.id_to_token(id).ok_or(ModelError::UnknownTokenId {
                id,
                vocab_size: self.tokens.len(),
            })?;
            for c in token.chars() {
                match self.char_to_byte.get(&c) {
                    Some(&b) => bytes.push(b),
                    // Not a byte-level character (only in added tokens): keep it as text.
                    None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        }
        Ok(bytes)
    }

    /// The text that `ids` stand for.
    ///
    /// # Errors
    ///
    /// [`ModelError::UnknownTokenId`] for an id outside the vocabulary, and
    /// [`ModelError::InvalidUtf8`] when the bytes are not UTF-8 (for example when `ids` ends in
    /// the middle of a multi-byte character); use [`Tokenizer::decode_lossy`] for streaming.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8(self.decode_bytes(ids)?)?)
    }

    /// The text that `ids` stand for, with invalid UTF-8 replaced by `U+FFFD`.
    ///
    /// # Errors
    ///
    /// [`ModelError::UnknownTokenId`] for an id outside the vocabulary.
    pub fn decode_lossy(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// Calls `emit` on each pre-tokenized piece of `text`, in order; the pieces tile `text`.
    fn pre_tokenize<'t>(&self, text: &'t str, mut emit: impl FnMut(&'t str)) {
        match self.pre {
            PreTokenizer::Gpt2 => self.split_gpt2(text, &mut emit),
            PreTokenizer::DigitsThenGpt2 => {
                let mut start = 0;
                for (i, c) in text.char_indices() {
                    if c.is_numeric() {
                        if let Some(before) = text.get(start..i) {
                            self.split_gpt2(before, &mut emit);
                        }
                        let end = i + c.len_utf8();
                        if let Some(digit) = text.get(i..end) {
                            emit(digit);
                        }
                        start = end;
                    }
                }
                if let Some(rest) = text.get(start..) {
                    self.split_gpt2(rest, &mut emit);
                }
            }
        }
    }

    /// Splits `text` by the GPT-2 pattern, including the `\s+(?!\S)` lookahead: a whitespace
    /// run of two or more characters followed by a non-space leaves its last character to the
    /// next piece.
    fn split_gpt2<'t>(&self, text: &'t str, emit: &mut impl FnMut(&'t str)) {
        let mut pos = 0;
        while pos < text.len() {
            let Some(m) = self.split.find_at(text, pos) else {
                // Unreachable with this pattern (it matches every character); keep the bytes.
                if let Some(rest) = text.get(pos..) {
                    emit(rest);
                }
                return;
            };
            if m.start() > pos
                && let Some(gap) = text.get(pos..m.start())
            {
                emit(gap);
            }
            let mut end = m.end();
            let piece = m.as_str();
            if end < text.len() && piece.chars().all(char::is_whitespace) {
                // `\s+` stopped before a non-space: `\s+(?!\S)` would have matched one less.
                if let Some((last, _)) = piece.char_indices().next_back().filter(|&(i, _)| i > 0) {
                    end = m.start() + last;
                }
            }
            if let Some(p) = text.get(m.start()..end) {
                emit(p);
            }
            pos = end;
        }
    }

    /// Appends the BPE token ids of one pre-tokenized piece to `out`.
    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        let bytes = piece.as_bytes();
        if let [b] = bytes {
            out.extend(self.byte_ids[usize::from(*b)]);
            return;
        }
        // Bytes missing from the vocabulary are dropped before merging (HF's BPE without an
        // unknown token does the same), so their neighbours become adjacent.
        let mut ids: Vec<u32> = bytes
            .iter()
            .filter_map(|&b| self.byte_ids[usize::from(b)])
            .collect();
        let n = ids.len();
        if n == 0 {
            return;
        }
        // A doubly linked list of symbols; merged-away symbols are marked dead.
        let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut alive = vec![true; n];
        // Min-heap on (rank, left position); entries are re-validated when popped.
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, ids: &[u32], i: usize, j: usize| {
            if let Some(&(rank, _)) = self.merges.get(&(ids[i], ids[j])) {
                heap.push(Reverse((rank, i, ids[i], ids[j])));
            }
        };
        for i in 0..n.saturating_sub(1) {
            push(&mut heap, &ids, i, i + 1);
        }
        while let Some(Reverse((_, i, left, right))) = heap.pop() {
            let j = next[i];
            if !alive[i] || j == NONE || ids[i] != left || ids[j] != right {
                continue;
            }
            let Some(&(_, merged)) = self.merges.get(&(left, right)) else {
                continue;
            };
            ids[i] = merged;
            alive[j] = false;
            next[i] = next[j];
            if next[j] != NONE {
                prev[next[j]] = i;
            }
            if prev[i] != NONE {
                push(&mut heap, &ids, prev[i], i);
            }
            if next[i] != NONE {
                push(&mut heap, &ids, i, next[i]);
            }
        }
        let mut i = 0;
        while i != NONE {
            out.push(ids[i]);
            i = next[i];
        }
    }
}

/// GPT-2's byte-to-unicode table: printable Latin-1 bytes map to themselves, the other 68
/// bytes to `U+0100..`, in byte order.
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_extra = 256u32;
    for b in 0u8..=255 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            let c = next_extra;
            next_extra += 1;
            c
        };
        // Codes are below U+0200, all valid scalar values.
        table[usize::from(b)] = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}
