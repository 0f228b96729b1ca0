//! A small language table: ISO 639-1 code, FLORES-200 code, English name, XL-Sum file name.
//! Only used to accept either kind of code and to name languages in prompts; unknown languages
//! still work with the dataset's own code.

/// `(iso, flores, english name, xl-sum name)`.
const LANGS: &[(&str, &str, &str, &str)] = &[
    ("en", "eng_Latn", "English", "english"),
    ("hi", "hin_Deva", "Hindi", "hindi"),
    ("bn", "ben_Beng", "Bengali", "bengali"),
    ("ta", "tam_Taml", "Tamil", "tamil"),
    ("mr", "mar_Deva", "Marathi", "marathi"),
    ("te", "tel_Telu", "Telugu", "telugu"),
    ("gu", "guj_Gujr", "Gujarati", "gujarati"),
    ("fr", "fra_Latn", "French", "french"),
    ("pa", "pan_Guru", "Punjabi", "punjabi"),
    ("ur", "urd_Arab", "Urdu", "urdu"),
    ("ne", "npi_Deva", "Nepali", "nepali"),
    ("as", "asm_Beng", "Assamese", ""),
    ("kn", "kan_Knda", "Kannada", ""),
    ("ml", "mal_Mlym", "Malayalam", ""),
    ("or", "ory_Orya", "Odia", ""),
];

fn find(code: &str) -> Option<&'static (&'static str, &'static str, &'static str, &'static str)> {
    LANGS.iter().find(|(iso, flores, name, xlsum)| {
        [*iso, *flores, *name, *xlsum].iter().any(|c| !c.is_empty() && c.eq_ignore_ascii_case(code))
    })
}

/// The FLORES-200 code (`eng_Latn`) for an ISO code or name; unknown codes pass through.
pub fn flores_code(code: &str) -> String {
    find(code).map_or_else(|| code.to_string(), |l| l.1.to_string())
}

/// The ISO 639-1 code (`en`) for a FLORES code or name; unknown codes pass through.
pub fn iso_code(code: &str) -> String {
    find(code).map_or_else(|| code.to_string(), |l| l.0.to_string())
}

/// The XL-Sum file-name language (`hindi`) for an ISO or FLORES code; unknown codes pass through.
pub fn xlsum_name(code: &str) -> String {
    find(code).filter(|l| !l.3.is_empty()).map_or_else(|| code.to_string(), |l| l.3.to_string())
}

/// The English name of a language (`Hindi`), or the code itself when unknown.
pub fn english_name(code: &str) -> String {
    find(code).map_or_else(|| code.to_string(), |l| l.2.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_both_ways_and_unknowns_pass_through() {
        assert_eq!(flores_code("hi"), "hin_Deva");
        assert_eq!(iso_code("tam_Taml"), "ta");
        assert_eq!(xlsum_name("bn"), "bengali");
        assert_eq!(english_name("mar_Deva"), "Marathi");
        assert_eq!(flores_code("zul_Latn"), "zul_Latn");
        assert_eq!(xlsum_name("kn"), "kn");
    }
}
