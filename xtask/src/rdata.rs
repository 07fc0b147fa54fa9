//! A small reader for R's XDR serialization format and R's lazy-load databases.
//!
//! R packages ship their data sets as a lazy-load database: `Rdata.rdx` is a gzip-compressed
//! serialization of an index, a named list whose `variables` element maps each variable name to
//! an `(offset, length)` pair in `Rdata.rdb`; each record there is a 4-byte big-endian
//! uncompressed length followed by a zlib stream holding the serialized value.
//!
//! Only what such databases of character vectors contain is supported: character, logical,
//! integer and double vectors, generic vectors, pairlists with tags and attributes, symbols,
//! references to symbols and `NULL`, in the binary XDR format ("X\n"), versions 2 and 3. Anything
//! else is rejected with an error. Every length read from the input is bounded by the input that
//! remains before anything is allocated, and nesting is bounded, so malformed input cannot panic
//! or exhaust memory.

use std::io::Read;
use std::rc::Rc;

use anyhow::{Context, Result, bail, ensure};
use flate2::read::{GzDecoder, ZlibDecoder};

/// Nesting depth beyond which input is rejected (R's own data never comes close).
const MAX_DEPTH: usize = 128;
/// Largest decompressed index or record accepted, in bytes.
const MAX_DECOMPRESSED: u64 = 256 << 20;
/// Largest number of elements preallocated for a list before its elements are read.
const MAX_PREALLOC: usize = 1024;

// SEXP type codes, from R's `Rinternals.h` and `serialize.c`.
const NILSXP: u8 = 0;
const SYMSXP: u8 = 1;
const LISTSXP: u8 = 2;
const CHARSXP: u8 = 9;
const LGLSXP: u8 = 10;
const INTSXP: u8 = 13;
const REALSXP: u8 = 14;
const STRSXP: u8 = 16;
const VECSXP: u8 = 19;
const EXPRSXP: u8 = 20;
const NILVALUE_SXP: u8 = 254;
const REFSXP: u8 = 255;

// Bits of the flags word.
const HAS_ATTR_BIT: u32 = 1 << 9;
const HAS_TAG_BIT: u32 = 1 << 10;

// Encoding bits of a CHARSXP's `levels` (flags >> 12).
const BYTES_MASK: u32 = 1 << 1;
const LATIN1_MASK: u32 = 1 << 2;
const UTF8_MASK: u32 = 1 << 3;
const ASCII_MASK: u32 = 1 << 6;

/// The value part of a deserialized R object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RValue {
    /// `NULL`.
    Null,
    /// A symbol (a name), shared between all references to it.
    Symbol(Rc<str>),
    /// A logical vector: 0, 1, or `i32::MIN` for `NA`.
    Logical(Vec<i32>),
    /// An integer vector (`i32::MIN` is `NA`).
    Integer(Vec<i32>),
    /// A double vector.
    Real(Vec<f64>),
    /// A character vector; `None` is `NA_character_`.
    Character(Vec<Option<String>>),
    /// A generic vector (`list()`) or expression vector.
    List(Vec<RObject>),
    /// A pairlist: its elements with their optional tags.
    PairList(Vec<(Option<Rc<str>>, RObject)>),
}

/// A deserialized R object: a value and its attributes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RObject {
    /// The value.
    pub(crate) value: RValue,
    /// The attributes, in order, by name.
    pub(crate) attributes: Vec<(Rc<str>, RObject)>,
}

impl RObject {
    fn plain(value: RValue) -> Self {
        Self {
            value,
            attributes: Vec::new(),
        }
    }

