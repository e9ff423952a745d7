//! Netlink requests as iproute2 sends them, for the tests that compare ours with them.

#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

/// The bytes of `s`, hex digits with any whitespace between them (`strace -e write=3`'s dump).
pub fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(char::is_ascii_hexdigit).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
