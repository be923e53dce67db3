//! Any JSON value, for the generated tests of what stores keep: shared by
//! the integration tests and the crate's own unit tests, which include this
//! file.

use proptest::prelude::*;
use serde_json::Value;

/// Any JSON value (numbers finite), nested up to `depth` arrays and
/// objects, each with fewer than `width` elements.
pub(crate) fn values(depth: u32, width: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    let elements = 0..width as usize;
    leaf.prop_recursive(depth, 1 << (depth + 1), width, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), elements.clone()).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, elements.clone())
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
