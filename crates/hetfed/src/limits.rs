//! Limits of the command-line flags. Each number a user sets has a documented range, checked
//! before anything is allocated for it; an error names the flag, the range and the value found
//! (`--num-beams: expected 1..=64, found 0`) as one line, and the process exits with code 2.
//!
//! | flag | range |
//! |---|---|
//! | `--threads` | 1..=[`MAX_THREADS`] |
//! | `--lambda` (score, generate, eval) | a finite number |
//! | `--text`, `--text-file` (score) | at most [`MAX_TEXT_BYTES`]; tokens beyond the model's context are dropped (said on stderr) |
//! | `--prompt`, `--text-file` (generate) | at most [`MAX_TEXT_BYTES`]; the prompt loses its start to fit `context − max-new-tokens` (said on stderr) |
//! | `--max-new-tokens` (generate, eval) | 1..=context − 1 |
//! | `--num-beams` (generate, eval) | 1..=min([`MAX_BEAMS`], vocabulary size) |
//! | `--temperature` | a finite number >= 0 |
//! | `--top-k` | 1..=vocabulary size |
//! | `--top-p` | (0, 1] |
//! | `--batch-size` (eval, finetune) | 1..=4096 |
//! | `--max-len` (eval, finetune) | 2..=context |
//! | `--limit` (eval) | at least 1 |
//! | `--lora-rank` (finetune) | 1..=min(in, out) of the smallest adapted layer |
//! | `--lora-alpha` | a finite number > 0 |
//! | `--lora-dropout` | [0, 1) |
//! | `--lr` | (0, 10] |
//! | `--epochs` | 1..=10000 |
//! | `--max-steps` | 1..=10000000 |
//! | `--grad-accum` | 1..=4096 |
//! | `--warmup-steps` | 0..=10000000 |
//! | `--max-grad-norm` | a finite number >= 0 (0 disables clipping) |
//! | `--weight-decay` | [0, 1] |
//! | `--proximal-mu` | [0, 1000000] |
//! | `--checkpoint-every` | 1..=10000000 |
//!
//! The context of a model is `max_position_embeddings` (Llama); BLOOM's ALiBi has no position
//! table, so hetfed takes its config's `seq_length`, else 2048, as the context of a BLOOM model.

use std::path::Path;

use anyhow::{bail, Context, Result};
use hetfed_fed::config::Interval;
use hetfed_model::Checkpoint;

/// Most beams of beam search: a fixed, documented cap rather than one derived from free memory.
/// The beams advance as one batch, so the KV cache holds `beams × (prompt + new tokens) × layers
/// × 2 × hidden` floats, and each step ranks `beams × 2·beams` candidates out of `beams ×
/// vocabulary` logits. 64 beams over base-small's whole 2048-token context take 512 MiB of cache
/// (bloom-560m's: 24 GiB), which is as far as a CPU run should go; a larger beam rarely helps.
pub const MAX_BEAMS: usize = 64;

/// Largest text read by `--text-file` (and `--text`/`--prompt`), in bytes: 1 MiB, hundreds of
/// times the context of any supported model (only the context's worth of tokens is used).
pub const MAX_TEXT_BYTES: u64 = 1 << 20;

/// Most worker threads of `--threads`.
pub const MAX_THREADS: usize = 1024;

/// `flag: expected lo..=hi, found v`.
pub fn int<T: PartialOrd + std::fmt::Display>(flag: &str, v: T, lo: T, hi: T) -> Result<()> {
    hetfed_fed::config::int(flag, v, lo, hi).map_err(anyhow::Error::msg)
}

/// `flag: expected at least lo, found v`.
pub fn at_least<T: PartialOrd + std::fmt::Display>(flag: &str, v: T, lo: T) -> Result<()> {
    if v < lo {
        bail!("{flag}: expected at least {lo}, found {v}");
    }
    Ok(())
}

/// `flag: expected a number in (lo, hi], found v` unless `v` is finite and inside.
pub fn real(flag: &str, v: f64, range: Interval) -> Result<()> {
    hetfed_fed::config::real(flag, v, range).map_err(anyhow::Error::msg)
}

/// The longest sequence (prompt and generated tokens together) a model supports, in tokens.
pub fn context(ck: &Checkpoint) -> usize {
    ck.arch.max_positions(&ck.config_json).max(2)
}

