//! A session store of your own: sessions kept as encoded bytes in a
//! key-value database (here a map standing in for one), the shape of most
//! real stores (etcd, sled, SQL with a JSON column, ...).
//!
//! It shows the four rules of the `SessionStore` trait:
//! boxed `Send` futures, `Ok(None)` for a missing key, a delete that
//! ignores absent keys, and `load_all` that skips (and reports) what it
//! cannot read instead of failing.
//!
//! `cargo run --example custom_store`

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::RwLock;
use tower_ha::store::{Loaded, Session, SessionStore, StoreError, StoreFuture};

/// Sessions as JSON bytes in a key-value map.
#[derive(Debug, Clone, Default)]
struct KvStore {
    /// Stands in for the database client.
    db: Arc<RwLock<BTreeMap<String, Vec<u8>>>>,
}

impl KvStore {
    /// The database's own key for a session: a namespace keeps sessions
    /// apart from whatever else the database holds.
    fn db_key(key: &str) -> Result<String, StoreError> {
        if key.is_empty() || key.len() > 1024 {
            // A key this store cannot hold is rejected with `invalid_key`.
            return Err(StoreError::invalid_key(format!(
                "session keys must be 1 to 1024 bytes, got {}",
                key.len()
            )));
        }
        Ok(format!("sessions/{key}"))
    }
}

impl SessionStore for KvStore {
    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        Box::pin(async move {
            let db = self.db.read().await;
            let mut loaded = Loaded::default();
            for (name, bytes) in db.range("sessions/".to_owned().."sessions0".to_owned()) {
                match serde_json::from_slice::<Session>(bytes) {
                    Ok(session) => loaded.sessions.push(session),
                    // One unreadable record never hides the others.
                    Err(e) => loaded.skip(name.clone(), StoreError::corrupt(e)),
                }
            }
            Ok(loaded)
        })
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        Box::pin(async move {
            let db_key = Self::db_key(key)?;
            let db = self.db.read().await;
            match db.get(&db_key) {
                None => Ok(None), // missing is not an error
                Some(bytes) => serde_json::from_slice(bytes)
                    .map(Some)
                    .map_err(|e| StoreError::corrupt(e).with_message(db_key)),
            }
        })
    }

    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let db_key = Self::db_key(&session.key)?;
            // Data nested deeper than `load`'s JSON reader reads would be
            // saved and then lost: refused (`is_rejected`) instead.
            session.check_depth()?;
            let bytes = serde_json::to_vec(session).map_err(StoreError::other)?;
            self.db.write().await.insert(db_key, bytes);
            Ok(())
        })
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut db = self.db.write().await;
            for key in keys {
                if let Ok(db_key) = Self::db_key(key) {
                    db.remove(&db_key); // absent keys are ignored
                }
            }
            Ok(())
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), StoreError> {
    let kv = KvStore::default();
    // Used like any store: behind `Arc<dyn SessionStore>`.
    let store: Arc<dyn SessionStore> = Arc::new(kv.clone());

    store
        .save(&Session::new("alice", "node-a".into()).with_data(serde_json::json!({"port": 1})))
        .await?;
    store.save(&Session::new("bob", "node-b".into())).await?;
    assert!(store
        .save(&Session::new("", "node-a".into()))
        .await
        .unwrap_err()
        .is_invalid_key());

    // Someone wrote garbage into the database.
    kv.db
        .write()
        .await
        .insert("sessions/mallory".into(), b"{not json".to_vec());

    let loaded = store.load_all().await?;
    for s in &loaded.sessions {
        println!("{} -> {}", s.key, s.backend);
    }
    for skipped in &loaded.skipped {
        println!("skipped {}: {}", skipped.record, skipped.error);
    }
    assert_eq!(loaded.sessions.len(), 2);
    assert_eq!(loaded.skipped.len(), 1);

    assert_eq!(store.load("carol").await?, None);
    store
        .delete(&["alice".into(), "never-saved".into()])
        .await?;
    assert_eq!(store.load("alice").await?, None);
    assert_eq!(
        store.load("bob").await?.map(|s| s.backend.to_string()),
        Some("node-b".to_owned())
    );
    Ok(())
}
