//! The transformations (recipes) that make a file of hetfed's layout from upstream bytes, for
//! manifest files with `upstream = "derived"`. Each recipe is named in the manifest (`recipe`),
//! takes the downloaded upstream files in the manifest's `input` order and returns the bytes of
//! hetfed's layout; the fetcher then checks them against the manifest's size and SHA-256.
//!
//! The JSON Lines written here reproduce Python's `json.dumps(row, ensure_ascii=False)` (the tool
//! that made `../shared`): keys in the given order, `", "` and `": "` separators, non-ASCII text
//! unescaped, and one row per line, each ending with `\n`.

use std::collections::BTreeMap;

use crate::manifest::Input;

/// The recipes hetfed implements, with the number of upstream inputs each takes (0: one or more).
pub const RECIPES: &[(&str, usize)] = &[
    ("ilsum-csv", 1),
    ("copa-xml", 2),
    ("dedup-lines", 0),
    ("zip-jsonl", 1),
    ("bbc-news-summary", 0),
    ("zip-text", 1),
];

/// Whether `recipe` (of [`RECIPES`]) takes `n` inputs; else the one-line reason.
pub fn check_inputs(recipe: &str, n: usize) -> Result<(), String> {
    let want = RECIPES
        .iter()
        .find(|(r, _)| *r == recipe)
        .map(|(_, n)| *n)
        .ok_or_else(|| format!("unknown recipe `{recipe}`: expected one of {}", recipe_names()))?;
    match want {
        0 if n == 0 => Err(format!("recipe `{recipe}` takes one or more input files, found none")),
        0 => Ok(()),
        w if w != n => Err(format!("recipe `{recipe}` takes {w} input file(s), found {n}")),
        _ => Ok(()),
    }
}

/// Runs `recipe` on the upstream `inputs` (in the manifest's order), with no per-input settings.
/// The error is one line saying what was expected and what was found.
pub fn derive(recipe: &str, inputs: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    derive_with(recipe, inputs, &[])
}

/// [`derive`] with the manifest's per-input settings `specs` (same order as `inputs`; missing
/// ones are empty): `columns` (`dedup-lines`: the input is a CSV file and these columns are its
/// text), `member` (`zip-jsonl`: the zip member to read) and `include`, `exclude`, `line_prefix`
/// (`zip-text`: the members to read and the lines to keep).
pub fn derive_with(recipe: &str, inputs: &[Vec<u8>], specs: &[Input]) -> Result<Vec<u8>, String> {
    check_inputs(recipe, inputs.len())?;
    check_specs(recipe, specs)?;
    let columns: Vec<&[String]> = (0..inputs.len()).map(|i| specs.get(i).map_or(&[][..], |s| &s.columns)).collect();
    match recipe {
        "ilsum-csv" => ilsum_csv(&inputs[0]),
        "copa-xml" => copa_xml(&inputs[0], &inputs[1]),
        "dedup-lines" => dedup_lines(inputs, &columns),
        "bbc-news-summary" => bbc_news_summary(inputs, specs),
        "zip-jsonl" => {
            let member =
                specs.first().and_then(|s| s.member.as_deref()).ok_or("recipe `zip-jsonl` needs the input's member")?;
            zip_jsonl(&inputs[0], member)
        }
        "zip-text" => zip_text(&inputs[0], specs.first().ok_or("recipe `zip-text` needs the input's include globs")?),
        _ => unreachable!("listed in RECIPES"),
    }
}

/// Whether the per-input settings fit `recipe`: `columns` only for `dedup-lines`, `member` only
/// for (and required by) `zip-jsonl`, `include` only for (and required by) `zip-text`, as are
/// `exclude` and `line_prefix` (optional).
pub fn check_specs(recipe: &str, specs: &[Input]) -> Result<(), String> {
    for s in specs {
        let zip_text = recipe == "zip-text";
        if zip_text && s.include.is_empty() {
            return Err(format!("recipe `zip-text` needs the input's include globs ({})", s.url));
        }
        if !zip_text && (!s.include.is_empty() || !s.exclude.is_empty() || s.line_prefix.is_some()) {
            return Err(format!("recipe `{recipe}` takes no include, exclude or line_prefix (input {})", s.url));
        }
        if recipe != "dedup-lines" && !s.columns.is_empty() {
            return Err(format!("recipe `{recipe}` reads no CSV columns (input {})", s.url));
        }
        match (recipe == "zip-jsonl", &s.member) {
            (false, Some(_)) => return Err(format!("recipe `{recipe}` reads no zip member (input {})", s.url)),
            (true, None) => return Err(format!("recipe `zip-jsonl` needs the input's member ({})", s.url)),
            _ => {}
        }
    }
    Ok(())
}

/// The known recipe names, comma-separated.
pub fn recipe_names() -> String {
    RECIPES.iter().map(|(r, _)| *r).collect::<Vec<_>>().join(", ")
}

/// Plain text: the lines of every input in order (split at `\n`), each stripped of leading and
/// trailing whitespace as Python's `str.strip()` does, empty lines dropped, and every line that
/// occurred before dropped (the first occurrence kept); each line ends with `\n`. An input with
/// `columns` is a CSV file (header row first): its text is the values of the first named column
/// (rows in file order), then those of the next, and so on.
fn dedup_lines(inputs: &[Vec<u8>], columns: &[&[String]]) -> Result<Vec<u8>, String> {
    let mut seen = std::collections::HashSet::new();
    let mut out = String::new();
    let mut push = |text: &str, out: &mut String| {
        for line in text.split('\n') {
            let line = py_strip(line);
            if !line.is_empty() && seen.insert(line.to_string()) {
                out.push_str(line);
                out.push('\n');
            }
        }
    };
    for (i, b) in inputs.iter().enumerate() {
        let what = format!("input {}", i + 1);
        let text = utf8(b, &what)?;
        match columns.get(i).filter(|c| !c.is_empty()) {
            None => push(text, &mut out),
            Some(cols) => {
                let rows = parse_csv(text).map_err(|e| format!("{what}: {e}"))?;
                let Some((head, rows)) = rows.split_first() else {
                    return Err(format!("{what}: expected a CSV header row, found an empty file"));
                };
                for c in cols.iter() {
                    let k = head.iter().position(|h| h == c).ok_or_else(|| {
                        format!("{what}: expected a CSV column {c:?}, found the columns {}", head.join(","))
                    })?;
                    for (j, r) in rows.iter().enumerate() {
                        let v = r.get(k).ok_or_else(|| {
                            format!("{what} row {}: expected {} fields, found {}", j + 1, head.len(), r.len())
                        })?;
                        push(v, &mut out);
                    }
                }
            }
        }
    }
    Ok(out.into_bytes())
}

