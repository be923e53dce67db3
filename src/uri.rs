//! Checks of the URIs users configure.

use http::uri::Authority;

/// Whether what follows `authority`'s host is nothing, or a colon then a
/// port from 0 to 65535 (or no digits: the scheme's). Digits without the
/// colon (`[::1]8080`), which the `http` crate lets through, would
/// otherwise be taken for no port at all, and so would a port out of
/// range or written with a sign.
pub(crate) fn has_valid_port(authority: &Authority) -> bool {
    let rest = &authority.as_str()[authority.host().len()..];
    rest.is_empty()
        || rest.strip_prefix(':').is_some_and(|port| {
            port.is_empty()
                || port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok()
        })
}
