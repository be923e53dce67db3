//! Helpers shared by the integration tests. Each test binary uses a part.
#![allow(dead_code, unreachable_pub)]

pub mod sticky_http;
pub mod store_contract;