/// BBC News Summary: the first half of the inputs are the article files
/// (`.../News Articles/<category>/<NNN>.txt`), the second half the summary files
/// (`.../Summaries/<category>/<NNN>.txt`) of the same items in the same order. Per item, in input
/// order: `{"id": "<category>/<NNN>", "category", "title": the article's first line,
/// "article": the rest, "summary"}`, each text stripped (Python's `str.strip()`), files decoded
/// as UTF-8 or else Windows-1252 (one article upstream is cp1252). Items whose
/// `int(sha256(normalize(title + " " + article)), 16) % 10 == 0` are held out (not written);
/// `normalize` collapses white space, strips, lowercases.
fn bbc_news_summary(inputs: &[Vec<u8>], specs: &[Input]) -> Result<Vec<u8>, String> {
    if !inputs.len().is_multiple_of(2) || specs.len() != inputs.len() {
        return Err(format!(
            "recipe `bbc-news-summary` takes article files then as many summary files, found {} inputs",
            inputs.len()
        ));
    }
    let n = inputs.len() / 2;
    let item = |url: &str| -> Result<(String, String), String> {
        let mut parts = url.rsplit('/');
        let (file, category) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let nnn = file.strip_suffix(".txt").filter(|s| !s.is_empty() && !category.is_empty());
        let nnn = nnn.ok_or_else(|| format!("expected an input url ending in <category>/<NNN>.txt, found {url}"))?;
        Ok((category.to_string(), nnn.to_string()))
    };
    let mut out = String::new();
    for i in 0..n {
        let (category, nnn) = item(&specs[i].url)?;
        if item(&specs[n + i].url)? != (category.clone(), nnn.clone()) {
            return Err(format!(
                "input {}: expected the summary of {category}/{nnn}, found {}",
                n + i + 1,
                specs[n + i].url
            ));
        }
        let article = utf8_or_cp1252(&inputs[i]);
        let summary = utf8_or_cp1252(&inputs[n + i]);
        let (title, rest) = article.split_once('\n').unwrap_or((&article, ""));
        let (title, body) = (py_strip(title), py_strip(rest));
        if held_out_mod10(&format!("{title} {body}")) {
            continue;
        }
        json_line(
            &mut out,
            &[
                ("id", Json::Str(&format!("{category}/{nnn}"))),
                ("category", Json::Str(&category)),
                ("title", Json::Str(title)),
                ("article", Json::Str(body)),
                ("summary", Json::Str(py_strip(&summary))),
            ],
        );
    }
    Ok(out.into_bytes())
}

/// Whether `int(sha256(normalize(text)), 16) % 10 == 0`, `normalize` = Python's
/// `" ".join(text.split()).strip().lower()`.
fn held_out_mod10(text: &str) -> bool {
    use sha2::{Digest, Sha256};
    let norm = text.split(py_space).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ").to_lowercase();
    Sha256::digest(norm.as_bytes()).iter().fold(0u32, |r, &b| (r * 256 + u32::from(b)) % 10) == 0
}

/// UTF-8 if valid, else Windows-1252.
fn utf8_or_cp1252(bytes: &[u8]) -> String {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return s.to_string();
    }
    const HIGH: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž', '\u{8f}', '\u{90}', '‘',
        '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}', 'ž', 'Ÿ',
    ];
    bytes
        .iter()
        .map(|&b| if (0x80..=0x9f).contains(&b) { HIGH[usize::from(b - 0x80)] } else { char::from(b) })
        .collect()
}

/// XL-Sum: the zip member whose file name (last path component) is `member`, a JSON Lines file,
/// with every row re-serialised as Python's `json.dumps(row, ensure_ascii=False)` writes it
/// (keys in file order) and every line ending with `\n`; blank lines are dropped.
fn zip_jsonl(zip: &[u8], member: &str) -> Result<Vec<u8>, String> {
    let text = zip_member(zip, member)?;
    let text = utf8(&text, member)?;
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut p = JsonParser { s: line.as_bytes(), i: 0 };
        let v = p.value().and_then(|v| {
            p.ws();
            if p.i == p.s.len() {
                Ok(v)
            } else {
                Err(format!("unexpected {:?} at column {}", line[p.i..].chars().next().unwrap_or(' '), p.i + 1))
            }
        });
        let v = v.map_err(|e| format!("{member} line {}: expected one JSON value: {e}", i + 1))?;
        write_value(&mut out, &v);
        out.push('\n');
    }
    Ok(out.into_bytes())
}

/// Plain text from a source archive (GitHub's `archive/<commit>.zip`, which `git archive` makes:
/// every path under one top folder `<repo>-<commit>/`): the members whose path under the top
/// folder matches one of the `include` globs and none of the `exclude` globs, in byte order of
/// their paths; their lines (split at `\n`), with `line_prefix` only the lines that start with it
/// (without it); then as `dedup-lines`: stripped, empty and repeated lines dropped.
fn zip_text(zip: &[u8], spec: &Input) -> Result<Vec<u8>, String> {
    let entries = zip_entries(zip)?;
    let mut picked: Vec<(&str, &ZipEntry)> = entries
        .iter()
        .filter(|e| !e.name.ends_with('/'))
        .filter_map(|e| e.name.split_once('/').map(|(_, rel)| (rel, e)))
        .filter(|(rel, _)| {
            spec.include.iter().any(|g| glob_match(g, rel)) && !spec.exclude.iter().any(|g| glob_match(g, rel))
        })
        .collect();
    if picked.is_empty() {
        return Err(format!(
            "zip: expected members matching {} under the top folder, found none among {} members",
            spec.include.join(" or "),
            entries.len()
        ));
    }
    picked.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut text = String::new();
    for (rel, e) in picked {
        let bytes = zip_read(zip, e)?;
        for line in utf8(&bytes, rel)?.split('\n') {
            let line = match &spec.line_prefix {
                Some(p) => match line.strip_prefix(p.as_str()) {
                    Some(rest) => rest,
                    None => continue,
                },
                None => line,
            };
            text.push_str(line);
            text.push('\n');
        }
    }
    dedup_lines(&[text.into_bytes()], &[])
}

