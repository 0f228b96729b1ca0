//! Prompt templates: literal text with `{field}` placeholders; `{{` and `}}` are literal braces.

use crate::error::{Error, Result};

#[derive(Debug, PartialEq)]
enum Piece<'a> {
    Text(String),
    Field(&'a str),
}

fn parse(t: &str) -> Result<Vec<Piece<'_>>> {
    let bad = |msg: String| Error::config(format!("template {t:?}: {msg}"));
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = t;
    while let Some(i) = rest.find(['{', '}']) {
        text.push_str(&rest[..i]);
        let c = rest.as_bytes()[i];
        let after = &rest[i + 1..];
        if after.as_bytes().first() == Some(&c) {
            text.push(c as char);
            rest = &after[1..];
            continue;
        }
        if c == b'}' {
            return Err(bad("expected `}}` for a literal `}`, found a lone `}`".into()));
        }
        let Some(end) = after.find('}') else {
            return Err(bad("expected `}` to close a `{`, found the end of the template".into()));
        };
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad(format!("expected a field name of letters, digits and `_` inside `{{}}`, found {name:?}")));
        }
        if !text.is_empty() {
            out.push(Piece::Text(std::mem::take(&mut text)));
        }
        out.push(Piece::Field(name));
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

/// The field names a template uses, in order of first use.
pub fn placeholders(template: &str) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for p in parse(template)? {
        if let Piece::Field(n) = p {
            if !names.iter().any(|m| m == n) {
                names.push(n.to_string());
            }
        }
    }
    Ok(names)
}

/// Checks that a template parses and uses only `known` fields.
pub fn check(template: &str, known: &[&str], what: &str) -> Result<()> {
    for n in placeholders(template)? {
        if !known.contains(&n.as_str()) {
            return Err(Error::config(format!(
                "{what} template {template:?} uses `{{{n}}}`: expected one of {}",
                known.iter().map(|k| format!("{{{k}}}")).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    Ok(())
}

/// Fills a template, asking `lookup` for each field.
pub fn render(template: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String> {
    let mut out = String::with_capacity(template.len() * 2);
    for p in parse(template)? {
        match p {
            Piece::Text(t) => out.push_str(&t),
            Piece::Field(n) => match lookup(n) {
                Some(v) => out.push_str(&v),
                None => return Err(Error::config(format!("template {template:?}: no value for `{{{n}}}`"))),
            },
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fields_and_escaped_braces() {
        let look = |k: &str| (k == "x").then(|| "ä{1}".to_string());
        assert_eq!(render("a {x} {{lit}} }} b", look).unwrap(), "a ä{1} {lit} } b");
        assert_eq!(placeholders("{a}{b} {a}").unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn malformed_templates_are_clear_errors() {
        for (t, msg) in [("a {x", "close a `{`"), ("a } b", "lone `}`"), ("{}", "field name"), ("{a b}", "field name")]
        {
            let e = placeholders(t).unwrap_err().to_string();
            assert!(e.contains(msg), "{t}: {e}");
        }
        let e = check("{text} {labl}", &["text"], "prompt").unwrap_err().to_string();
        assert!(e.contains("`{labl}`") && e.contains("{text}"), "{e}");
    }
}
