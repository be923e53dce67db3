mod support;

use std::sync::Arc;

use tower_ha::store::MemoryStore;

#[tokio::test]
async fn memory_store_passes_the_contract() {
    support::store_contract::run(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn clones_share_sessions() {
    use tower_ha::store::{Session, SessionStore};
    let a = MemoryStore::new();
    let b = a.clone();
    a.save(&Session::new("k", "x".into())).await.unwrap();
    assert_eq!(b.load("k").await.unwrap().unwrap().backend.as_str(), "x");
    assert_eq!(b.len(), 1);
}