/// Whether the `/`-separated `path` matches `glob`: `*` matches any text within one path
/// component, `?` one character, and a component `**` any number of components (none too).
fn glob_match(glob: &str, path: &str) -> bool {
    fn comps(g: &[&str], p: &[&str]) -> bool {
        match g.split_first() {
            None => p.is_empty(),
            Some((&"**", rest)) => comps(rest, p) || (!p.is_empty() && comps(g, &p[1..])),
            Some((c, rest)) => !p.is_empty() && comp(c.as_bytes(), p[0].as_bytes()) && comps(rest, &p[1..]),
        }
    }
    fn comp(g: &[u8], p: &[u8]) -> bool {
        match g.split_first() {
            None => p.is_empty(),
            Some((b'*', rest)) => (0..=p.len()).any(|k| comp(rest, &p[k..])),
            Some((b'?', rest)) => {
                // One UTF-8 character.
                let n = p.iter().skip(1).take_while(|&&b| b & 0xc0 == 0x80).count() + 1;
                !p.is_empty() && comp(rest, &p[n.min(p.len())..])
            }
            Some((c, rest)) => p.first() == Some(c) && comp(rest, &p[1..]),
        }
    }
    let g: Vec<&str> = glob.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    comps(&g, &p)
}

/// A member of a zip archive, from its central directory.
struct ZipEntry {
    name: String,
    method: usize,
    csize: usize,
    usize_: usize,
    local: usize,
}

fn u16_at(zip: &[u8], o: usize) -> Option<usize> {
    zip.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
}

fn u32_at(zip: &[u8], o: usize) -> Option<usize> {
    zip.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

fn zip_malformed() -> String {
    "zip: expected a zip archive, found a malformed one".to_string()
}

/// The members of a zip archive, in the central directory's order.
fn zip_entries(zip: &[u8]) -> Result<Vec<ZipEntry>, String> {
    let bad = zip_malformed;
    // The end of central directory record: its signature, searched from the end (a comment may follow).
    let eocd =
        (0..zip.len().saturating_sub(21)).rev().find(|&o| u32_at(zip, o) == Some(0x0605_4b50)).ok_or_else(bad)?;
    let (count, mut at) = (u16_at(zip, eocd + 10).ok_or_else(bad)?, u32_at(zip, eocd + 16).ok_or_else(bad)?);
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        if u32_at(zip, at) != Some(0x0201_4b50) {
            return Err(bad());
        }
        let (method, csize, usize_) = (u16_at(zip, at + 10), u32_at(zip, at + 20), u32_at(zip, at + 24));
        let (n, e, c, local) = (u16_at(zip, at + 28), u16_at(zip, at + 30), u16_at(zip, at + 32), u32_at(zip, at + 42));
        let (Some(method), Some(csize), Some(usize_), Some(n), Some(e), Some(c), Some(local)) =
            (method, csize, usize_, n, e, c, local)
        else {
            return Err(bad());
        };
        let name = String::from_utf8_lossy(zip.get(at + 46..at + 46 + n).ok_or_else(bad)?).into_owned();
        entries.push(ZipEntry { name, method, csize, usize_, local });
        at += 46 + n + e + c;
    }
    Ok(entries)
}

/// The bytes of one member; stored and deflated members are understood.
fn zip_read(zip: &[u8], e: &ZipEntry) -> Result<Vec<u8>, String> {
    let bad = zip_malformed;
    if u32_at(zip, e.local) != Some(0x0403_4b50) {
        return Err(bad());
    }
    let start =
        e.local + 30 + u16_at(zip, e.local + 26).ok_or_else(bad)? + u16_at(zip, e.local + 28).ok_or_else(bad)?;
    let data = zip.get(start..start + e.csize).ok_or_else(bad)?;
    let full = &e.name;
    let bytes = match e.method {
        0 => data.to_vec(),
        8 => miniz_oxide::inflate::decompress_to_vec(data).map_err(|x| format!("zip: cannot inflate {full}: {x:?}"))?,
        m => return Err(format!("zip: {full} uses compression method {m}; expected 0 (stored) or 8 (deflate)")),
    };
    if bytes.len() != e.usize_ {
        return Err(format!("zip: {full} should hold {} bytes, inflated {}", e.usize_, bytes.len()));
    }
    Ok(bytes)
}

/// The bytes of the zip member whose file name (last path component) is `name`: exactly one
/// member must match.
fn zip_member(zip: &[u8], name: &str) -> Result<Vec<u8>, String> {
    let entries = zip_entries(zip)?;
    let found: Vec<&ZipEntry> = entries.iter().filter(|e| e.name.rsplit('/').next() == Some(name)).collect();
    let [e] = found.as_slice() else {
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        return Err(format!("zip: expected one member named {name}, found {} among {}", found.len(), names.join(", ")));
    };
    zip_read(zip, e)
}

/// A JSON value with its object keys in file order.
enum Value {
    Null,
    Bool(bool),
    /// A number, as written (Python would rewrite a float such as `1e2` as `100.0`; XL-Sum has none).
    Num(String),
    Str(String),
    Arr(Vec<Value>),
    Obj(Vec<(String, Value)>),
}

