//! Checks of the URIs users configure.

use http::uri::Authority;

/// Whether what follows `authority`'s host is nothing, or a colon then a
/// port from 0 to 65535 (or no digits: the scheme's). Digits without the
/// colon (`[::1]8080`), which the `http` crate lets through, would
/// otherwise be taken for no port at all, and so would a port out of
/// range or written with a sign.
pub(crate) fn has_valid_port(authority: &Authority) -> bool {
    port_after_host(&authority.as_str()[authority.host().len()..]).is_some()
}

/// The port in what follows a host (`rest`): `Some(None)` for none given
/// (nothing, or a colon alone: the scheme's), `Some(Some(port))` for a
/// colon then a port from 0 to 65535, and `None` for anything else (digits
/// without the colon, a port out of range or written with a sign).
pub(crate) fn port_after_host(rest: &str) -> Option<Option<u16>> {
    let Some(digits) = rest.strip_prefix(':') else {
        return rest.is_empty().then_some(None);
    };
    if digits.is_empty() {
        return Some(None);
    }
    crate::key::decimal(digits.as_bytes()).map(Some)
}

/// Whether `text` is a host and an optional port (`host[:port]`, a
/// `Host` header's form, RFC 9110 section 7.2): a registered name (RFC
/// 3986's reg-name: letters, digits, `-._~` and `!$&'()*+,;=`; an IPv4
/// address is one; percent-encoded bytes, which no client sends in a
/// host and the `http` crate refuses, are refused) or an IPv6 address in
/// brackets, then the port as [`port_after_host`] takes it. Checked in
/// place: an `Authority` would copy the text, on every proxied request.
#[cfg(feature = "hyper-client")]
pub(crate) fn is_host_and_port(text: &[u8]) -> bool {
    let (host, rest) = match text.strip_prefix(b"[") {
        Some(inner) => {
            let Some(end) = inner.iter().position(|&b| b == b']') else {
                return false;
            };
            let ip = std::str::from_utf8(&inner[..end]).ok();
            let is_ipv6 = ip.is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
            (is_ipv6, &inner[end + 1..])
        }
        None => {
            let end = text.iter().position(|&b| b == b':').unwrap_or(text.len());
            (is_reg_name(&text[..end]), &text[end..])
        }
    };
    host && std::str::from_utf8(rest).is_ok_and(|rest| port_after_host(rest).is_some())
}

/// Whether `name` is a non-empty reg-name (RFC 3986 section 3.2.2)
/// without percent-encoded bytes.
#[cfg(feature = "hyper-client")]
fn is_reg_name(name: &[u8]) -> bool {
    !name.is_empty()
        && (name.iter()).all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(b))
}

// (The host checks they compare with are the HTTP backend's.)
#[cfg(all(test, feature = "hyper-client"))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// A port of any number of digits, zeros in front included, is
        /// valid exactly when it is at most 65535.
        #[test]
        fn ports_are_valid_up_to_65535(
            host in "(h|10\\.0\\.0\\.1|\\[::1\\]|a-b\\.c)",
            zeros in 0usize..4,
            port in prop_oneof![0u64..=70_000, Just(65_535), Just(65_536), any::<u64>()],
        ) {
            let text = format!("{host}:{}{port}", "0".repeat(zeros));
            if let Ok(authority) = Authority::try_from(text.as_str()) {
                prop_assert_eq!(has_valid_port(&authority), port <= 65_535, "{}", text);
            }
            let bare = Authority::try_from(host.as_str()).unwrap();
            prop_assert!(has_valid_port(&bare));
            prop_assert_eq!(is_host_and_port(text.as_bytes()), port <= 65_535, "{}", text);
            prop_assert!(is_host_and_port(host.as_bytes()));
        }

        /// What is taken for a host and port is an authority the `http`
        /// crate parses to that host, with a valid port.
        #[test]
        fn hosts_taken_are_authorities(
            text in "[a-zA-Z0-9:.\\[\\]%@/?# _~!$&'()*+,;=\\-]{0,12}|%[0-9A-F]{2}[a-z]{0,3}",
        ) {
            if is_host_and_port(text.as_bytes()) {
                let authority = Authority::try_from(text.as_str());
                prop_assert!(authority.is_ok(), "{}", text);
                let authority = authority.unwrap();
                prop_assert!(has_valid_port(&authority), "{}", text);
                prop_assert!(text.starts_with(authority.host()), "{}", text);
            }
        }
    }

    #[test]
    fn host_and_port_forms() {
        for valid in [
            "a.example",
            "a.example:8080",
            "a.example:",
            "10.0.0.1:80",
            "[::1]",
            "[2001:db8::1]:443",
            "xn--bcher-kva.example",
            "under_score.example",
        ] {
            assert!(is_host_and_port(valid.as_bytes()), "{valid}");
        }
        for invalid in [
            "",
            ":80",
            "a.example/x",
            "a.example b.example",
            "a.example:http",
            "a.example:+80",
            "a.example:65536",
            "[::1]8080",
            "[::1",
            "[not-an-ip]",
            "a.example?",
            "a%2.example",
            "a%2Db.example",
            "a.example:80:80",
            "user@a.example",
            "a\"b",
        ] {
            assert!(!is_host_and_port(invalid.as_bytes()), "{invalid}");
        }
    }
}
