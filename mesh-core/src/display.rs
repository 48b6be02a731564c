//! Untrusted values in error messages: quoted, escaped once, bounded.
//!
//! An error names the value that made it fail, and that value often comes
//! from a peer (an HBONE authority, a SPIFFE ID in a sign request, policy
//! YAML). So every parser shows such values through this module:
//!
//! - [`bounded`] / [`Shown`]: the value quoted and escaped once (`{:?}` of
//!   a `str`: control characters cannot forge log lines), cut after a
//!   number of input characters with `… (N bytes)` inside the quotes. The
//!   result has a fixed maximum length, [`bounded_len`].
//! - [`text`]: a message from a library (serde, x509-parser) that may quote
//!   input itself: control characters escaped, nothing else, cut with `…`
//!   after a number of bytes. At most [`text_len`] bytes.
//!
//! A value is shown once per message and escaped once: [`Shown`] prints the
//! same text for `{}` and `{:?}`, so formatting it again cannot escape it a
//! second time (`\\n` instead of `\n`). [`check_message`] is the property
//! the fuzz targets assert on every error message.

use std::fmt;

/// Input characters of one value an error message shows.
pub const MAX_SHOWN_CHARS: usize = 64;

/// Most bytes one input character takes once escaped (`\u{10ffff}`).
const MAX_ESCAPED_CHAR: usize = 10;
/// `… (` + the longest `usize` + ` bytes)`.
const CUT_SUFFIX_LEN: usize = '…'.len_utf8() + 2 + 20 + 7;

/// Longest text [`bounded`] returns for `max_chars`.
pub const fn bounded_len(max_chars: usize) -> usize {
    2 + MAX_ESCAPED_CHAR * max_chars + CUT_SUFFIX_LEN
}

/// Longest text [`text`] returns for `max_bytes`.
pub const fn text_len(max_bytes: usize) -> usize {
    max_bytes + '…'.len_utf8()
}

/// `value` quoted and escaped once, its first `max_chars` characters only:
/// `"evil\nhost:80"`, or `"aaaa… (10240 bytes)"` when it was cut.
pub fn bounded(value: &str, max_chars: usize) -> String {
    let end = value
        .char_indices()
        .nth(max_chars)
        .map_or(value.len(), |(i, _)| i);
    let mut out = format!("{:?}", &value[..end]);
    if end < value.len() {
        out.pop(); // the closing quote
        out.push_str(&format!("… ({} bytes)\"", value.len()));
    }
    out
}

/// A message from a library, which may quote input itself (serde's
/// ``unknown field `…` ``): control characters escaped, the rest as it is
/// (what the library escaped stays escaped once), cut with `…` before it
/// would pass `max_bytes`.
pub fn text(message: &str, max_bytes: usize) -> String {
    let mut out = String::new();
    for c in message.chars() {
        let before = out.len();
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
        if out.len() > max_bytes {
            out.truncate(before);
            out.push('…');
            break;
        }
    }
    out
}

/// An untrusted value as an error shows it: [`bounded`] to
/// [`MAX_SHOWN_CHARS`]. `{}` and `{:?}` print the same quoted text.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Shown(String);

impl Shown {
    pub fn new(value: &str) -> Self {
        Shown(bounded(value, MAX_SHOWN_CHARS))
    }

