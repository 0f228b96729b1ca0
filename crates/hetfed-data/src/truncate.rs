//! Length limits. Tokenisation is not this crate's job: a limit in tokens needs a
//! [`TokenCounter`] from the caller (e.g. a closure around a tokenizer), and a limit in characters
//! needs nothing.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A length limit. In TOML: `{ chars = 2000 }` or `{ tokens = 512 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Length {
    /// Unicode scalar values.
    Chars(usize),
    /// Tokens, as counted by the caller's [`TokenCounter`].
    Tokens(usize),
}

/// Counts the tokens of a text. Truncation assumes the count of a suffix (or prefix) grows with
/// its length, which holds for subword tokenizers up to merges at the cut.
pub trait TokenCounter {
    fn count_tokens(&self, text: &str) -> usize;
}

impl<F: Fn(&str) -> usize> TokenCounter for F {
    fn count_tokens(&self, text: &str) -> usize {
        self(text)
    }
}

/// Byte offsets of every char boundary of `s`, including `s.len()`.
fn boundaries(s: &str) -> Vec<usize> {
    s.char_indices().map(|(i, _)| i).chain(std::iter::once(s.len())).collect()
}

fn need_counter(counter: Option<&dyn TokenCounter>) -> Result<&dyn TokenCounter> {
    counter
        .ok_or_else(|| Error::config("a limit in tokens needs a token counter: pass one, or give the limit in chars"))
}

/// The longest suffix of `text` within `max` (what a prompt keeps: its end, next to the
/// answer). With a token limit, a binary search over char boundaries calls `counter` O(log n) times.
pub fn keep_end<'a>(text: &'a str, max: Length, counter: Option<&dyn TokenCounter>) -> Result<&'a str> {
    match max {
        Length::Chars(n) => {
            let count = text.chars().count();
            Ok(if count <= n {
                text
            } else {
                &text[text.char_indices().nth(count - n).map_or(text.len(), |(i, _)| i)..]
            })
        }
        Length::Tokens(n) => {
            let c = need_counter(counter)?;
            if text.is_empty() || c.count_tokens(text) <= n {
                return Ok(text);
            }
            let b = boundaries(text);
            // Smallest start whose suffix fits; the empty suffix (start = len) always does.
            let (mut lo, mut hi) = (1, b.len() - 1);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if c.count_tokens(&text[b[mid]..]) <= n {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            Ok(&text[b[lo]..])
        }
    }
}

/// The longest prefix of `text` within `max` (what a target or a document field keeps).
pub fn keep_start<'a>(text: &'a str, max: Length, counter: Option<&dyn TokenCounter>) -> Result<&'a str> {
    match max {
        Length::Chars(n) => Ok(&text[..text.char_indices().nth(n).map_or(text.len(), |(i, _)| i)]),
        Length::Tokens(n) => {
            let c = need_counter(counter)?;
            if text.is_empty() || c.count_tokens(text) <= n {
                return Ok(text);
            }
            let b = boundaries(text);
            // Largest end whose prefix fits; the empty prefix always does.
            let (mut lo, mut hi) = (0, b.len() - 2);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if c.count_tokens(&text[..b[mid]]) <= n {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            Ok(&text[..b[lo]])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    #[test]
    fn chars_respect_utf8_boundaries() {
        let t = "नमस्ते दुनिया";
        assert_eq!(keep_end(t, Length::Chars(6), None).unwrap(), "दुनिया");
        assert_eq!(keep_start(t, Length::Chars(6), None).unwrap(), "नमस्ते");
        assert_eq!(keep_end("abc", Length::Chars(10), None).unwrap(), "abc");
        assert_eq!(keep_start("abc", Length::Chars(0), None).unwrap(), "");
    }

    #[test]
    fn tokens_keep_the_longest_fitting_piece() {
        let t = "one two three four five";
        let c: &dyn TokenCounter = &words;
        assert_eq!(keep_end(t, Length::Tokens(2), Some(c)).unwrap(), " four five");
        assert_eq!(keep_start(t, Length::Tokens(2), Some(c)).unwrap(), "one two ");
        assert_eq!(keep_end(t, Length::Tokens(9), Some(c)).unwrap(), t);
        assert_eq!(keep_end(t, Length::Tokens(0), Some(c)).unwrap().trim(), "");
        assert!(keep_end(t, Length::Tokens(2), None).unwrap_err().to_string().contains("token counter"));
    }
}
