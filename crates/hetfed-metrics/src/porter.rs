//! The Porter stemmer as nltk's `PorterStemmer()` runs it by default (mode `NLTK_EXTENSIONS`),
//! which is the stemmer `rouge-score` uses with `use_stemmer=True`.
//!
//! NLTK's extensions to the 1980 algorithm: a few irregular forms (`dying` → `die`, `skies` →
//! `sky`, `news`, ...) are looked up first; words of one or two characters are left alone; step
//! 1a maps a four-letter `-ies` to `-ie`; step 1b maps `-ied` to `-ie`/`-i`; step 1c turns `y`
//! into `i` only after a consonant that is not the first letter; step 2 strips `-alli`
//! recursively, uses `-bli` → `-ble`, and adds `-fulli` → `-ful` and `-logi` → `-log`; a
//! two-letter vowel–consonant stem counts as ending consonant–vowel–consonant.

/// Stems one word (lowercased first, as nltk does).
pub fn stem(word: &str) -> String {
    let lower = word.to_lowercase();
    if let Some(s) = irregular(&lower) {
        return s.to_string();
    }
    if word.chars().count() <= 2 {
        return lower;
    }
    let mut w: Vec<char> = lower.chars().collect();
    w = step1a(w);
    w = step1b(w);
    w = step1c(w);
    w = step2(w);
    w = step3(w);
    w = step4(w);
    w = step5a(w);
    w = step5b(w);
    w.into_iter().collect()
}

fn irregular(word: &str) -> Option<&'static str> {
    Some(match word {
        "sky" | "skies" => "sky",
        "dying" => "die",
        "lying" => "lie",
        "tying" => "tie",
        "news" => "news",
        "innings" | "inning" => "inning",
        "outings" | "outing" => "outing",
        "cannings" | "canning" => "canning",
        "howe" => "howe",
        "proceed" => "proceed",
        "exceed" => "exceed",
        "succeed" => "succeed",
        _ => return None,
    })
}

fn is_vowel(c: char) -> bool {
    matches!(c, 'a' | 'e' | 'i' | 'o' | 'u')
}

/// A consonant is a letter other than a vowel, and other than a `y` after a consonant.
fn is_consonant(w: &[char], i: usize) -> bool {
    if is_vowel(w[i]) {
        return false;
    }
    if w[i] != 'y' {
        return true;
    }
    let mut i = i;
    let mut negate = false;
    while i > 0 && w[i] == 'y' {
        negate = !negate;
        i -= 1;
    }
    // nltk: `(word[i] not in vowels) != negate`.
    is_vowel(w[i]) == negate
}

/// Consonant flags of every position in one left-to-right pass (same answers as
/// [`is_consonant`]).
fn consonant_flags(w: &[char]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let f = if is_vowel(c) {
            false
        } else if c == 'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(f);
    }
    flags
}

