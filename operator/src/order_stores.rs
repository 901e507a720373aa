//! Connections to the sales' order databases, one pool per URL, reused across
//! reconciles. The reconciler needs PostgreSQL for one thing: stock changes
//! reach the inventory rows before Redis sells them (`dataplane::stock`).

use std::collections::HashMap;

use dataplane::store::{OrderStore, StoreError};
use tokio::sync::Mutex;

#[derive(Default)]
pub struct OrderStores {
    by_url: Mutex<HashMap<String, OrderStore>>,
}

impl OrderStores {
    /// A pool for `url`, migrated on first use (under the schema's advisory
    /// lock, so consumers starting at the same time are safe).
    pub async fn get(&self, url: &str) -> Result<OrderStore, StoreError> {
        let mut by_url = self.by_url.lock().await;
        if let Some(store) = by_url.get(url) {
            return Ok(store.clone());
        }
        let store = OrderStore::connect(url, 2)?;
        store.migrate().await?;
        by_url.insert(url.to_string(), store.clone());
        Ok(store)
    }
}
