//! Text that came from a request, made safe to show. A tenant id, a binding
//! name read from a wrapped key or a context key is the caller's bytes: put
//! raw into a status message, a log line or an audit record, a newline forges
//! a log line and an ANSI escape rewrites a terminal. Everything such text
//! reaches goes through [`Quoted`] (messages) or [`Escaped`] (log fields).

use std::fmt;

/// Longest request text shown in full; longer text is cut with `…`.
pub const MAX_SHOWN_CHARS: usize = 128;

/// Caller text for a log or trace field: control characters, quotes and
/// backslashes escaped (`\n`, `\u{1b}`), cut after [`MAX_SHOWN_CHARS`].
#[derive(Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

/// Caller text inside a message: [`Escaped`] between single quotes.
#[derive(Clone, Copy)]
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX_SHOWN_CHARS {
                return f.write_str("…");
            }
            match c {
                '\'' => f.write_str("\\'")?,
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                // Control characters (C0, DEL, C1) and the Unicode line and
                // paragraph separators that some viewers break lines on.
                c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                    write!(f, "{}", c.escape_default())?;
                }
                c => fmt::Write::write_char(f, c)?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}'", Escaped(self.0))
    }
}

impl fmt::Debug for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A Unix time in milliseconds as RFC 3339 (UTC), for messages.
pub fn rfc3339(ms: i64) -> String {
    let at =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// `Quoted` as an owned string (for error fields built once).
pub fn quoted(text: &str) -> String {
    Quoted(text).to_string()
}

/// True when `text` has a character [`Escaped`] would escape (tests and
/// log checks).
pub fn has_control(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_capped() {
        let hostile = "acme\nINFO forged line\u{1b}[31m\r\t'\"\\\u{7f}\u{85}\u{2028}";
        let shown = Quoted(hostile).to_string();
        assert!(!has_control(&shown), "{shown:?}");
        assert_eq!(
            shown,
            "'acme\\nINFO forged line\\u{1b}[31m\\r\\t\\'\\\"\\\\\\u{7f}\\u{85}\\u{2028}'"
        );
        let long = "x".repeat(MAX_SHOWN_CHARS + 10);
        let shown = Escaped(&long).to_string();
        assert_eq!(shown.chars().count(), MAX_SHOWN_CHARS + 1);
        assert!(shown.ends_with('…'));
        assert_eq!(Quoted("acme").to_string(), "'acme'");
        assert_eq!(quoted("k-1"), "'k-1'");
    }
}
