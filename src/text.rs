//! Short texts for operators: bounding a message so a summary stays within what CodeDeploy
//! shows, and escaping text from outside (entry names, ids, paths) so it cannot forge log
//! lines or terminal escapes.

/// `s` cut to at most `max` bytes on a character boundary, ending in `...` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// `s` with control characters (newline, escape, DEL, C1, bidi overrides) and backslash
/// written as `\n`, `\u{1b}` ...: one line, printable, and unambiguous.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if c.is_control()
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c) =>
            {
                o.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => o.push(c),
        }
    }
    o
}

/// Bytes from outside (a file name) as escaped text: invalid UTF-8 shown as `\x..`.
pub fn escape_bytes(b: &[u8]) -> String {
    let mut o = String::new();
    for chunk in b.utf8_chunks() {
        o.push_str(&escape(chunk.valid()));
        for x in chunk.invalid() {
            o.push_str(&format!("\\x{x:02x}"));
        }
    }
    o
}

/// A path for a message: escaped like [`escape_bytes`].
pub fn path(p: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    escape_bytes(p.as_os_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::{escape, escape_bytes, truncate};

    #[test]
    fn escape_keeps_one_printable_line() {
        assert_eq!(escape("a\nb\x1b[31m\\"), "a\\nb\\u{1b}[31m\\\\");
        assert_eq!(escape_bytes(b"ok\xff\n"), "ok\\xff\\n");
        assert_eq!(escape("plain/é"), "plain/é");
    }

    #[test]
    fn cuts_on_a_character_boundary_within_the_limit() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("abcdefghij", 8), "abcde...");
        // "é" is two bytes: the cut never splits it.
        let t = truncate("aaaaéé", 7);
        assert!(t.len() <= 7 && t.ends_with("..."), "{t}");
        assert_eq!(t, "aaaa...");
    }
}