    /// The attribute called `name`, if present.
    pub(crate) fn attribute(&self, name: &str) -> Option<&RObject> {
        self.attributes
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v)
    }

    /// The elements of a generic vector paired with its `names` attribute.
    pub(crate) fn named_list(&self) -> Result<Vec<(&str, &RObject)>> {
        let RValue::List(items) = &self.value else {
            bail!("expected a list, found {}", self.value.kind());
        };
        let names = match self.attribute("names").map(|n| &n.value) {
            Some(RValue::Character(names)) => names.as_slice(),
            None if items.is_empty() => &[],
            None => bail!("list has no names"),
            Some(other) => bail!("list names are a {}, not a character vector", other.kind()),
        };
        ensure!(
            names.len() == items.len(),
            "list has {} elements but {} names",
            items.len(),
            names.len()
        );
        names
            .iter()
            .zip(items)
            .map(|(name, item)| Ok((name.as_deref().context("list has an NA name")?, item)))
            .collect()
    }
}

impl RValue {
    fn kind(&self) -> &'static str {
        match self {
            RValue::Null => "NULL",
            RValue::Symbol(_) => "symbol",
            RValue::Logical(_) => "logical vector",
            RValue::Integer(_) => "integer vector",
            RValue::Real(_) => "double vector",
            RValue::Character(_) => "character vector",
            RValue::List(_) => "list",
            RValue::PairList(_) => "pairlist",
        }
    }
}