/// Python's `json.dumps(v, ensure_ascii=False)`.
fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Num(n) => out.push_str(n),
        Value::Str(s) => json_str(out, s),
        Value::Arr(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, x);
            }
            out.push(']');
        }
        Value::Obj(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                json_str(out, k);
                out.push_str(": ");
                write_value(out, x);
            }
            out.push('}');
        }
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> bool {
        let ok = self.s[self.i..].starts_with(lit.as_bytes());
        if ok {
            self.i += lit.len();
        }
        ok
    }

    fn value(&mut self) -> Result<Value, String> {
        self.ws();
        let at = self.i + 1;
        match self.s.get(self.i) {
            None => Err("unexpected end of line".into()),
            Some(b'n') if self.eat("null") => Ok(Value::Null),
            Some(b't') if self.eat("true") => Ok(Value::Bool(true)),
            Some(b'f') if self.eat("false") => Ok(Value::Bool(false)),
            Some(b'"') => self.string().map(Value::Str),
            Some(b'[') => {
                self.i += 1;
                let mut a = Vec::new();
                self.ws();
                if self.eat("]") {
                    return Ok(Value::Arr(a));
                }
                loop {
                    a.push(self.value()?);
                    self.ws();
                    if self.eat("]") {
                        return Ok(Value::Arr(a));
                    }
                    if !self.eat(",") {
                        return Err(format!("expected `,` or `]` at column {}", self.i + 1));
                    }
                }
            }
            Some(b'{') => {
                self.i += 1;
                let mut o = Vec::new();
                self.ws();
                if self.eat("}") {
                    return Ok(Value::Obj(o));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return Err(format!("expected a key at column {}", self.i + 1));
                    }
                    let k = self.string()?;
                    self.ws();
                    if !self.eat(":") {
                        return Err(format!("expected `:` at column {}", self.i + 1));
                    }
                    o.push((k, self.value()?));
                    self.ws();
                    if self.eat("}") {
                        return Ok(Value::Obj(o));
                    }
                    if !self.eat(",") {
                        return Err(format!("expected `,` or `}}` at column {}", self.i + 1));
                    }
                }
            }
            Some(b) if *b == b'-' || b.is_ascii_digit() => {
                let start = self.i;
                while self.s.get(self.i).is_some_and(|b| b"+-.eE".contains(b) || b.is_ascii_digit()) {
                    self.i += 1;
                }
                Ok(Value::Num(String::from_utf8_lossy(&self.s[start..self.i]).into_owned()))
            }
            Some(_) => Err(format!("unexpected character at column {at}")),
        }
    }

    /// A string at `self.i` (on its opening quote), escapes decoded (surrogate pairs joined).
    fn string(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.s.get(self.i).is_some_and(|b| *b != b'"' && *b != b'\\') {
                self.i += 1;
            }
            out.push_str(std::str::from_utf8(&self.s[start..self.i]).expect("a slice of a str at ASCII bounds"));
            match self.s.get(self.i) {
                None => return Err("a string is never closed".into()),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                _ => {}
            }
            let esc = *self.s.get(self.i + 1).ok_or("a string is never closed")?;
            self.i += 2;
            let c = match esc {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let hi = self.hex4()?;
                    let code = if (0xd800..0xdc00).contains(&hi) && self.eat("\\u") {
                        let lo = self.hex4()?;
                        if !(0xdc00..0xe000).contains(&lo) {
                            return Err(format!("a lone surrogate \\u{hi:04x}"));
                        }
                        0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                    } else {
                        hi
                    };
                    char::from_u32(code).ok_or_else(|| format!("a lone surrogate \\u{code:04x}"))?
                }
                b => return Err(format!("unknown escape \\{}", b as char)),
            };
            out.push(c);
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self.s.get(self.i..self.i + 4).and_then(|h| std::str::from_utf8(h).ok());
        let v = h.and_then(|h| u32::from_str_radix(h, 16).ok()).ok_or("expected 4 hex digits after \\u")?;
        self.i += 4;
        Ok(v)
    }
}

/// Python's `str.strip()`: Unicode white space and the separators U+001C..U+001F.
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

/// Python's `str.isspace()`.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A JSON value of the rows written here.
enum Json<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
}

/// One JSON object as Python's `json.dumps(obj, ensure_ascii=False)` writes it, plus `\n`.
fn json_line(out: &mut String, fields: &[(&str, Json)]) {
    out.push('{');
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        json_str(out, k);
        out.push_str(": ");
        match v {
            Json::Str(s) => json_str(out, s),
            Json::Int(n) => out.push_str(&n.to_string()),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        }
    }
    out.push_str("}\n");
}

/// A JSON string as Python's `json` writes it with `ensure_ascii=False`: `"`, `\` and the
/// control characters U+0000..U+001F escaped (`\n \r \t \b \f` by name, the others as `\u00xx`).
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn utf8<'a>(b: &'a [u8], what: &str) -> Result<&'a str, String> {
    std::str::from_utf8(b)
        .map_err(|e| format!("{what}: expected UTF-8, found an invalid byte at offset {}", e.valid_up_to()))
}

/// Parses CSV as Python's `csv.reader` (default dialect) does on a file opened with
/// `newline=''`: `,` separates fields, `"` quotes them (`""` inside quotes is one `"`), and a
/// `\n`, `\r\n` or `\r` outside quotes ends a row; quoted fields keep their line breaks. Empty
/// lines give no row.
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    // Whether the current row has any content (a field separator or a character).
    let mut started = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if field.is_empty() => {
                started = true;
                let open_line = line;
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                            }
                            field.push(c);
                        }
                        None => return Err(format!("CSV: a quoted field opened on line {open_line} is never closed")),
                    }
                }
                match chars.peek() {
                    None | Some(',') | Some('\n') | Some('\r') => {}
                    Some(c) => {
                        return Err(format!(
                            "CSV line {line}: expected `,` or a line end after a closing quote, found {c:?}"
                        ))
                    }
                }
            }
            ',' => {
                started = true;
                row.push(std::mem::take(&mut field));
            }
            '\r' | '\n' => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                line += 1;
                if started {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                started = false;
            }
            c => {
                started = true;
                field.push(c);
            }
        }
    }
    if started {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

/// ILSUM: the CSV `Id,Heading,Article,Summary` to JSON Lines
/// `{"id", "heading", "article_extract", "summary"}`, text unchanged, rows in file order.
fn ilsum_csv(csv: &[u8]) -> Result<Vec<u8>, String> {
    let rows = parse_csv(utf8(csv, "ILSUM CSV")?)?;
    let Some((head, rows)) = rows.split_first() else {
        return Err("ILSUM CSV: expected a header row Id,Heading,Article,Summary, found an empty file".into());
    };
    if head != &["Id", "Heading", "Article", "Summary"] {
        return Err(format!("ILSUM CSV: expected the header Id,Heading,Article,Summary, found {}", head.join(",")));
    }
    let mut out = String::with_capacity(csv.len() + csv.len() / 50);
    for (i, r) in rows.iter().enumerate() {
        let [id, heading, article, summary] = r.as_slice() else {
            return Err(format!("ILSUM CSV row {}: expected 4 fields, found {}", i + 1, r.len()));
        };
        json_line(
            &mut out,
            &[
                ("id", Json::Str(id)),
                ("heading", Json::Str(heading)),
                ("article_extract", Json::Str(article)),
                ("summary", Json::Str(summary)),
            ],
        );
    }
    Ok(out.into_bytes())
}

/// One `<item>` of a COPA XML file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CopaItem {
    id: i64,
    asks_for: String,
    /// `most-plausible-alternative`: 1 or 2.
    answer: i64,
    p: String,
    a1: String,
    a2: String,
}

