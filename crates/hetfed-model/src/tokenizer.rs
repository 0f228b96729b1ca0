//! Loading `tokenizer.json` files safely ([`load`], [`from_bytes`]: a malformed file is an error,
//! never a panic of the `tokenizers` crate), and training hetfed's own byte-level BPE tokenizers
//! (the `tokenizers` crate's trainer), with the special tokens `<unk>`=0, `<s>`=1 (prepended as
//! BOS), `</s>`=2, `<pad>`=3.

use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::{unicode::NFC, NormalizerWrapper};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder, TokenizerImpl};

use hetfed_core::{Error, Result};

pub const SPECIAL_TOKENS: [&str; 4] = ["<unk>", "<s>", "</s>", "<pad>"];

/// Trains a byte-level BPE tokenizer of `vocab_size` entries on the lines of `files` (NFC
/// normalised; every byte is in the alphabet, so no text is ever unknown).
pub fn train_bpe(files: &[String], vocab_size: usize, min_frequency: u64) -> Result<Tokenizer> {
    if vocab_size < 256 + SPECIAL_TOKENS.len() {
        return Err(Error::msg(format!(
            "--vocab-size: expected at least {} (256 bytes + special tokens), found {vocab_size}",
            256 + SPECIAL_TOKENS.len()
        )));
    }
    for f in files {
        if !Path::new(f).is_file() {
            return Err(Error::msg(format!("{f}: expected a text file to train the tokenizer on, found none")));
        }
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .special_tokens(SPECIAL_TOKENS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| Error::msg(format!("post-processor template: {e}")))?
        .try_pair("<s> $A $B")
        .map_err(|e| Error::msg(format!("post-processor template: {e}")))?
        .special_tokens(vec![("<s>", 1)])
        .build()
        .map_err(|e| Error::msg(format!("post-processor: {e}")))?;
    let mut tok: TokenizerImpl<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper> =
        TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(Some(NFC.into()))
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
            .with_post_processor(Some(post.into()))
            .with_decoder(Some(ByteLevel::default().into()))
            .build()
            .map_err(|e| Error::msg(format!("building the tokenizer: {e}")))?;
    tok.train_from_files(&mut trainer, files.to_vec())
        .map_err(|e| Error::msg(format!("training the tokenizer: {e}")))?;
    // Round-trip through JSON into the generic `Tokenizer` every loader uses.
    let json = tok.to_string(false).map_err(|e| Error::msg(format!("serialising the tokenizer: {e}")))?;
    Tokenizer::from_bytes(json.as_bytes()).map_err(|e| Error::msg(format!("reloading the tokenizer: {e}")))
}

/// Loads a `tokenizer.json`. See [`from_bytes`].
pub fn load(path: &Path) -> Result<Tokenizer> {
    from_bytes(&hetfed_core::read_file(path)?, path)
}

/// Parses the bytes of a `tokenizer.json` (`path` names it in errors). The `tokenizers` crate
/// panics on some malformed files (a truncated one, in its decoder section), so the parse, and
/// one encode and decode of a short text that would meet the same defects later, run behind
/// [`hetfed_core::guard::parse`]: any bytes give `Ok` or a one-line error naming the file.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Tokenizer> {
    hetfed_core::guard::parse(path, "a Hugging Face tokenizer (tokenizer.json)", || {
        let tok = Tokenizer::from_bytes(bytes).map_err(|e| Error::Format {
            path: path.to_owned(),
            msg: format!("expected a Hugging Face tokenizer: {}", hetfed_core::guard::one_line(&e.to_string(), 300)),
        })?;
        // Errors here are the caller's to meet (and report) when it tokenises; panics are not.
        if let Ok(enc) = tok.encode("hetfed: ok, 1 2 3 \u{e9}\u{2713}", true) {
            let _ = tok.decode(enc.get_ids(), false);
        }
        Ok(tok)
    })
}

/// Tokens per character of `lines` (lower is better compression).
pub fn tokens_per_char(tok: &Tokenizer, lines: &[String]) -> Result<f64> {
    let (mut toks, mut chars) = (0usize, 0usize);
    for l in lines {
        toks += tok.encode(l.as_str(), false).map_err(|e| Error::msg(format!("tokenising: {e}")))?.len();
        chars += l.chars().count();
    }
    Ok(toks as f64 / chars.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_a_byte_level_bpe_with_bos_and_round_trips_text() {
        let dir = std::env::temp_dir().join(format!("hetfed-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.txt");
        let text = "the cat sat on the mat\nनमस्ते दुनिया, यह एक परीक्षा है\nthe dog sat on the log\n".repeat(20);
        std::fs::write(&f, text).unwrap();
        let tok = train_bpe(&[f.to_str().unwrap().to_string()], 300, 2).unwrap();
        assert_eq!(tok.token_to_id("<unk>"), Some(0));
        assert_eq!(tok.token_to_id("<s>"), Some(1));
        assert_eq!(tok.token_to_id("</s>"), Some(2));
        assert_eq!(tok.token_to_id("<pad>"), Some(3));
        assert!(tok.get_vocab_size(true) <= 300);
        let s = "the cat नमस्ते 😀";
        let enc = tok.encode(s, true).unwrap();
        assert_eq!(enc.get_ids()[0], 1, "BOS first");
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), s, "byte-level BPE loses nothing");
        let tpc = tokens_per_char(&tok, &["the cat sat on the mat".to_string()]).unwrap();
        assert!(tpc < 0.5, "merges were learnt: {tpc}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
