mod support;

use std::sync::Arc;

use tower_ha::store::MemoryStore;

#[tokio::test]
async fn memory_store_passes_the_contract() {
    support::store_contract::run(Arc::new(MemoryStore::new())).await;
    support::store_contract::refuses_data_nested_too_deep(&MemoryStore::new()).await;
    let with_ttl = MemoryStore::new().with_ttl(std::time::Duration::from_secs(3600));
    support::store_contract::refresh_keeps_a_newer_record(&with_ttl).await;
}

/// The contract catches a store that saves data nested deeper than its
/// JSON reader reads back, and then loses the session as corrupt: a store
/// over a map of JSON records that does not check the depth.
#[tokio::test]
#[should_panic(expected = "read back")]
async fn the_contract_catches_deep_data_saved_and_lost() {
    use parking_lot::Mutex;
    use std::collections::BTreeMap;
    use tower_ha::store::{Loaded, Session, SessionStore, StoreError, StoreFuture};

    #[derive(Default)]
    struct Json(Mutex<BTreeMap<String, Vec<u8>>>);
    impl SessionStore for Json {
        fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
            let record = self.0.lock().get(key).cloned();
            Box::pin(async move {
                record
                    .map(|bytes| serde_json::from_slice(&bytes).map_err(StoreError::corrupt))
                    .transpose()
            })
        }
        fn load_all(&self) -> StoreFuture<'_, Loaded> {
            Box::pin(async { Ok(Loaded::default()) })
        }
        fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
            let bytes = serde_json::to_vec(session).map_err(StoreError::other);
            Box::pin(async move {
                self.0.lock().insert(session.key.clone(), bytes?);
                Ok(())
            })
        }
        fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
            let mut map = self.0.lock();
            for key in keys {
                map.remove(key);
            }
            Box::pin(async { Ok(()) })
        }
    }
    support::store_contract::deep_data_is_refused_or_read_back(&Json::default()).await;
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

#[tokio::test]
async fn memory_store_with_a_ttl_passes_the_contract() {
    let store = MemoryStore::new().with_ttl(std::time::Duration::from_secs(3600));
    support::store_contract::run(Arc::new(store)).await;
}

mod ttl {
    use std::time::Duration;

    use tokio::time::advance;
    use tower_ha::store::{MemoryStore, Session, SessionStore};

    const TTL: Duration = Duration::from_secs(60);

    fn keys(sessions: Vec<Session>) -> Vec<String> {
        let mut keys: Vec<String> = sessions.into_iter().map(|s| s.key).collect();
        keys.sort();
        keys
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_expires_a_ttl_after_its_last_save_or_load() {
        let store = MemoryStore::new().with_ttl(TTL);
        assert_eq!(store.refresh_interval(), Some(TTL / 2));
        for key in ["saved", "loaded", "left"] {
            store.save(&Session::new(key, "a".into())).await.unwrap();
        }
        advance(Duration::from_secs(40)).await;
        store
            .save(&Session::new("saved", "b".into()))
            .await
            .unwrap();
        assert!(store.load("loaded").await.unwrap().is_some());

        advance(Duration::from_secs(30)).await; // 70 s after the first saves
        assert!(store.load("left").await.unwrap().is_none(), "expired");
        let saved = store.load("saved").await.unwrap().unwrap();
        assert_eq!(saved.backend.as_str(), "b");
        assert_eq!(
            keys(store.load_all().await.unwrap().sessions),
            ["loaded", "saved"]
        );

        // `load_all` renewed nothing: "loaded" expires 60 s after its
        // load, "saved" 60 s after its last load (at 70 s).
        advance(Duration::from_secs(31)).await; // 101 s
        assert_eq!(keys(store.load_all().await.unwrap().sessions), ["saved"]);
        advance(Duration::from_secs(29)).await; // 130 s
        assert!(store.load_all().await.unwrap().sessions.is_empty());
        assert!(store.load("saved").await.unwrap().is_none());
    }

    /// A refresh renews the record as stored, also its time to live, and
    /// writes the refreshed copy only once the record has expired.
    #[tokio::test(start_paused = true)]
    async fn a_refresh_renews_the_stored_record_or_writes_an_expired_one_again() {
        let store = MemoryStore::new().with_ttl(TTL);
        store.save(&Session::new("k", "b".into())).await.unwrap();
        advance(Duration::from_secs(40)).await;
        store.refresh(&Session::new("k", "a".into())).await.unwrap();
        advance(Duration::from_secs(40)).await; // 80 s: renewed at 40 s
        let kept = store.load_all().await.unwrap().sessions;
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].backend.as_str(), "b", "renewed as stored");
        advance(TTL).await;
        assert!(store.load_all().await.unwrap().sessions.is_empty());
        store.refresh(&Session::new("k", "a".into())).await.unwrap();
        let back = store.load("k").await.unwrap().expect("written again");
        assert_eq!(back.backend.as_str(), "a");
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_ttl_is_taken_as_a_millisecond() {
        let store = MemoryStore::new().with_ttl(Duration::ZERO);
        assert_eq!(store.refresh_interval(), Some(Duration::from_micros(500)));
        store.save(&Session::new("k", "a".into())).await.unwrap();
        assert!(store.load("k").await.unwrap().is_some());
        advance(Duration::from_millis(1)).await;
        assert!(store.load("k").await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn saves_sweep_expired_records_out_at_most_every_half_ttl() {
        let store = MemoryStore::new().with_ttl(TTL);
        let save = |key: String| {
            let store = store.clone();
            async move { store.save(&Session::new(key, "a".into())).await.unwrap() }
        };
        for i in 0..100 {
            save(format!("old-{i}")).await;
        }
        assert_eq!(store.len(), 100);
        advance(TTL + Duration::from_secs(1)).await;
        save("new-1".into()).await;
        assert_eq!(store.len(), 1, "the expired records are gone");

        // Swept now; the next sweep is half a TTL away.
        advance(Duration::from_secs(40)).await;
        save("new-2".into()).await;
        advance(Duration::from_secs(25)).await; // "new-1" expired 5 s ago
        save("new-3".into()).await;
        assert!(store.load("new-1").await.unwrap().is_none());
        assert_eq!(store.len(), 3, "not swept again within half a TTL");
        advance(Duration::from_secs(6)).await;
        save("new-4".into()).await;
        assert_eq!(store.len(), 3, "swept: new-2, new-3 and new-4");
        assert_eq!(
            keys(store.load_all().await.unwrap().sessions),
            ["new-2", "new-3", "new-4"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_ttl_records_stay() {
        let store = MemoryStore::new();
        assert_eq!(store.refresh_interval(), None);
        store.save(&Session::new("k", "a".into())).await.unwrap();
        advance(Duration::from_secs(365 * 24 * 3600)).await;
        store
            .save(&Session::new("other", "a".into()))
            .await
            .unwrap();
        assert!(store.load("k").await.unwrap().is_some());
        assert_eq!(store.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ttl_too_long_to_add_to_an_instant_means_never() {
        let store = MemoryStore::new().with_ttl(Duration::MAX);
        store.save(&Session::new("k", "a".into())).await.unwrap();
        advance(Duration::from_secs(10 * 365 * 24 * 3600)).await;
        assert!(store.load("k").await.unwrap().is_some());
    }
}
