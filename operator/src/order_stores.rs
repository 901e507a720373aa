//! Connections to the sales' order databases, one pool per URL, reused across
//! reconciles. The reconciler needs PostgreSQL for one thing: stock changes
//! reach the inventory rows before Redis sells them (`dataplane::stock`).

use std::collections::HashMap;
use std::sync::Arc;

use dataplane::store::{OrderStore, StoreError};
use tokio::sync::{Mutex, OnceCell};

#[derive(Default)]
pub struct OrderStores {
    /// One cell per URL, filled once its pool is migrated; the map's lock is
    /// never held while connecting (as in `RedisConnections`), so a database
    /// out of reach delays only its own sales.
    by_url: Mutex<HashMap<String, Arc<OnceCell<OrderStore>>>>,
}

impl OrderStores {
    /// A pool for `url`, migrated on first use (under the schema's advisory
    /// lock, so consumers starting at the same time are safe).
    pub async fn get(&self, url: &str) -> Result<OrderStore, StoreError> {
        let cell = {
            let mut by_url = self.by_url.lock().await;
            Arc::clone(by_url.entry(url.to_string()).or_default())
        };
        let store = cell
            .get_or_try_init(|| async {
                let store = OrderStore::connect(url, 2)?;
                store.migrate().await?;
                Ok::<_, StoreError>(store)
            })
            .await?;
        Ok(store.clone())
    }
}
