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

#[cfg(test)]
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
        }
    }
}