/// Deserializes one R object from `bytes`, a complete XDR serialization ("X\n" header).
///
/// Trailing bytes after the object are an error.
pub(crate) fn unserialize(bytes: &[u8]) -> Result<RObject> {
    let mut r = Reader {
        buf: bytes,
        pos: 0,
        refs: Vec::new(),
        native_utf8: true,
        depth: 0,
    };
    r.header()?;
    let obj = r.item()?;
    ensure!(
        r.remaining() == 0,
        "{} trailing bytes after the serialized object",
        r.remaining()
    );
    Ok(obj)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The reference table: R adds symbols (and environments, which are unsupported) in order.
    refs: Vec<Rc<str>>,
    /// Whether strings without an encoding flag are UTF-8.
    native_utf8: bool,
    depth: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(
            n <= self.remaining(),
            "truncated input: need {n} bytes at offset {}, {} left",
            self.pos,
            self.remaining()
        );
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn int(&mut self) -> Result<i32> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn header(&mut self) -> Result<()> {
        let format = self.take(2)?;
        ensure!(
            format == b"X\n",
            "not an R XDR serialization (format bytes {format:?}; only \"X\\n\" is supported)"
        );
        let version = self.int()?;
        let _writer_version = self.int()?;
        let _min_reader_version = self.int()?;
        match version {
            2 => {}
            3 => {
                let n = self.int()?;
                let n = usize::try_from(n)
                    .ok()
                    .filter(|&n| n <= 64)
                    .with_context(|| format!("bad native-encoding name length {n}"))?;
                let name = self.take(n)?;
                self.native_utf8 =
                    name.eq_ignore_ascii_case(b"UTF-8") || name.eq_ignore_ascii_case(b"UTF8");
            }
            v => bail!("unsupported serialization version {v} (expected 2 or 3)"),
        }
        Ok(())
    }

    /// Reads a vector length and checks that `len * min_bytes_per_element` bytes remain.
    fn length(&mut self, min_bytes_per_element: usize) -> Result<usize> {
        let n = self.int()?;
        let len: u64 = match n {
            0.. => n as u64,
            -1 => {
                let upper = self.int()? as u32 as u64;
                let lower = self.int()? as u32 as u64;
                (upper << 32) | lower
            }
            _ => bail!("negative vector length {n}"),
        };
        let needed = len.checked_mul(min_bytes_per_element as u64);
        ensure!(
            needed.is_some_and(|b| b <= self.remaining() as u64),
            "vector length {len} exceeds the {} bytes of input left",
            self.remaining()
        );
        usize::try_from(len).context("vector length overflows usize")
    }

    fn item(&mut self) -> Result<RObject> {
        ensure!(self.depth < MAX_DEPTH, "nesting deeper than {MAX_DEPTH}");
        self.depth += 1;
        let flags = self.int()? as u32;
        let out = self.item_with_flags(flags);
        self.depth -= 1;
        out
    }

    fn item_with_flags(&mut self, flags: u32) -> Result<RObject> {
        let ty = (flags & 0xff) as u8;
        let has_attr = flags & HAS_ATTR_BIT != 0;
        match ty {
            NILVALUE_SXP => Ok(RObject::plain(RValue::Null)),
            REFSXP => {
                let packed = (flags >> 8) as usize;
                let index = if packed == 0 {
                    usize::try_from(self.int()?).context("negative reference index")?
                } else {
                    packed
                };
                let sym = index
                    .checked_sub(1)
                    .and_then(|i| self.refs.get(i))
                    .with_context(|| format!("reference {index} to an unknown object"))?;
                Ok(RObject::plain(RValue::Symbol(Rc::clone(sym))))
            }
            SYMSXP => {
                let name = self.item()?;
                let RValue::Character(mut v) = name.value else {
                    bail!("symbol name is not a string");
                };
                let name = v.pop().flatten().context("symbol name is NA or missing")?;
                let sym: Rc<str> = name.into();
                self.refs.push(Rc::clone(&sym));
                Ok(RObject::plain(RValue::Symbol(sym)))
            }
            LISTSXP => self.pairlist(flags),
            CHARSXP => {
                // A bare CHARSXP only occurs inside symbols and character vectors; represent it
                // as a one-element character vector.
                let s = self.charsxp_body(flags)?;
                if has_attr {
                    // R reads and ignores attributes on CHARSXPs.
                    self.item()?;
                }
                Ok(RObject::plain(RValue::Character(vec![s])))
            }
            LGLSXP | INTSXP => {
                let n = self.length(4)?;
                let ints = self
                    .take(n * 4)?
                    .chunks_exact(4)
                    .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let value = if ty == LGLSXP {
                    RValue::Logical(ints)
                } else {
                    RValue::Integer(ints)
                };
                self.with_attributes(value, has_attr)
            }
            REALSXP => {
                let n = self.length(8)?;
                let reals = self
                    .take(n * 8)?
                    .chunks_exact(8)
                    .map(|b| f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                    .collect();
                self.with_attributes(RValue::Real(reals), has_attr)
            }
            STRSXP => {
                // Each element is at least a flags word and a length.
                let n = self.length(8)?;
                let mut strings = Vec::with_capacity(n);
                for _ in 0..n {
                    let flags = self.int()? as u32;
                    ensure!(
                        (flags & 0xff) as u8 == CHARSXP,
                        "character vector element has type {}",
                        flags & 0xff
                    );
                    ensure!(flags & HAS_ATTR_BIT == 0, "attributes on a CHARSXP element");
                    strings.push(self.charsxp_body(flags)?);
                }
                self.with_attributes(RValue::Character(strings), has_attr)
            }
            VECSXP | EXPRSXP => {
                // Each element is at least a flags word.
                let n = self.length(4)?;
                let mut items = Vec::with_capacity(n.min(MAX_PREALLOC));
                for _ in 0..n {
                    items.push(self.item()?);
                }
                self.with_attributes(RValue::List(items), has_attr)
            }
            NILSXP => bail!("unexpected NILSXP (NULL is serialized as NILVALUE_SXP)"),
            other => bail!("unsupported R object type {other} (flags {flags:#x})"),
        }
    }

    fn with_attributes(&mut self, value: RValue, has_attr: bool) -> Result<RObject> {
        let attributes = if has_attr {
            self.attributes()?
        } else {
            Vec::new()
        };
        Ok(RObject { value, attributes })
    }

    /// Reads an attribute pairlist, whose elements must all be tagged.
    fn attributes(&mut self) -> Result<Vec<(Rc<str>, RObject)>> {
        let list = self.item()?;
        let RValue::PairList(items) = list.value else {
            bail!("attributes are a {}, not a pairlist", list.value.kind());
        };
        items
            .into_iter()
            .map(|(tag, v)| Ok((tag.context("attribute without a name")?, v)))
            .collect()
    }

    /// Reads a pairlist whose first node has `flags`; the CDR chain is read iteratively.
    fn pairlist(&mut self, mut flags: u32) -> Result<RObject> {
        let mut items = Vec::new();
        let mut attributes = Vec::new();
        loop {
            if flags & HAS_ATTR_BIT != 0 {
                ensure!(items.is_empty(), "attributes on an inner pairlist node");
                attributes = self.attributes()?;
            }
            let tag = if flags & HAS_TAG_BIT != 0 {
                let tag = self.item()?;
                let RValue::Symbol(sym) = tag.value else {
                    bail!("pairlist tag is a {}, not a symbol", tag.value.kind());
                };
                Some(sym)
            } else {
                None
            };
            let car = self.item()?;
            items.push((tag, car));
            flags = self.int()? as u32;
            match (flags & 0xff) as u8 {
                LISTSXP => continue,
                NILVALUE_SXP => break,
                other => bail!("pairlist ends in type {other}, not NULL"),
            }
        }
        Ok(RObject {
            value: RValue::PairList(items),
            attributes,
        })
    }

    fn charsxp_body(&mut self, flags: u32) -> Result<Option<String>> {
        let n = self.int()?;
        if n == -1 {
            return Ok(None);
        }
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.remaining())
            .with_context(|| {
                format!(
                    "string length {n} is negative or exceeds the {} bytes of input left",
                    self.remaining()
                )
            })?;
        let bytes = self.take(n)?;
        let levels = flags >> 12;
        let s = if levels & LATIN1_MASK != 0 {
            bytes.iter().map(|&b| char::from(b)).collect()
        } else if levels & BYTES_MASK != 0 {
            bail!("byte-encoded strings are not supported");
        } else if levels & (UTF8_MASK | ASCII_MASK) != 0 || self.native_utf8 || bytes.is_ascii() {
            String::from_utf8(bytes.to_vec()).context("string is not valid UTF-8")?
        } else {
            bail!("non-ASCII string in a non-UTF-8 native encoding");
        };
        Ok(Some(s))
    }
}

