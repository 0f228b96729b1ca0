//! Small readers: whole text files, line files, JSONL and delimiter-separated values.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

pub(crate) fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut s = String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            None,
            format!("expected UTF-8 text, found an invalid byte at offset {}", e.utf8_error().valid_up_to()),
        )
    })?;
    if s.starts_with('\u{feff}') {
        s.drain(..3);
    }
    Ok(s)
}

/// The lines of a text file without their `\n` / `\r\n` terminators. A final empty line (the
/// file ending in a newline) is not a line; empty lines elsewhere are kept so that line-aligned
/// files stay aligned.
pub(crate) fn read_lines(path: &Path) -> Result<Vec<String>> {
    Ok(read_text(path)?.lines().map(|l| l.strip_suffix('\r').unwrap_or(l).to_string()).collect())
}

/// One JSON object per line (blank lines skipped), with its 1-based line number.
pub(crate) fn read_jsonl<T: DeserializeOwned>(path: &Path, what: &str) -> Result<Vec<(usize, T)>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(line)
            .map_err(|e| Error::format(path, Some(i + 1), format!("expected a JSON object {what}: {e}")))?;
        out.push((i + 1, row));
    }
    Ok(out)
}

/// Parses delimiter-separated values with RFC 4180 quoting (`"a;b"`, `""` for a quote; quoted
/// fields may span lines). Returns each record with the 1-based line it starts on.
pub(crate) fn parse_dsv(text: &str, delim: char, path: &Path) -> Result<Vec<(usize, Vec<String>)>> {
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut at_field_start = true;
    let mut line = 1;
    let mut record_line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_field_start => {
                in_quotes = true;
                at_field_start = false;
            }
            c if c == delim => {
                fields.push(std::mem::take(&mut field));
                at_field_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                if !(fields.len() == 1 && fields[0].is_empty()) {
                    records.push((record_line, std::mem::take(&mut fields)));
                }
                fields.clear();
                at_field_start = true;
                line += 1;
                record_line = line;
            }
            _ => {
                field.push(c);
                at_field_start = false;
            }
        }
    }
    if in_quotes {
        return Err(Error::format(path, Some(record_line), "a quoted field is not closed before the end of the file"));
    }
    fields.push(field);
    if !(fields.len() == 1 && fields[0].is_empty()) {
        records.push((record_line, fields));
    }
    Ok(records)
}

/// The names of the sub-folders of `d`, sorted (none when `d` cannot be read).
pub(crate) fn subdirs(d: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(d) else { return Vec::new() };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsv_handles_quotes_delimiters_and_newlines() {
        let text = "comment;isHate\nplain text;1.0\n\"has ; inside and \"\"quotes\"\"\";0.5\r\n\"two\nlines\";0\n";
        let r = parse_dsv(text, ';', Path::new("x.csv")).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[1], (2, vec!["plain text".to_string(), "1.0".to_string()]));
        assert_eq!(r[2].1, vec!["has ; inside and \"quotes\"".to_string(), "0.5".to_string()]);
        assert_eq!(r[3], (4, vec!["two\nlines".to_string(), "0".to_string()]));
    }

    #[test]
    fn dsv_unclosed_quote_names_the_line() {
        let e = parse_dsv("a;b\n\"oops;1\n", ';', Path::new("x.csv")).unwrap_err().to_string();
        assert_eq!(e, "x.csv:2: a quoted field is not closed before the end of the file");
    }
}
