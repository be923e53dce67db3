//! Helpers shared by the integration tests. Each test binary uses a part.
#![allow(dead_code, unreachable_pub)]

pub mod chaos_http;
pub mod deferred;
pub mod health_http;
pub mod health_mock;
pub mod http;
pub mod lines;
pub mod ports;
#[cfg(feature = "redis")]
pub mod redis_server;
pub mod sticky_http;
pub mod store_contract;
pub mod tracing_capture;
pub mod wait;
#[cfg(feature = "webhook")]
pub mod webhook_server;

pub use ports::restartable_addr;