/// Decompresses at most `MAX_DECOMPRESSED` bytes from `reader`.
fn read_limited(reader: impl Read, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    reader
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("decompressing {what}"))?;
    ensure!(
        out.len() as u64 <= MAX_DECOMPRESSED,
        "{what} decompresses to more than {MAX_DECOMPRESSED} bytes"
    );
    Ok(out)
}

/// One variable of a lazy-load database: its name and where its record lies in the `.rdb`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// The variable's name.
    pub(crate) name: String,
    /// Byte offset of the record in the `.rdb` file.
    pub(crate) offset: u64,
    /// Byte length of the record.
    pub(crate) len: u64,
}

/// Reads a lazy-load index (the contents of an `.rdx` file: gzip, zlib or uncompressed).
///
/// Only zlib-compressed databases (`compressed = TRUE`) are supported.
pub(crate) fn read_index(rdx: &[u8]) -> Result<Vec<IndexEntry>> {
    let raw = match rdx {
        [0x1f, 0x8b, ..] => read_limited(GzDecoder::new(rdx), "gzip index")?,
        [b'X', b'\n', ..] => rdx.to_vec(),
        [0x78, ..] => read_limited(ZlibDecoder::new(rdx), "zlib index")?,
        _ => bail!("unrecognised .rdx format"),
    };
    let index = unserialize(&raw).context("reading the .rdx index")?;
    let parts = index.named_list()?;
    let part = |name: &str| {
        parts
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .with_context(|| format!("index has no `{name}` element"))
    };
    let compressed = match &part("compressed")?.value {
        RValue::Logical(v) | RValue::Integer(v) if v.len() == 1 => v[0],
        RValue::Real(v) if v.len() == 1 => v[0] as i32,
        other => bail!("index `compressed` is a {}", other.kind()),
    };
    ensure!(
        compressed == 1,
        "unsupported lazy-load compression {compressed} (only zlib, TRUE, is supported)"
    );
    part("variables")?
        .named_list()?
        .into_iter()
        .map(|(name, pos)| {
            let (offset, len) = match &pos.value {
                RValue::Integer(v) if v.len() == 2 => {
                    (u64::try_from(v[0]).ok(), u64::try_from(v[1]).ok())
                }
                RValue::Real(v) if v.len() == 2 => (real_to_u64(v[0]), real_to_u64(v[1])),
                other => bail!("index entry `{name}` is a {}", other.kind()),
            };
            match (offset, len) {
                (Some(offset), Some(len)) => Ok(IndexEntry {
                    name: name.to_owned(),
                    offset,
                    len,
                }),
                _ => bail!("index entry `{name}` has a negative or non-integer position"),
            }
        })
        .collect()
}

