//! W3C trace context (<https://www.w3.org/TR/trace-context/>): the `traceparent` header a
//! producer may put on its submit message. The coordinator keeps it with the task and puts it
//! on every attempt's work message; the agent SDK hands it to the handler and puts it on the
//! attempt's `started` and outcome events. taskbus makes no spans of its own: the header lets
//! the producer's trace and the handler's spans join up.
//!
//! A value that is not a well-formed `traceparent` is dropped (the task runs without one), so
//! nothing a producer sends there travels further than the coordinator.

/// The header's name.
pub const HEADER: &str = "traceparent";

/// Whether `v` is a `traceparent` this system forwards: `VERSION-TRACEID-PARENTID-FLAGS` in
/// lowercase hex (2, 32, 16 and 2 digits), version not `ff`, trace and parent ids not all
/// zeros. Version `00` is exactly those 55 characters; a later version may append
/// `-`-separated fields, up to 256 characters in all.
pub fn is_valid(v: &str) -> bool {
    let b = v.as_bytes();
    if b.len() < 55 || b.len() > 256 {
        return false;
    }
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let zeros = |s: &[u8]| s.iter().all(|c| *c == b'0');
    let (version, trace, parent, flags) = (&b[0..2], &b[3..35], &b[36..52], &b[53..55]);
    let dashes = b[2] == b'-' && b[35] == b'-' && b[52] == b'-';
    let rest_ok = match version {
        b"00" => b.len() == 55,
        _ => b.len() == 55 || (b[55] == b'-' && v.is_ascii() && !v.contains(char::is_whitespace)),
    };
    dashes
        && hex(version)
        && version != b"ff"
        && hex(trace)
        && !zeros(trace)
        && hex(parent)
        && !zeros(parent)
        && hex(flags)
        && rest_ok
}

/// The header's value in `headers` when it is valid.
pub fn from_headers(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    let v = headers?.get(HEADER)?.as_str();
    is_valid(v).then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn well_formed_values_pass() {
        assert!(is_valid(OK));
        assert!(is_valid(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        ));
        // A later version may carry more fields.
        assert!(is_valid(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        ));
    }

    #[test]
    fn malformed_and_hostile_values_are_refused() {
        for bad in [
            "",
            "00",
            "garbage",
            &OK.to_uppercase(),
            &OK[..54],
            &format!("{OK}-extra"),
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-a b",
            &format!(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-{}",
                "a".repeat(300)
            ),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u{e9}",
        ] {
            assert!(!is_valid(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn headers_give_only_valid_values() {
        let mut h = async_nats::HeaderMap::new();
        assert_eq!(from_headers(None), None);
        assert_eq!(from_headers(Some(&h)), None);
        h.insert(HEADER, "nonsense");
        assert_eq!(from_headers(Some(&h)), None);
        h.insert(HEADER, OK);
        assert_eq!(from_headers(Some(&h)).as_deref(), Some(OK));
    }
}
