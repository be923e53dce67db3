//! Helpers shared by the integration tests. Each test binary uses a part.
#![allow(dead_code, unreachable_pub, unused_macros)]

/// The methods of a test store's `SessionStore` impl that pass each call
/// on, unchanged, to the store in its field `$inner`:
/// `pass_on!(inner: load, delete);` beside the methods it changes.
macro_rules! pass_on {
    ($inner:ident: $($method:ident),+ $(,)?) => { $(pass_on!(@ $inner $method);)+ };
    (@ $inner:ident load_all) => {
        fn load_all(&self) -> tower_ha::store::StoreFuture<'_, tower_ha::store::Loaded> {
            self.$inner.load_all()
        }
    };
    (@ $inner:ident load) => {
        fn load<'a>(
            &'a self,
            key: &'a str,
        ) -> tower_ha::store::StoreFuture<'a, Option<tower_ha::store::Session>> {
            self.$inner.load(key)
        }
    };
    (@ $inner:ident save) => {
        fn save<'a>(
            &'a self,
            session: &'a tower_ha::store::Session,
        ) -> tower_ha::store::StoreFuture<'a, ()> {
            self.$inner.save(session)
        }
    };
    (@ $inner:ident delete) => {
        fn delete<'a>(&'a self, keys: &'a [String]) -> tower_ha::store::StoreFuture<'a, ()> {
            self.$inner.delete(keys)
        }
    };
    (@ $inner:ident refresh_interval) => {
        fn refresh_interval(&self) -> Option<std::time::Duration> {
            self.$inner.refresh_interval()
        }
    };
}

pub mod chaos_http;
pub mod deferred;
pub mod down;
pub mod gate;
pub mod health_http;
pub mod health_mock;
pub mod http;
pub mod json_values;
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