    /// The quoted, escaped text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The longest run of consecutive backslashes in `s`.
pub fn backslash_run(s: &str) -> usize {
    s.split(|c| c != '\\').map(str::len).max().unwrap_or(0)
}

/// What every error message built from untrusted input must satisfy (the
/// fuzz targets assert it): at most `max_len` bytes; no control character
/// (values are escaped); escaped no more than once. A value escaped once
/// turns a run of `r` backslashes into `2r`, plus one if an escape follows;
/// escaping twice doubles that again. `input_run` is the longest run of
/// backslashes the values shown could hold: [`backslash_run`] of raw
/// input, or the number of backslashes in an input whose strings are
/// decoded (JSON, YAML: every escape that makes a backslash starts with one).
pub fn check_message(message: &str, max_len: usize, input_run: usize) -> Result<(), String> {
    if message.len() > max_len {
        return Err(format!(
            "error message is {} bytes, over the bound of {max_len}: {}",
            message.len(),
            text(message, 300)
        ));
    }
    if message.chars().any(char::is_control) {
        return Err(format!(
            "error message holds a control character: {message:?}"
        ));
    }
    let run = backslash_run(message);
    if run > 2 * input_run + 1 {
        return Err(format!(
            "error message escapes a value twice: a run of {run} backslashes from input \
             with at most {input_run}: {message}"
        ));
    }
    Ok(())
}

/// The seed files of fuzz target `target`, `fuzz/seeds/<target>/` (`./x
/// fuzz` starts the target's corpus from them), for the unit test of each
/// crate that runs the target's body over them. Panics when the directory
/// cannot be read or holds fewer than 5 seeds: test support only.
#[doc(hidden)]
pub fn fuzz_seeds(target: &str) -> Vec<Vec<u8>> {
    let dir =
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/")).join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut paths: Vec<std::path::PathBuf> = entries
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .path()
        })
        .collect();
    paths.sort();
    let seeds: Vec<Vec<u8>> = paths
        .iter()
        .map(|path| std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect();
    assert!(seeds.len() >= 5, "{}: {} seeds", dir.display(), seeds.len());
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_and_escaped_once() {
        assert_eq!(bounded("web", 64), r#""web""#);
        assert_eq!(bounded("a\nb\"c\\", 64), r#""a\nb\"c\\""#);
        assert_eq!(bounded("\u{1}", 64), r#""\u{1}""#);
        assert_eq!(bounded("", 64), r#""""#);
        assert_eq!(Shown::new("a\nb").to_string(), r#""a\nb""#);
        assert_eq!(format!("{:?}", Shown::new("a\nb")), r#""a\nb""#);
    }

    #[test]
    fn long_values_are_cut_at_a_character_with_their_size() {
        assert_eq!(bounded("abcdef", 3), r#""abc… (6 bytes)""#);
        assert_eq!(bounded("ééé", 2), r#""éé… (6 bytes)""#);
        assert_eq!(bounded("abc", 3), r#""abc""#);
    }

    #[test]
    fn ten_kib_of_control_characters_stay_under_the_bound() {
        for c in ['\u{1}', '\n', '\u{9f}', '\u{10ffff}', '\\', '"', '\u{200b}'] {
            let value = c.to_string().repeat(10 * 1024);
            let shown = bounded(&value, MAX_SHOWN_CHARS);
            assert!(shown.len() <= bounded_len(MAX_SHOWN_CHARS), "{shown}");
            assert!(shown.ends_with(&format!("… ({} bytes)\"", value.len())));
            assert_eq!(
                check_message(&shown, bounded_len(64), backslash_run(&value)),
                Ok(())
            );
            let t = text(&value, 100);
            assert!(t.len() <= text_len(100), "{t}");
            assert!(!t.chars().any(char::is_control), "{t}");
        }
    }

    #[test]
    fn library_text_keeps_its_escapes() {
        assert_eq!(text("field `a\nb`", 64), r"field `a\nb`");
        assert_eq!(text(r#"string "a\nb""#, 64), r#"string "a\nb""#);
        assert_eq!(text("abcdef", 3), "abc…");
    }

    #[test]
    fn check_message_finds_unbounded_raw_and_double_escaped_messages() {
        let once = format!("bad value {}", bounded("a\nb", 64));
        assert_eq!(check_message(&once, 100, 0), Ok(()));
        let twice = format!("bad value {:?}", bounded("a\nb", 64));
        assert!(check_message(&twice, 100, 0).is_err(), "{twice}");
        let twice = format!("bad value {:?}", bounded("a\\b", 64));
        assert!(check_message(&twice, 100, 1).is_err(), "{twice}");
        assert!(check_message("a\nb", 100, 0).is_err());
        assert!(check_message(&"a".repeat(101), 100, 0).is_err());
    }

    #[test]
    fn backslash_runs() {
        assert_eq!(backslash_run(""), 0);
        assert_eq!(backslash_run(r"a\b\\c\\\"), 3);
    }
}
