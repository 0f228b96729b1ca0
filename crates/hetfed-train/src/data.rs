//! Supervised examples: `{prompt, target}` pairs read from JSONL, tokenised so that the loss
//! falls only on target tokens.

use std::path::Path;

use serde::{Deserialize, Serialize};

use hetfed_core::{Error, Result};

/// One training example. The loss covers `target` (and the end-of-sequence token), never `prompt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub target: String,
}

/// Reads `{"prompt": ..., "target": ...}` objects, one per line (blank lines skipped).
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ex: Example = serde_json::from_str(line).map_err(|e| Error::Format {
            path: path.to_owned(),
            msg: format!("line {}: expected a JSON object {{\"prompt\": string, \"target\": string}}: {e}", i + 1),
        })?;
        out.push(ex);
    }
    if out.is_empty() {
        return Err(Error::Format {
            path: path.to_owned(),
            msg: "expected at least one {\"prompt\", \"target\"} example, found none".into(),
        });
    }
    Ok(out)
}

/// A tokenised example: `ids = prompt ++ target`, loss on `ids[prompt_len..]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

impl Encoded {
    pub fn n_target(&self) -> usize {
        self.ids.len() - self.prompt_len
    }
}

/// Tokenises examples. The prompt gets the tokenizer's special tokens (e.g. BOS); the target
/// gets none but is followed by `eos` when given. Sequences longer than `max_len` lose the start
/// of their prompt (the end of a prompt, next to the target, matters most); a target longer than
/// `max_len - 1` is cut at its end.
pub fn encode(
    tok: &hetfed_model::tokenizers::Tokenizer,
    examples: &[Example],
    max_len: usize,
    eos: Option<u32>,
) -> Result<Vec<Encoded>> {
    if max_len < 2 {
        return Err(Error::msg(format!("max_len must be at least 2, found {max_len}")));
    }
    examples
        .iter()
        .map(|ex| {
            let p = tok.encode(ex.prompt.as_str(), true).map_err(|e| Error::msg(format!("tokenising prompt: {e}")))?;
            let t = tok.encode(ex.target.as_str(), false).map_err(|e| Error::msg(format!("tokenising target: {e}")))?;
            let mut prompt = p.get_ids().to_vec();
            let mut target = t.get_ids().to_vec();
            target.extend(eos);
            target.truncate(max_len - 1);
            if prompt.is_empty() {
                // Something must predict the first target token.
                prompt.push(eos.unwrap_or(0));
            }
            let room = max_len - target.len();
            if prompt.len() > room {
                prompt.drain(..prompt.len() - room);
            }
            let prompt_len = prompt.len();
            prompt.extend(target);
            Ok(Encoded { ids: prompt, prompt_len })
        })
        .collect()
}