/// `m` in `[C](VC){m}[V]`: the number of vowel-to-consonant transitions.
fn measure(stem: &[char]) -> usize {
    consonant_flags(stem).windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(stem: &[char]) -> bool {
    consonant_flags(stem).iter().any(|&c| !c)
}

fn ends_double_consonant(w: &[char]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

/// `*o`: ends consonant–vowel–consonant, the last not `w`, `x` or `y` (or, an NLTK extension,
/// is exactly vowel–consonant).
fn ends_cvc(w: &[char]) -> bool {
    let n = w.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(w[n - 1], 'w' | 'x' | 'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

fn ends_with(w: &[char], suffix: &str) -> bool {
    let n = suffix.chars().count();
    w.len() >= n && w[w.len() - n..].iter().copied().eq(suffix.chars())
}

fn strip(w: &[char], suffix: &str) -> Vec<char> {
    w[..w.len() - suffix.chars().count()].to_vec()
}

fn with(mut stem: Vec<char>, replacement: &str) -> Vec<char> {
    stem.extend(replacement.chars());
    stem
}

type Condition<'a> = &'a dyn Fn(&[char]) -> bool;

/// nltk's `_apply_rule_list`: the first rule whose suffix the word ends with decides; its
/// condition is tested on the stem (the word without the suffix), and a failed condition leaves
/// the word unchanged.
fn apply_rules(w: Vec<char>, rules: &[(&str, &str, Option<Condition>)]) -> Vec<char> {
    for &(suffix, replacement, condition) in rules {
        if ends_with(&w, suffix) {
            let stem = strip(&w, suffix);
            return if condition.is_none_or(|c| c(&stem)) { with(stem, replacement) } else { w };
        }
    }
    w
}

fn step1a(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "ies") && w.len() == 4 {
        return with(strip(&w, "ies"), "ie");
    }
    apply_rules(w, &[("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])
}

fn step1b(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "ied") {
        let stem = strip(&w, "ied");
        return with(stem, if w.len() == 4 { "ie" } else { "i" });
    }
    if ends_with(&w, "eed") {
        let stem = strip(&w, "eed");
        return if measure(&stem) > 0 { with(stem, "ee") } else { w };
    }
    let mut intermediate = None;
    for suffix in ["ed", "ing"] {
        if ends_with(&w, suffix) {
            let stem = strip(&w, suffix);
            if contains_vowel(&stem) {
                intermediate = Some(stem);
                break;
            }
        }
    }
    let Some(stem) = intermediate else {
        return w;
    };
    for (suffix, replacement) in [("at", "ate"), ("bl", "ble"), ("iz", "ize")] {
        if ends_with(&stem, suffix) {
            return with(strip(&stem, suffix), replacement);
        }
    }
    if ends_double_consonant(&stem) {
        // `*d and not (*L or *S or *Z)` -> single letter; otherwise unchanged.
        let last = stem[stem.len() - 1];
        return if matches!(last, 'l' | 's' | 'z') { stem } else { stem[..stem.len() - 1].to_vec() };
    }
    if measure(&stem) == 1 && ends_cvc(&stem) {
        return with(stem, "e");
    }
    stem
}

fn step1c(w: Vec<char>) -> Vec<char> {
    let cond = |stem: &[char]| stem.len() > 1 && is_consonant(stem, stem.len() - 1);
    apply_rules(w, &[("y", "i", Some(&cond))])
}

fn step2(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "alli") && measure(&strip(&w, "alli")) > 0 {
        return step2(with(strip(&w, "alli"), "al"));
    }
    let m: Condition = &|stem: &[char]| measure(stem) > 0;
    // `logi` tests the measure of the word without `ogi`, keeping the `l`.
    let logi = |_: &[char]| measure(&w[..w.len() - 3]) > 0;
    let rules: [(&str, &str, Option<Condition>); 22] = [
        ("ational", "ate", Some(m)),
        ("tional", "tion", Some(m)),
        ("enci", "ence", Some(m)),
        ("anci", "ance", Some(m)),
        ("izer", "ize", Some(m)),
        ("bli", "ble", Some(m)),
        ("alli", "al", Some(m)),
        ("entli", "ent", Some(m)),
        ("eli", "e", Some(m)),
        ("ousli", "ous", Some(m)),
        ("ization", "ize", Some(m)),
        ("ation", "ate", Some(m)),
        ("ator", "ate", Some(m)),
        ("alism", "al", Some(m)),
        ("iveness", "ive", Some(m)),
        ("fulness", "ful", Some(m)),
        ("ousness", "ous", Some(m)),
        ("aliti", "al", Some(m)),
        ("iviti", "ive", Some(m)),
        ("biliti", "ble", Some(m)),
        ("fulli", "ful", Some(m)),
        ("logi", "log", Some(&logi)),
    ];
    apply_rules(w.clone(), &rules)
}

fn step3(w: Vec<char>) -> Vec<char> {
    let m: Condition = &|stem: &[char]| measure(stem) > 0;
    apply_rules(
        w,
        &[
            ("icate", "ic", Some(m)),
            ("ative", "", Some(m)),
            ("alize", "al", Some(m)),
            ("iciti", "ic", Some(m)),
            ("ical", "ic", Some(m)),
            ("ful", "", Some(m)),
            ("ness", "", Some(m)),
        ],
    )
}

fn step4(w: Vec<char>) -> Vec<char> {
    let m: Condition = &|stem: &[char]| measure(stem) > 1;
    let ion: Condition = &|stem: &[char]| measure(stem) > 1 && matches!(stem.last(), Some('s' | 't'));
    apply_rules(
        w,
        &[
            ("al", "", Some(m)),
            ("ance", "", Some(m)),
            ("ence", "", Some(m)),
            ("er", "", Some(m)),
            ("ic", "", Some(m)),
            ("able", "", Some(m)),
            ("ible", "", Some(m)),
            ("ant", "", Some(m)),
            ("ement", "", Some(m)),
            ("ment", "", Some(m)),
            ("ent", "", Some(m)),
            ("ion", "", Some(ion)),
            ("ou", "", Some(m)),
            ("ism", "", Some(m)),
            ("ate", "", Some(m)),
            ("iti", "", Some(m)),
            ("ous", "", Some(m)),
            ("ive", "", Some(m)),
            ("ize", "", Some(m)),
        ],
    )
}

fn step5a(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "e") {
        let stem = strip(&w, "e");
        let m = measure(&stem);
        if m > 1 || (m == 1 && !ends_cvc(&stem)) {
            return stem;
        }
    }
    w
}

fn step5b(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "ll") && measure(&w[..w.len() - 1]) > 1 {
        return w[..w.len() - 1].to_vec();
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consonant_flags_agree_with_definition() {
        for word in ["syzygy", "yyyy", "toy", "yay", "happy", "y", "ayyb"] {
            let w: Vec<char> = word.chars().collect();
            let flags = consonant_flags(&w);
            for (i, &flag) in flags.iter().enumerate() {
                assert_eq!(flag, is_consonant(&w, i), "{word} at {i}");
            }
        }
        let m = |s: &str| measure(&s.chars().collect::<Vec<_>>());
        assert_eq!((m("tr"), m("ee"), m("tree"), m("y"), m("by")), (0, 0, 0, 0, 0));
        assert_eq!((m("trouble"), m("oats"), m("trees"), m("ivy")), (1, 1, 1, 1));
        assert_eq!((m("troubles"), m("private"), m("oaten"), m("orrery")), (2, 2, 2, 2));
    }

    #[test]
    fn paper_examples() {
        for (word, want) in [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("cats", "cat"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("hopping", "hop"),
            ("falling", "fall"),
            ("filing", "file"),
            ("happy", "happi"),
            ("relational", "relat"),
            ("generalizations", "gener"),
            ("dying", "die"),
            ("a", "a"),
            ("Running", "run"),
        ] {
            assert_eq!(stem(word), want, "{word}");
        }
    }
}
