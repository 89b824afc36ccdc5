//! Bounded quotes of untrusted text for log lines and error messages.
//!
//! Values taken from objects (a field's value, a parser's message that repeats it, a kind or a
//! name) can be megabytes long. Every message that quotes such text goes through [`excerpt`], so
//! a log line stays short and an error kept in memory stays small whatever the input.
use std::borrow::Cow;

/// Longest text quoted whole, in bytes.
pub const MAX_QUOTE: usize = 256;
/// Bytes kept from the end of a longer text (a parser's message ends with the position).
const TAIL: usize = 64;

/// `text` when it is at most [`MAX_QUOTE`] bytes long; otherwise its beginning and its end (cut
/// at character boundaries, [`MAX_QUOTE`] bytes together) around `…(N bytes)…` naming the full
/// length.
pub fn excerpt(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_QUOTE {
        return Cow::Borrowed(text);
    }
    let mut head = MAX_QUOTE - TAIL;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - TAIL;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    Cow::Owned(format!("{}…({} bytes)…{}", &text[..head], text.len(), &text[tail..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_keeps_its_ends_and_names_its_length() {
        assert_eq!(excerpt("198.19.0.300"), "198.19.0.300");
        let exact = "a".repeat(MAX_QUOTE);
        assert_eq!(excerpt(&exact), exact);
        let long = format!("{} at line 3 column 7", "é".repeat(10 * MAX_QUOTE));
        let q = excerpt(&long);
        assert!(q.len() < MAX_QUOTE + 32, "{}", q.len());
        assert!(q.contains(&format!("…({} bytes)…", long.len())), "{q}");
        assert!(q.starts_with("éé") && q.ends_with("at line 3 column 7"), "{q}");
    }
}