fn real_to_u64(x: f64) -> Option<u64> {
    (x.fract() == 0.0 && (0.0..9.0e15).contains(&x)).then_some(x as u64)
}

/// Reads and deserializes the record of `entry` from the contents of an `.rdb` file.
pub(crate) fn read_record(rdb: &[u8], entry: &IndexEntry) -> Result<RObject> {
    let record = usize::try_from(entry.offset)
        .ok()
        .zip(usize::try_from(entry.len).ok())
        .and_then(|(start, len)| rdb.get(start..start.checked_add(len)?))
        .with_context(|| {
            format!(
                "record `{}` ({} bytes at {}) lies outside the {}-byte .rdb",
                entry.name,
                entry.len,
                entry.offset,
                rdb.len()
            )
        })?;
    let [a, b, c, d, stream @ ..] = record else {
        bail!("record `{}` is shorter than its header", entry.name);
    };
    let expected = u32::from_be_bytes([*a, *b, *c, *d]);
    ensure!(
        u64::from(expected) <= MAX_DECOMPRESSED,
        "record `{}` claims {expected} bytes uncompressed",
        entry.name
    );
    let raw = read_limited(
        ZlibDecoder::new(stream),
        &format!("record `{}`", entry.name),
    )?;
    ensure!(
        raw.len() == expected as usize,
        "record `{}` decompresses to {} bytes, header says {expected}",
        entry.name,
        raw.len()
    );
    unserialize(&raw).with_context(|| format!("deserializing record `{}`", entry.name))
}

