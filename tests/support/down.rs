//! [`Down`]: a session store that is down.

use tower_ha::store::{Loaded, Session, SessionStore, StoreError, StoreFuture};

/// A store whose every call fails as unavailable.
#[derive(Clone)]
pub struct Down;

impl SessionStore for Down {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        Box::pin(async { Err(StoreError::unavailable("down")) })
    }
    fn load<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Option<Session>> {
        Box::pin(async { Err(StoreError::unavailable("down")) })
    }
    fn save<'a>(&'a self, _: &'a Session) -> StoreFuture<'a, ()> {
        Box::pin(async { Err(StoreError::unavailable("down")) })
    }
    fn delete<'a>(&'a self, _: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(async { Err(StoreError::unavailable("down")) })
    }
}
