//! Text from outside the process cut to fit where people read it: Telegram messages, chart
//! captions, error messages quoting a response body. Counted in characters, not bytes, so a
//! cut never splits a UTF-8 sequence.

/// `text` if it has at most `max` characters; otherwise its first `max - 1` and an ellipsis,
/// so the result never exceeds `max`.
pub fn ellipsize(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_to_the_limit_with_an_ellipsis() {
        assert_eq!(ellipsize("short", 5), "short");
        assert_eq!(ellipsize("longer", 5), "long…");
        assert_eq!(ellipsize("ééééééé", 3), "éé…");
        assert_eq!(ellipsize("abc", 0), "…");
    }
}