/// The elements of a character vector (`None` is `NA`); other types are an error.
pub(crate) fn strings(obj: &RObject) -> Result<&[Option<String>]> {
    match &obj.value {
        RValue::Character(v) => Ok(v),
        other => bail!("expected a character vector, found a {}", other.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Builds serializations by hand.
    #[derive(Default)]
    struct W(Vec<u8>);

    impl W {
        fn header(version: i32) -> Self {
            let mut w = W(b"X\n".to_vec());
            w.int(version).int(0x0004_0201).int(0x0003_0500);
            if version == 3 {
                w.int(5).bytes(b"UTF-8");
            }
            w
        }
        fn int(&mut self, x: i32) -> &mut Self {
            self.0.extend_from_slice(&x.to_be_bytes());
            self
        }
        fn flags(&mut self, x: u32) -> &mut Self {
            self.int(x as i32)
        }
        fn bytes(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            self
        }
        fn charsxp(&mut self, s: Option<&str>) -> &mut Self {
            match s {
                None => self.flags(0x9).int(-1),
                Some(s) => self
                    .flags(0x0000_8009)
                    .int(s.len() as i32)
                    .bytes(s.as_bytes()),
            }
        }
        fn strsxp(&mut self, items: &[Option<&str>]) -> &mut Self {
            self.flags(0x10).int(items.len() as i32);
            for s in items {
                self.charsxp(*s);
            }
            self
        }
        fn symbol(&mut self, name: &str) -> &mut Self {
            self.flags(0x1).charsxp(Some(name))
        }
    }

    fn chars(v: &[Option<&str>]) -> RValue {
        RValue::Character(v.iter().map(|s| s.map(str::to_owned)).collect())
    }

    #[test]
    fn strsxp_round_trip_v2_and_v3() {
        let items = [Some("It is a truth"), None, Some(""), Some("caf\u{e9}")];
        for version in [2, 3] {
            let mut w = W::header(version);
            w.strsxp(&items);
            let obj = unserialize(&w.0).expect("valid input");
            assert_eq!(obj, RObject::plain(chars(&items)));
        }
    }

    #[test]
    fn latin1_strings_are_converted() {
        let mut w = W::header(2);
        w.flags(0x10)
            .int(1)
            .flags(0x0000_4009)
            .int(1)
            .bytes(&[0xe9]);
        let obj = unserialize(&w.0).expect("valid input");
        assert_eq!(obj.value, chars(&[Some("\u{e9}")]));
    }

    /// `list(a = 1:2, b = c(x = 2.5))` with a symbol reused through a reference.
    fn named_list_bytes() -> Vec<u8> {
        let mut w = W::header(3);
        w.flags(0x213).int(2);
        w.flags(0xd).int(2).int(1).int(2);
        w.flags(0x20e).int(1).bytes(&2.5f64.to_be_bytes());
        // attributes of `b`: pairlist(names = "x"); `names` is the first symbol, ref 1.
        w.flags(0x402)
            .symbol("names")
            .strsxp(&[Some("x")])
            .flags(0xfe);
        // attributes of the list: pairlist(names = c("a", "b")) via a packed reference.
        w.flags(0x402)
            .flags(0x1ff)
            .strsxp(&[Some("a"), Some("b")])
            .flags(0xfe);
        w.0
    }

    #[test]
    fn named_list_with_attributes_and_references() {
        let obj = unserialize(&named_list_bytes()).expect("valid input");
        let list = obj.named_list().expect("a named list");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].0, "a");
        assert_eq!(list[0].1.value, RValue::Integer(vec![1, 2]));
        assert_eq!(list[1].0, "b");
        assert_eq!(list[1].1.value, RValue::Real(vec![2.5]));
        let names = list[1].1.attribute("names").expect("names");
        assert_eq!(names.value, chars(&[Some("x")]));
    }

    #[test]
    fn truncated_input_is_an_error() {
        let full = named_list_bytes();
        unserialize(&full).expect("valid input");
        for n in 0..full.len() {
            assert!(unserialize(&full[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut w = W::header(2);
        w.strsxp(&[Some("abc")]);
        w.0.push(0);
        assert!(unserialize(&w.0).is_err(), "trailing byte");
    }

    #[test]
    fn absurd_lengths_are_errors_without_allocating() {
        for (ty, len) in [
            (STRSXP, i32::MAX),
            (VECSXP, i32::MAX),
            (INTSXP, i32::MAX),
            (REALSXP, i32::MAX),
            (CHARSXP, i32::MAX),
            (STRSXP, -2),
        ] {
            let mut w = W::header(2);
            w.flags(u32::from(ty)).int(len).int(0);
            let err = unserialize(&w.0).expect_err("absurd length");
            assert!(format!("{err:#}").contains("length"), "{err:#}");
        }
        // A long length (-1 followed by two words) of 2^62 elements.
        let mut w = W::header(2);
        w.flags(0x13).int(-1).int(0x4000_0000).int(0);
        assert!(unserialize(&w.0).is_err());
    }

    #[test]
    fn deep_nesting_is_an_error() {
        let mut w = W::header(2);
        for _ in 0..10_000 {
            w.flags(0x13).int(1);
        }
        w.flags(0xfe);
        let err = unserialize(&w.0).expect_err("too deep");
        assert!(format!("{err:#}").contains("nesting"), "{err:#}");
    }

    #[test]
    fn bad_references_and_types_are_errors() {
        let mut w = W::header(2);
        w.flags(0x5ff);
        assert!(unserialize(&w.0).is_err(), "dangling reference");
        let mut w = W::header(2);
        w.flags(0x4); // ENVSXP
        assert!(unserialize(&w.0).is_err(), "environment");
        let mut w = W::header(4);
        w.flags(0xfe);
        assert!(unserialize(&w.0).is_err(), "version 4");
        assert!(unserialize(b"A\n").is_err(), "ASCII format");
    }

    fn zlib(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).expect("in-memory write");
        e.finish().expect("in-memory write")
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).expect("in-memory write");
        e.finish().expect("in-memory write")
    }

    /// A database holding `book = c("line 1", "line 2")` and `other = "x"`.
    fn database() -> (Vec<u8>, Vec<u8>) {
        let mut rdb = Vec::new();
        let mut positions = Vec::new();
        for items in [&[Some("line 1"), Some("line 2")][..], &[Some("x")]] {
            let mut w = W::header(3);
            w.strsxp(items);
            let mut record = (w.0.len() as u32).to_be_bytes().to_vec();
            record.extend(zlib(&w.0));
            positions.push((rdb.len() as i32, record.len() as i32));
            rdb.extend(record);
        }
        let mut w = W::header(3);
        w.flags(0x213).int(3);
        w.flags(0x213).int(2);
        for (offset, len) in &positions {
            w.flags(0xd).int(2).int(*offset).int(*len);
        }
        w.flags(0x402)
            .symbol("names")
            .strsxp(&[Some("book"), Some("other")]);
        w.flags(0xfe);
        w.flags(0x213)
            .int(0)
            .flags(0x402)
            .flags(0x1ff)
            .strsxp(&[])
            .flags(0xfe);
        w.flags(0xa).int(1).int(1);
        w.flags(0x402).flags(0x1ff);
        w.strsxp(&[Some("variables"), Some("references"), Some("compressed")]);
        w.flags(0xfe);
        (gzip(&w.0), rdb)
    }

    #[test]
    fn lazy_load_database_round_trip() {
        let (rdx, rdb) = database();
        let index = read_index(&rdx).expect("valid index");
        let names: Vec<_> = index.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["book", "other"]);
        let book = read_record(&rdb, &index[0]).expect("valid record");
        assert_eq!(book.value, chars(&[Some("line 1"), Some("line 2")]));
        let mut beyond = index[1].clone();
        beyond.len += 1;
        assert!(read_record(&rdb, &beyond).is_err());
        beyond.offset = u64::MAX;
        assert!(read_record(&rdb, &beyond).is_err());
    }

    /// A tiny xorshift64* generator, so the fuzz test needs no dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn fuzz_random_and_mutated_input_never_panics() {
        let (rdx, rdb) = database();
        let rdx_raw = read_limited(GzDecoder::new(&rdx[..]), "test").expect("valid gzip");
        let seeds = [named_list_bytes(), rdx_raw, W::header(3).0];
        let index = read_index(&rdx).expect("valid index");
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for case in 0..4000 {
            let mut bytes = seeds[case % seeds.len()].clone();
            match rng.below(4) {
                // Pure noise after a valid header.
                0 => {
                    let len = rng.below(64);
                    bytes.extend((0..len).map(|_| rng.next() as u8));
                }
                // Flip a few bytes.
                1 => {
                    for _ in 0..=rng.below(4) {
                        let i = rng.below(bytes.len());
                        bytes[i] ^= rng.next() as u8 | 1;
                    }
                }
                // Overwrite a word with an extreme value.
                2 => {
                    let i = rng.below(bytes.len().saturating_sub(3).max(1));
                    let word: [u8; 4] = match rng.below(4) {
                        0 => [0x7f, 0xff, 0xff, 0xff],
                        1 => [0xff, 0xff, 0xff, 0xff],
                        2 => [0x80, 0, 0, 0],
                        _ => (rng.next() as u32).to_be_bytes(),
                    };
                    for (k, b) in word.into_iter().enumerate() {
                        if let Some(slot) = bytes.get_mut(i + k) {
                            *slot = b;
                        }
                    }
                }
                // Truncate.
                _ => bytes.truncate(rng.below(bytes.len() + 1)),
            }
            let _ = unserialize(&bytes);
            let _ = read_index(&bytes);
            let _ = read_index(&gzip(&bytes));
            // Corrupt the database file itself.
            let mut db = rdb.clone();
            let i = rng.below(db.len());
            db[i] ^= rng.next() as u8 | 1;
            for entry in &index {
                let _ = read_record(&db, entry);
            }
        }
    }
}
