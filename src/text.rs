//! Short texts for operators: bounding a message so a summary stays within what CodeDeploy
//! shows.

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

#[cfg(test)]
mod tests {
    use super::truncate;

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