/// `--num-beams`: 1..=min([`MAX_BEAMS`], vocabulary).
pub fn beams(flag: &str, n: usize, ck: &Checkpoint) -> Result<()> {
    int(flag, n, 1, MAX_BEAMS.min(ck.arch.vocab_size()))
}

/// `--max-new-tokens`: 1..=context − 1 (the prompt needs at least one token).
pub fn new_tokens(flag: &str, n: usize, ck: &Checkpoint) -> Result<()> {
    let ctx = context(ck);
    if n < 1 || n >= ctx {
        bail!(
            "{flag}: expected 1..={} (less than the context of {}, {ctx} tokens), found {n}",
            ctx - 1,
            ck.dir.display()
        );
    }
    Ok(())
}

/// A sequence length `lo..=context`.
pub fn seq_len(flag: &str, n: usize, lo: usize, ck: &Checkpoint) -> Result<()> {
    let ctx = context(ck);
    if n < lo || n > ctx {
        bail!("{flag}: expected {lo}..={ctx} (the context of {}), found {n}", ck.dir.display());
    }
    Ok(())
}

/// The text of `--text`/`--prompt` (`inline`) or of `--text-file`, at most [`MAX_TEXT_BYTES`].
/// One final line ending of a file is dropped (as the shell's `$(cat FILE)` drops it), so a
/// file holding a line of text scores as that text given inline.
pub fn read_text(inline: Option<String>, file: Option<&Path>, inline_flag: &str) -> Result<String> {
    let text = match (inline, file) {
        (Some(t), None) => t,
        (None, Some(p)) => {
            let len = std::fs::metadata(p).with_context(|| format!("--text-file: reading {}", p.display()))?.len();
            if len > MAX_TEXT_BYTES {
                bail!(
                    "--text-file: expected at most {MAX_TEXT_BYTES} bytes (1 MiB), found {len} bytes in {}",
                    p.display()
                );
            }
            let bytes = std::fs::read(p).with_context(|| format!("--text-file: reading {}", p.display()))?;
            let mut t = String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "--text-file: expected UTF-8 text in {}, found invalid bytes at offset {}",
                    p.display(),
                    e.utf8_error().valid_up_to()
                )
            })?;
            if t.ends_with('\n') {
                t.pop();
                if t.ends_with('\r') {
                    t.pop();
                }
            }
            t
        }
        // clap makes the two flags exclusive and one of them required.
        _ => bail!(
            "expected one of {inline_flag} or --text-file, found {}",
            if file.is_some() { "both" } else { "neither" }
        ),
    };
    if text.len() as u64 > MAX_TEXT_BYTES {
        bail!("{inline_flag}: expected at most {MAX_TEXT_BYTES} bytes (1 MiB), found {} bytes", text.len());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_flag_the_range_and_the_value() {
        assert_eq!(int("--top-k", 0usize, 1, 10).unwrap_err().to_string(), "--top-k: expected 1..=10, found 0");
        assert_eq!(
            real("--temperature", f64::NAN, Interval::NON_NEGATIVE).unwrap_err().to_string(),
            "--temperature: expected a finite number >= 0, found NaN"
        );
        assert_eq!(at_least("--limit", 0usize, 1).unwrap_err().to_string(), "--limit: expected at least 1, found 0");
        int("--top-k", 10usize, 1, 10).unwrap();
        real("--temperature", 0.0, Interval::NON_NEGATIVE).unwrap();
    }

    #[test]
    fn a_text_file_drops_one_final_line_ending_and_its_size_is_bounded() {
        let dir = std::env::temp_dir().join(format!("hetfed-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.txt");
        std::fs::write(&f, "hello\r\n").unwrap();
        assert_eq!(read_text(None, Some(&f), "--text").unwrap(), "hello");
        std::fs::write(&f, "a\n\n").unwrap();
        assert_eq!(read_text(None, Some(&f), "--text").unwrap(), "a\n");
        std::fs::write(&f, vec![b'a'; MAX_TEXT_BYTES as usize + 1]).unwrap();
        let e = read_text(None, Some(&f), "--text").unwrap_err().to_string();
        assert!(e.contains("--text-file") && e.contains("1048577"), "{e}");
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        let e = read_text(None, Some(&f), "--text").unwrap_err().to_string();
        assert!(e.contains("UTF-8"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