/// COPA: Balanced-COPA's `balacopa-dev-all.xml` to JSON Lines
/// `{"id", "premise", "choice1", "choice2", "question", "label", "mirrored", "original_copa_id"}`
/// (label = `most-plausible-alternative` - 1), in file order, keeping ids 1-400 and 1001-1400.
/// Original items (ids 1-400) take the original COPA alternative order from `labels`
/// (wietsedv/NLP-NL `COPA-NL/train.jsonl`: `{"id", "label", ...}` per line, the original COPA ids
/// and labels): where its label differs from the XML's, the two alternatives are swapped. Mirrored
/// items (1001-1400) are kept as they are.
fn copa_xml(xml: &[u8], labels: &[u8]) -> Result<Vec<u8>, String> {
    let items = parse_copa_xml(utf8(xml, "COPA XML")?)?;
    let mut original: BTreeMap<i64, i64> = BTreeMap::new();
    for (i, line) in utf8(labels, "COPA labels")?.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("COPA labels line {}: expected a JSON object, found an error: {e}", i + 1))?;
        let (Some(id), Some(label)) = (v.get("id").and_then(|x| x.as_i64()), v.get("label").and_then(|x| x.as_i64()))
        else {
            return Err(format!("COPA labels line {}: expected integer fields `id` and `label`", i + 1));
        };
        original.insert(id, label);
    }
    let mut out = String::new();
    for it in items {
        let mirrored = (1001..=1400).contains(&it.id);
        if !mirrored && !(1..=400).contains(&it.id) {
            continue;
        }
        if !(1..=2).contains(&it.answer) {
            return Err(format!(
                "COPA item {}: expected most-plausible-alternative 1 or 2, found {}",
                it.id, it.answer
            ));
        }
        let (mut c1, mut c2, mut label) = (&it.a1, &it.a2, it.answer - 1);
        if !mirrored {
            let Some(&orig) = original.get(&it.id) else {
                return Err(format!("COPA item {}: the labels file has no row with this id", it.id));
            };
            if !(0..=1).contains(&orig) {
                return Err(format!("COPA labels: expected label 0 or 1 for id {}, found {orig}", it.id));
            }
            if orig != label {
                (c1, c2, label) = (c2, c1, orig);
            }
        }
        json_line(
            &mut out,
            &[
                ("id", Json::Int(it.id)),
                ("premise", Json::Str(&it.p)),
                ("choice1", Json::Str(c1)),
                ("choice2", Json::Str(c2)),
                ("question", Json::Str(&it.asks_for)),
                ("label", Json::Int(label)),
                ("mirrored", Json::Bool(mirrored)),
                ("original_copa_id", Json::Int(if mirrored { it.id - 1000 } else { it.id })),
            ],
        );
    }
    Ok(out.into_bytes())
}

/// The `<item id=.. asks-for=.. most-plausible-alternative=..>` elements of a COPA corpus with
/// their `<p>`, `<a1>`, `<a2>` texts (entities decoded, text otherwise unchanged). Only the COPA
/// corpus format is understood: no CDATA, no nested elements inside the texts.
fn parse_copa_xml(xml: &str) -> Result<Vec<CopaItem>, String> {
    let mut items = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find("<item") {
        let after = &rest[at + 5..];
        if !after.starts_with(|c: char| c.is_whitespace() || c == '>') {
            rest = after;
            continue;
        }
        let end = after.find('>').ok_or("COPA XML: an <item> tag is never closed")?;
        let attrs = parse_attrs(&after[..end])?;
        let body_end = after.find("</item>").ok_or("COPA XML: an <item> element is never closed")?;
        let body = &after[end + 1..body_end];
        let attr =
            |k: &str| attrs.get(k).cloned().ok_or_else(|| format!("COPA XML: an <item> without the attribute `{k}`"));
        let int = |k: &str| -> Result<i64, String> {
            let v = attr(k)?;
            v.trim().parse().map_err(|_| format!("COPA XML: expected an integer {k}, found {v:?}"))
        };
        let id = int("id")?;
        let text = |tag: &str| -> Result<String, String> {
            let open = format!("<{tag}>");
            let close = format!("</{tag}>");
            let s = body.find(&open).ok_or_else(|| format!("COPA XML item {id}: no <{tag}> element"))? + open.len();
            let e = body[s..].find(&close).ok_or_else(|| format!("COPA XML item {id}: <{tag}> is never closed"))?;
            unescape(&body[s..s + e])
        };
        items.push(CopaItem {
            id,
            asks_for: attr("asks-for")?,
            answer: int("most-plausible-alternative")?,
            p: text("p")?,
            a1: text("a1")?,
            a2: text("a2")?,
        });
        rest = &after[body_end + 7..];
    }
    if items.is_empty() {
        return Err("COPA XML: expected <item> elements, found none".into());
    }
    Ok(items)
}

/// `k="v"` (or `k='v'`) pairs of a start tag, values unescaped.
fn parse_attrs(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() && rest != "/" {
        let eq = rest.find('=').ok_or_else(|| format!("XML: expected name=\"value\" in a tag, found {rest:?}"))?;
        let name = rest[..eq].trim().to_string();
        let v = rest[eq + 1..].trim_start();
        let q = v.chars().next().filter(|c| *c == '"' || *c == '\'').ok_or_else(|| format!("XML: unquoted {name}"))?;
        let close = v[1..].find(q).ok_or_else(|| format!("XML: the value of {name} is never closed"))?;
        out.insert(name, unescape(&v[1..1 + close])?);
        rest = v[close + 2..].trim_start();
    }
    Ok(out)
}

