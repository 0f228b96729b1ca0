//! Split names and the deterministic hash rules used where a dataset has no official split.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Error;

/// A dataset split. Parsed from `train`; `dev`, `validation`, `val` or `valid`; `test` or
/// `devtest` (FLORES-200's name for its test split).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Split {
    Train,
    Dev,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Dev, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "dev" | "validation" | "val" | "valid" => Ok(Split::Dev),
            "test" | "devtest" => Ok(Split::Test),
            _ => Err(Error::config(format!("unknown split `{s}`: expected train, dev (or validation) or test"))),
        }
    }
}

impl TryFrom<String> for Split {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<Split> for String {
    fn from(s: Split) -> String {
        s.as_str().to_string()
    }
}

/// Collapses runs of whitespace to one space, strips, lowercases: the `normalize` of the
/// PROVENANCE hash rules (Python: `" ".join(s.split()).lower()`).
pub fn normalize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// `int(sha256(normalize(text)).hexdigest(), 16) % m`, computed without big integers.
pub fn hash_mod(text: &str, m: u64) -> u64 {
    assert!(m > 0, "modulus must be positive");
    let digest = Sha256::digest(normalize(text).as_bytes());
    digest.iter().fold(0u128, |r, &b| (r * 256 + u128::from(b)) % u128::from(m)) as u64
}

/// The three-way rule used for corpora without an official split. With
/// `r = hash_mod(key, 5 * held_out_mod)`:
/// `r % held_out_mod == 0` → `Test` (this is exactly the held-out rule
/// `hash % held_out_mod == 0` of the dataset's PROVENANCE.md, so the test rows are the ones kept out
/// of the shared copy and present only in a full upstream copy); otherwise `r < held_out_mod` →
/// `Dev` (about one in five of the remaining rows); otherwise `Train`.
pub fn hash_split(key: &str, held_out_mod: u64) -> Split {
    let r = hash_mod(key, 5 * held_out_mod);
    if r.is_multiple_of(held_out_mod) {
        Split::Test
    } else if r < held_out_mod {
        Split::Dev
    } else {
        Split::Train
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_parse() {
        for (s, want) in
            [("train", Split::Train), ("validation", Split::Dev), ("DEV", Split::Dev), ("devtest", Split::Test)]
        {
            assert_eq!(s.parse::<Split>().unwrap(), want);
        }
        assert!("training".parse::<Split>().unwrap_err().to_string().contains("unknown split `training`"));
    }

    #[test]
    fn hash_mod_matches_python() {
        // python3 -c 'import hashlib;print(int(hashlib.sha256(b"hello world").hexdigest(),16) % 1000003)'
        assert_eq!(hash_mod("  Hello   WORLD ", 1_000_003), 679_936);
        assert_eq!(normalize(" a\t b\nC "), "a b c");
    }
}
