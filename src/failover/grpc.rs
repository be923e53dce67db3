//! A gRPC client's deadline: the `grpc-timeout` request header, read and
//! written as the gRPC over HTTP/2 protocol spells it (at most eight
//! digits and one unit: `H`, `M`, `S`, `m`, `u` or `n`).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The header a gRPC client sends its deadline in.
pub(crate) const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The largest value the header may hold: eight digits.
const MAX_VALUE: u64 = 99_999_999;

/// The time a `grpc-timeout` value gives, or `None` when the value is not
/// one the protocol allows (empty, more than eight digits, a sign, spaces,
/// an unknown unit) or is zero, which gives no time to work with.
pub(crate) fn parse(value: &HeaderValue) -> Option<Duration> {
    let (&unit, digits) = value.as_bytes().split_last()?;
    if digits.len() > 8 {
        return None;
    }
    // Eight digits at most: no overflow below.
    let n: u64 = crate::key::decimal(digits)?;
    let time = match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    };
    (!time.is_zero()).then_some(time)
}

/// `time` as a `grpc-timeout` value, in the finest unit that holds it in
/// eight digits, rounded down (a backend told a little less than the time
/// left gives up before the proxy does, not after). At least `1n`; at
/// most `99999999H`.
fn format(time: Duration) -> HeaderValue {
    let nanos = time.as_nanos().max(1);
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let (n, unit) = units
        .iter()
        .map(|&(per, unit)| (nanos / per, unit))
        .find(|&(n, _)| n <= u128::from(MAX_VALUE))
        .unwrap_or((u128::from(MAX_VALUE), 'H'));
    HeaderValue::try_from(format!("{n}{unit}"))
        .expect("digits and a letter are a valid header value")
}

/// Tells a backend, in `headers`, that it has `time` left.
pub(crate) fn tell(headers: &mut HeaderMap, time: Duration) {
    headers.insert(GRPC_TIMEOUT, format(time));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parsed(text: &str) -> Option<Duration> {
        parse(&HeaderValue::from_str(text).unwrap())
    }

    #[test]
    fn every_unit_is_read() {
        assert_eq!(parsed("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parsed("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parsed("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parsed("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parsed("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parsed("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(parsed("00000001S"), Some(Duration::from_secs(1)));
        assert_eq!(
            parsed("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[test]
    fn values_the_protocol_does_not_allow_are_refused() {
        for bad in [
            "",
            "S",
            "5",
            "5s",
            "5 S",
            " 5S",
            "+5S",
            "-5S",
            "5.0S",
            "123456789m",
            "0S",
            "0000n",
            "5SS",
            "５S",
        ] {
            let Ok(value) = HeaderValue::from_str(bad) else {
                continue;
            };
            assert_eq!(parse(&value), None, "{bad:?}");
        }
        assert_eq!(parse(&HeaderValue::from_bytes(b"5\xffS").unwrap()), None);
    }

    #[test]
    fn times_are_written_in_the_finest_unit_that_holds_them() {
        let written = |time| format(time).to_str().unwrap().to_owned();
        assert_eq!(written(Duration::from_nanos(1500)), "1500n");
        assert_eq!(written(Duration::from_millis(250)), "250000u");
        assert_eq!(written(Duration::from_secs(5)), "5000000u");
        assert_eq!(written(Duration::from_secs(1000)), "1000000m");
        assert_eq!(written(Duration::from_secs(200_000)), "200000S");
        assert_eq!(written(Duration::ZERO), "1n");
        assert_eq!(written(Duration::MAX), "99999999H");
    }

    proptest! {
        /// A written time reads back as at most that time, short of it by
        /// less than one of the unit it was written in: at most a
        /// hundred-thousandth of it, as a unit is used only when the one
        /// below it, at most a thousand times smaller, needs more than
        /// eight digits.
        #[test]
        fn a_written_time_reads_back_nearly_whole(nanos in 1u64..u64::MAX) {
            let time = Duration::from_nanos(nanos);
            let read = parse(&format(time)).unwrap();
            prop_assert!(read <= time);
            prop_assert!((time - read).as_nanos() * 100_000 <= time.as_nanos());
        }

        #[test]
        fn any_value_is_read_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                let _ = parse(&value);
            }
        }
    }
}
