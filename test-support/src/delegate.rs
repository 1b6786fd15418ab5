//! One store wrapper for the tests that change what a store does: a
//! [`Delegate`] forwards every call to the store it wraps, except those its
//! [`Hooks`] replace.
//!
//! A test writes only the calls it changes (reads that never end, a feed
//! that arrives late, pages counted), and the rest, health, close and
//! metrics included, still reach the real store: nothing is forgotten by a
//! wrapper that forwards by hand, and a batch still goes to the store's
//! group commit as one write.

use std::{future::Future, sync::Arc};

use prometheus_client::encoding::DescriptorEncoder;
use tokio::sync::watch;
use user_service::{
    MemoryStore, Store,
    store::{ListFilter, Ops, Page, Results, StoreError, StoreHealth, Subscription},
    user::User,
};

/// What a test changes about a store: each hook is given the wrapped store
/// and, unless the test overrides it, forwards the call to it unchanged.
pub trait Hooks<S: Store>: Clone + Send + Sync + Unpin + 'static {
    fn write(&self, store: &S, ops: Ops) -> impl Future<Output = Results> + Send {
        store.write(ops)
    }

    fn get(&self, store: &S, id: &str) -> impl Future<Output = Result<User, StoreError>> + Send {
        store.get(id)
    }

    fn list_page(
        &self,
        store: &S,
        filter: ListFilter,
        after: Option<&str>,
        max: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send {
        store.list_page(filter, after, max)
    }

    fn subscribe(&self, store: &S) -> Subscription {
        store.subscribe()
    }
}

/// `store`, with `hooks` in front of it. Health, close and metrics always go
/// to the store itself.
#[derive(Debug, Clone)]
pub struct Delegate<S, H> {
    pub store: S,
    pub hooks: H,
}

impl<S: Store, H: Hooks<S>> Delegate<S, H> {
    pub fn new(store: S, hooks: H) -> Self {
        Delegate { store, hooks }
    }
}

impl<S: Store, H: Hooks<S>> Store for Delegate<S, H> {
    fn write(&self, ops: Ops) -> impl Future<Output = Results> + Send {
        self.hooks.write(&self.store, ops)
    }

    fn get(&self, id: &str) -> impl Future<Output = Result<User, StoreError>> + Send {
        self.hooks.get(&self.store, id)
    }

    fn list_page(
        &self,
        filter: ListFilter,
        after: Option<&str>,
        max: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send {
        self.hooks.list_page(&self.store, filter, after, max)
    }

    fn subscribe(&self) -> Subscription {
        self.hooks.subscribe(&self.store)
    }

    fn health(&self) -> watch::Receiver<StoreHealth> {
        self.store.health()
    }

    fn close(&self) -> impl Future<Output = ()> + Send {
        self.store.close()
    }

    fn encode_metrics(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.store.encode_metrics(encoder)
    }
}

/// Reads that never complete: a stand-in for a stuck backend, so that a call
/// is still running when its deadline passes or the server shuts down.
/// With an id, only GetUser of that id is stuck. Clones share the count of
/// stuck reads.
#[derive(Debug, Clone)]
pub struct StuckReads {
    only: Option<&'static str>,
    /// How many reads have got stuck so far.
    stuck: Arc<watch::Sender<usize>>,
}

impl StuckReads {
    /// `store` with every read stuck.
    pub fn all(store: MemoryStore) -> Delegate<MemoryStore, StuckReads> {
        Self::new(store, None)
    }

    /// `store` with only GetUser of `id` stuck.
    pub fn get_of(store: MemoryStore, id: &'static str) -> Delegate<MemoryStore, StuckReads> {
        Self::new(store, Some(id))
    }

    fn new(store: MemoryStore, only: Option<&'static str>) -> Delegate<MemoryStore, StuckReads> {
        let hooks = StuckReads {
            only,
            stuck: Arc::new(watch::Sender::new(0)),
        };
        Delegate::new(store, hooks)
    }

    /// Never completes, once counted as stuck.
    async fn stick<T>(stuck: Arc<watch::Sender<usize>>) -> T {
        stuck.send_modify(|stuck| *stuck += 1);
        std::future::pending().await
    }
}

impl Delegate<MemoryStore, StuckReads> {
    /// Waits until `count` reads in all have got stuck: each of their calls
    /// has received and decoded its request, and its handler has reached
    /// the store.
    pub async fn wait_until_stuck(&self, count: usize) {
        self.hooks
            .stuck
            .subscribe()
            .wait_for(|&stuck| stuck >= count)
            .await
            .expect("the sender lives as long as self");
    }
}

impl Hooks<MemoryStore> for StuckReads {
    fn get(
        &self,
        store: &MemoryStore,
        id: &str,
    ) -> impl Future<Output = Result<User, StoreError>> + Send {
        let stuck = self
            .only
            .is_none_or(|only| only == id)
            .then(|| self.stuck.clone());
        async move {
            match stuck {
                Some(stuck) => StuckReads::stick(stuck).await,
                None => store.get(id).await,
            }
        }
    }

    fn list_page(
        &self,
        store: &MemoryStore,
        filter: ListFilter,
        after: Option<&str>,
        max: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send {
        let stuck = self.only.is_none().then(|| self.stuck.clone());
        async move {
            match stuck {
                Some(stuck) => StuckReads::stick(stuck).await,
                None => store.list_page(filter, after, max).await,
            }
        }
    }
}