/// XML text with its five named entities and numeric character references decoded; line ends
/// normalised to `\n` as an XML parser does.
fn unescape(s: &str) -> Result<String, String> {
    let s = s.replace("\r\n", "\n").replace('\r', "\n");
    if !s.contains('&') {
        return Ok(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let end = rest[at..].find(';').ok_or_else(|| format!("XML: an entity is never closed: {:?}", &rest[at..]))?;
        let ent = &rest[at + 1..at + end];
        let c = match ent {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            e => {
                let n = if let Some(h) = e.strip_prefix("#x") {
                    u32::from_str_radix(h, 16).ok()
                } else {
                    e.strip_prefix('#').and_then(|d| d.parse().ok())
                };
                n.and_then(char::from_u32).ok_or_else(|| format!("XML: unknown entity &{e};"))?
            }
        };
        out.push(c);
        rest = &rest[at + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: Vec<u8>) -> String {
        String::from_utf8(b).unwrap()
    }

    fn spec(columns: &[&str], member: Option<&str>) -> Input {
        Input {
            url: "https://example.org/x".into(),
            size: None,
            sha256: None,
            columns: columns.iter().map(|c| c.to_string()).collect(),
            member: member.map(str::to_string),
            include: Vec::new(),
            exclude: Vec::new(),
            line_prefix: None,
        }
    }

    /// A zip archive of `(name, bytes, deflate?)` members, as `zip` writes one.
    fn zip(members: &[(&str, &[u8], bool)]) -> Vec<u8> {
        let (mut out, mut cd) = (Vec::new(), Vec::new());
        for (name, bytes, deflate) in members {
            let data = if *deflate { miniz_oxide::deflate::compress_to_vec(bytes, 6) } else { bytes.to_vec() };
            let method: u16 = if *deflate { 8 } else { 0 };
            let local = out.len() as u32;
            let head = |sig: u32, central: bool| {
                let mut h = sig.to_le_bytes().to_vec();
                if central {
                    h.extend(20u16.to_le_bytes());
                }
                h.extend(20u16.to_le_bytes());
                h.extend(0u16.to_le_bytes());
                h.extend(method.to_le_bytes());
                h.extend([0u8; 8]); // time, date, crc (not checked)
                h.extend((data.len() as u32).to_le_bytes());
                h.extend((bytes.len() as u32).to_le_bytes());
                h.extend((name.len() as u16).to_le_bytes());
                h.extend(0u16.to_le_bytes());
                if central {
                    h.extend([0u8; 10]); // comment length, disk, attributes
                    h.extend(local.to_le_bytes());
                }
                h.extend(name.as_bytes());
                h
            };
            cd.extend(head(0x0201_4b50, true));
            out.extend(head(0x0403_4b50, false));
            out.extend(&data);
        }
        let at = out.len() as u32;
        let n = members.len() as u16;
        out.extend(&cd);
        out.extend(0x0605_4b50u32.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend(n.to_le_bytes());
        out.extend(n.to_le_bytes());
        out.extend((cd.len() as u32).to_le_bytes());
        out.extend(at.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    #[test]
    fn zip_jsonl_reads_the_member_and_rewrites_rows_as_python_does() {
        let rows = "{\"id\":\"a\",\"title\":\"\\u0939\\u093f \\\"q\\\" \\/ \\ud83d\\ude00\",\"n\": [1, -2.5e3, true, null, {}]}\n\n\
                    {\"z\": \"last\\nrow\", \"a\": \"\\t\"}";
        let want = "{\"id\": \"a\", \"title\": \"हि \\\"q\\\" / 😀\", \"n\": [1, -2.5e3, true, null, {}]}\n\
                    {\"z\": \"last\\nrow\", \"a\": \"\\t\"}\n";
        for deflate in [false, true] {
            let z = zip(&[
                ("dummy_data/u%3Fid/hindi_val.jsonl", b"{\"x\": 1}\n", deflate),
                ("dummy_data/u%3Fid/hindi_train.jsonl", rows.as_bytes(), deflate),
            ]);
            let out = derive_with("zip-jsonl", &[z], &[spec(&[], Some("hindi_train.jsonl"))]).unwrap();
            assert_eq!(text(out), want);
        }
        let z = zip(&[("d/hindi_val.jsonl", b"{}", true)]);
        let e =
            derive_with("zip-jsonl", std::slice::from_ref(&z), &[spec(&[], Some("hindi_train.jsonl"))]).unwrap_err();
        assert!(e.contains("expected one member named hindi_train.jsonl, found 0 among d/hindi_val.jsonl"), "{e}");
        let e = derive_with("zip-jsonl", &[z], &[spec(&[], None)]).unwrap_err();
        assert!(e.contains("needs the input's member"), "{e}");
        let bad = zip(&[("d/t.jsonl", b"{\"a\": 1,}", false)]);
        let e = derive_with("zip-jsonl", &[bad], &[spec(&[], Some("t.jsonl"))]).unwrap_err();
        assert!(e.contains("t.jsonl line 1: expected one JSON value"), "{e}");
        let e = derive_with("zip-jsonl", &[b"not a zip".to_vec()], &[spec(&[], Some("t.jsonl"))]).unwrap_err();
        assert!(e.contains("expected a zip archive"), "{e}");
    }

    #[test]
    fn zip_text_reads_the_matching_members_in_path_order_and_drops_repeated_lines() {
        let top = "UD_X-15d6";
        let conllu = |a: &str, b: &str| format!("# newdoc id = d\n# text = {a}\n1\tx\n\n# text =  {b} \n1\ty\n");
        let members: Vec<(String, Vec<u8>)> = vec![
            (format!("{top}/"), Vec::new()),
            (format!("{top}/src/b/2.conllu"), conllu("two", "one").into_bytes()),
            (format!("{top}/src/a/1.conllu"), conllu("one", "three").into_bytes()),
            (format!("{top}/src/a/deeper/3.conllu"), conllu("deep", "x").into_bytes()),
            (format!("{top}/src/a/1.txt"), b"# text = txt\n".to_vec()),
            (format!("{top}/en.conllu"), conllu("top", "x").into_bytes()),
        ];
        for deflate in [false, true] {
            let z = zip(&members.iter().map(|(n, b)| (n.as_str(), b.as_slice(), deflate)).collect::<Vec<_>>());
            let s = Input {
                include: vec!["src/*/*.conllu".into()],
                line_prefix: Some("# text = ".into()),
                ..spec(&[], None)
            };
            assert_eq!(text(derive_with("zip-text", std::slice::from_ref(&z), &[s]).unwrap()), "one\nthree\ntwo\n");
            // Plain lines of everything under src/ but src/a/deeper/, paths in byte order.
            let s =
                Input { include: vec!["src/**".into()], exclude: vec!["src/a/deeper/**".into()], ..spec(&[], None) };
            let want = "# newdoc id = d\n# text = one\n1\tx\n# text =  three\n1\ty\n# text = txt\n# text = two\n\
                        # text =  one\n";
            assert_eq!(text(derive_with("zip-text", std::slice::from_ref(&z), &[s]).unwrap()), want);
            let s = Input { include: vec!["nothing/**".into()], ..spec(&[], None) };
            let e = derive_with("zip-text", &[z], &[s]).unwrap_err();
            assert!(e.contains("expected members matching nothing/** under the top folder, found none"), "{e}");
        }
        let e = derive_with("zip-text", &[Vec::new()], &[spec(&[], None)]).unwrap_err();
        assert!(e.contains("needs the input's include globs"), "{e}");
        let s = Input { line_prefix: Some("x".into()), ..spec(&[], None) };
        let e = derive_with("dedup-lines", &[Vec::new()], &[s]).unwrap_err();
        assert!(e.contains("takes no include, exclude or line_prefix"), "{e}");
        assert!(glob_match("a/**", "a/b/c") && glob_match("**/c", "c") && glob_match("a/?.t*", "a/ఉ.txt"));
        assert!(!glob_match("a/*", "a/b/c") && !glob_match("a/**", "b/a") && !glob_match("*.c", "x.cc"));
    }

    #[test]
    fn json_strings_are_escaped_as_python_writes_them() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\nd\re\tf\u{8}\u{c}\u{1}\u{1f} é हिन्दी 😀 / \u{7f}");
        assert_eq!(s, "\"a\\\"b\\\\c\\nd\\re\\tf\\b\\f\\u0001\\u001f é हिन्दी 😀 / \u{7f}\"");
        let mut s = String::new();
        json_line(&mut s, &[("id", Json::Int(-3)), ("x", Json::Bool(true)), ("y", Json::Str(""))]);
        assert_eq!(s, "{\"id\": -3, \"x\": true, \"y\": \"\"}\n");
    }

    #[test]
    fn csv_is_parsed_as_python_csv_reader_does() {
        let rows = parse_csv("a,b,c\r\n\"x,1\",\"say \"\"hi\"\"\",\"two\nlines\r\n\"\n,,\n\nlast,\"\",z").unwrap();
        assert_eq!(
            rows,
            vec![
                vec!["a", "b", "c"],
                vec!["x,1", "say \"hi\"", "two\nlines\r\n"],
                vec!["", "", ""],
                vec!["last", "", "z"],
            ]
        );
        let e = parse_csv("a,\"b\nc").unwrap_err();
        assert!(e.contains("line 1") && e.contains("never closed"), "{e}");
        let e = parse_csv("a,\"b\"c\n").unwrap_err();
        assert!(e.contains("after a closing quote"), "{e}");
    }

    #[test]
    fn ilsum_csv_becomes_jsonl_with_text_unchanged() {
        let csv = "Id,Heading,Article,Summary\nhindi_1,शीर्षक,\"लेख, \"\"उद्धरण\"\"\r\nदूसरी\",सार\nhindi_2,h,a,s\n";
        let out = text(derive("ilsum-csv", &[csv.as_bytes().to_vec()]).unwrap());
        assert_eq!(
            out,
            "{\"id\": \"hindi_1\", \"heading\": \"शीर्षक\", \"article_extract\": \"लेख, \\\"उद्धरण\\\"\\r\\nदूसरी\", \"summary\": \"सार\"}\n\
             {\"id\": \"hindi_2\", \"heading\": \"h\", \"article_extract\": \"a\", \"summary\": \"s\"}\n"
        );
        let e = derive("ilsum-csv", &[b"Id,Title,Article,Summary\n".to_vec()]).unwrap_err();
        assert!(e.contains("expected the header Id,Heading,Article,Summary") && e.contains("Title"), "{e}");
        let e = derive("ilsum-csv", &[b"Id,Heading,Article,Summary\na,b,c\n".to_vec()]).unwrap_err();
        assert!(e.contains("row 1: expected 4 fields, found 3"), "{e}");
        let e = derive("ilsum-csv", &[vec![0xff, 0xfe]]).unwrap_err();
        assert!(e.contains("expected UTF-8"), "{e}");
    }

    const COPA_XML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE copa-corpus SYSTEM "copa.dtd">
<copa-corpus  version="1.0">

  <item id="1" asks-for="cause" most-plausible-alternative="1">
    <p>My body cast a shadow.</p>
    <a1>The sun was rising.</a1>
    <a2>The grass was cut.</a2>
  </item>

  <item id="1001" asks-for="cause" most-plausible-alternative="1">
    <p>The garden looked well-groomed.</p>
    <a1>The grass was cut.</a1>
    <a2>The sun was rising.</a2>
  </item>

  <item id="2" asks-for="effect" most-plausible-alternative="1">
    <p>Swapped &amp; "quoted" &lt;here&gt; &#233;</p>
    <a1>Second.</a1>
    <a2>First. </a2>
  </item>

  <item id="401" asks-for="cause" most-plausible-alternative="2">
    <p>Held out.</p>
    <a1>x</a1>
    <a2>y</a2>
  </item>

  <item id="1401" asks-for="cause" most-plausible-alternative="2">
    <p>Held out, mirrored.</p>
    <a1>x</a1>
    <a2>y</a2>
  </item>
</copa-corpus>
"#;

    #[test]
    fn copa_xml_restores_the_original_order_and_keeps_ids_1_400_and_1001_1400() {
        // Item 2: the XML says alternative 1 (its a1 = "Second."); the original COPA label is 1,
        // so the original order is ("First. ", "Second.") with label 1.
        let labels = "{\"id\": 1, \"label\": 0, \"premise\": \"Mijn lichaam\"}\n{\"id\": 2, \"label\": 1}\n";
        let out = text(derive("copa-xml", &[COPA_XML.as_bytes().to_vec(), labels.as_bytes().to_vec()]).unwrap());
        let want = [
            r#"{"id": 1, "premise": "My body cast a shadow.", "choice1": "The sun was rising.", "choice2": "The grass was cut.", "question": "cause", "label": 0, "mirrored": false, "original_copa_id": 1}"#,
            r#"{"id": 1001, "premise": "The garden looked well-groomed.", "choice1": "The grass was cut.", "choice2": "The sun was rising.", "question": "cause", "label": 0, "mirrored": true, "original_copa_id": 1}"#,
            r#"{"id": 2, "premise": "Swapped & \"quoted\" <here> é", "choice1": "First. ", "choice2": "Second.", "question": "effect", "label": 1, "mirrored": false, "original_copa_id": 2}"#,
        ];
        assert_eq!(out, want.iter().map(|l| format!("{l}\n")).collect::<String>());
        let e =
            derive("copa-xml", &[COPA_XML.as_bytes().to_vec(), b"{\"id\": 1, \"label\": 0}\n".to_vec()]).unwrap_err();
        assert!(e.contains("COPA item 2: the labels file has no row"), "{e}");
        let e = derive("copa-xml", &[b"<copa-corpus/>".to_vec(), labels.as_bytes().to_vec()]).unwrap_err();
        assert!(e.contains("found none"), "{e}");
    }

    #[test]
    fn dedup_lines_strips_drops_empty_and_repeated_lines_across_inputs() {
        let a = "  one \r\ntwo\n\n\t\none\nthree\u{2003}".as_bytes().to_vec();
        let b = "two\nfour\n\u{1f}three\n".as_bytes().to_vec();
        assert_eq!(text(derive("dedup-lines", &[a, b]).unwrap()), "one\ntwo\nthree\nfour\n");
        assert_eq!(text(derive("dedup-lines", &[Vec::new()]).unwrap()), "");
        let e = derive("dedup-lines", &[]).unwrap_err();
        assert!(e.contains("one or more input files, found none"), "{e}");
    }

    #[test]
    fn dedup_lines_reads_named_csv_columns_column_by_column() {
        let csv = "S1,S2,Label\n\"a, 1\",b,x\nc,a,y\n".as_bytes().to_vec();
        let specs = [spec(&["S1", "S2"], None), spec(&[], None)];
        let out = derive_with("dedup-lines", &[csv.clone(), b"b\nd\n".to_vec()], &specs).unwrap();
        assert_eq!(text(out), "a, 1\nc\nb\na\nd\n");
        let e = derive_with("dedup-lines", std::slice::from_ref(&csv), &[spec(&["Text"], None)]).unwrap_err();
        assert!(e.contains("input 1: expected a CSV column \"Text\", found the columns S1,S2,Label"), "{e}");
        let e = derive_with("ilsum-csv", &[csv], &[spec(&["S1"], None)]).unwrap_err();
        assert!(e.contains("reads no CSV columns"), "{e}");
    }

    #[test]
    fn bbc_items_become_jsonl_and_the_hashed_tenth_is_held_out() {
        // The first article is cp1252; its body decodes to `body “£”`.
        let body = "body \u{201c}\u{a3}\u{201d}";
        let kept = (0..).map(|k| format!("Kept {k}")).find(|t| !held_out_mod10(&format!("{t} {body}"))).unwrap();
        let held = (0..).map(|k| format!("Held {k}")).find(|t| held_out_mod10(&format!("{t} body"))).unwrap();
        let url = |dir: &str, c: &str, n: &str| format!("https://x/BBC%20News%20Summary/{dir}/{c}/{n}.txt");
        let specs: Vec<Input> = [
            url("News%20Articles", "sport", "001"),
            url("News%20Articles", "tech", "002"),
            url("Summaries", "sport", "001"),
            url("Summaries", "tech", "002"),
        ]
        .into_iter()
        .map(|u| Input { url: u, ..spec(&[], None) })
        .collect();
        let mut cp1252 = format!(" {kept} \n\n body ").into_bytes();
        cp1252.extend(b"\x93\xa3\x94\n");
        let inputs = vec![cp1252, format!("{held}\n\nbody").into_bytes(), b"Sum.Mary \n".to_vec(), b"x".to_vec()];
        let out = text(derive_with("bbc-news-summary", &inputs, &specs).unwrap());
        let want = format!(
            "{{\"id\": \"sport/001\", \"category\": \"sport\", \"title\": \"{kept}\", \"article\": \"{body}\", \
             \"summary\": \"Sum.Mary\"}}\n"
        );
        assert_eq!(out, want, "tech/002 is held out");
        assert!(held_out_mod10(&format!("  {}\t BODY\u{a0}", held.to_uppercase())), "normalised before hashing");
        let e = derive_with("bbc-news-summary", &inputs[..3], &specs[..3]).unwrap_err();
        assert!(e.contains("article files then as many summary files"), "{e}");
        let swapped = [specs[0].clone(), specs[1].clone(), specs[3].clone(), specs[2].clone()];
        let e = derive_with("bbc-news-summary", &inputs, &swapped).unwrap_err();
        assert!(e.contains("expected the summary of sport/001"), "{e}");
    }

    #[test]
    fn unknown_recipes_and_wrong_input_counts_are_refused() {
        let e = derive("magic", &[]).unwrap_err();
        assert!(e.contains("unknown recipe `magic`") && e.contains("ilsum-csv"), "{e}");
        let e = derive("copa-xml", &[Vec::new()]).unwrap_err();
        assert!(e.contains("takes 2 input file(s), found 1"), "{e}");
    }
}
