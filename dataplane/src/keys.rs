//! The Redis key layout, the one contract between gateway, consumer and operator.
//!
//! Every key of one product shares the hash tag `{namespace/sale/sku}`, so each
//! script touches exactly one Redis Cluster slot; sale-wide keys share
//! `{namespace/sale}`.

use crate::spec::SaleId;

/// Keys of one product of one sale.
#[derive(Clone, Debug)]
pub struct ProductKeys {
    base: String,
}

impl ProductKeys {
    pub fn new(sale: &SaleId, sku: &str) -> Self {
        Self {
            base: format!("fs:{{{}/{}/{}}}", sale.namespace, sale.name, sku),
        }
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.base)
    }

    /// Hash: `stock` (total), `price`, `limit`, `start_ms`, `end_ms`, and the
    /// status counters `persisted`, `paid`, `cancelled`, `failed` (units,
    /// moved by `counters.lua`; see `counters`).
    pub fn info(&self) -> String {
        self.key("info")
    }
    /// String: units still for sale.
    pub fn stock(&self) -> String {
        self.key("stock")
    }
    /// Hash: user -> units held by active (not failed/cancelled) orders.
    pub fn buyers(&self) -> String {
        self.key("buyers")
    }
    /// Hash: user -> `"<seq> <last order id>"`: how many orders the user
    /// ever placed (never decreases; the database's unique (sale, sku, user,
    /// seq) key uses it) and the newest of them, the head of the user's chain
    /// of orders (each order record names the one before it).
    pub fn users(&self) -> String {
        self.key("users")
    }
    /// Hash: `user \x1f idempotency-key` -> order id.
    pub fn idempotency(&self) -> String {
        self.key("idem")
    }
    /// Hash: order id -> order record (space-separated, see `order::OrderRecord`).
    pub fn orders(&self) -> String {
        self.key("orders")
    }
    /// Stream of accepted order requests, read by the consumers' group.
    pub fn stream(&self) -> String {
        self.key("stream")
    }
    /// String expiring at a fixed far instant (`CLOCK_EPOCH_MS`): its `PTTL`
    /// gives the purchase script Redis' clock in one integer reply, cheaper
    /// than `TIME`. The script creates it on first use.
    pub fn clock(&self) -> String {
        self.key("clock")
    }
    /// Stream of entries that failed persistence too often.
    pub fn dead_letter(&self) -> String {
        self.key("dead")
    }
    /// String, one per spent purchase ticket (`ticket::Ticket::id`): the
    /// purchase script sets it (`SET NX PXAT <ticket expiry>`) when the ticket
    /// reaches a stock decision for this product, so a second use is refused;
    /// it expires with the ticket (at most `purchaseTicket.ttlSeconds` after
    /// the start or its issue), so a deleted sale's leave on their own.
    pub fn ticket(&self, id: &str) -> String {
        format!("{}:ticket:{id}", self.base)
    }

    /// String written just before a `WAIT` under `redis.durability: replica`,
    /// so the WAIT covers every write of the product the master held then,
    /// not only the writes of the waiting connection (`durability`).
    pub fn wait_mark(&self) -> String {
        self.key("wait")
    }

    /// The purchase script's KEYS, in the order `purchase.lua` reads them:
    /// info, stock, buyers, users, idem, orders, stream, clock (a purchase
    /// with a ticket adds `ticket` as the ninth).
    pub fn purchase_keys(&self) -> [String; 8] {
        [
            self.info(),
            self.stock(),
            self.buyers(),
            self.users(),
            self.idempotency(),
            self.orders(),
            self.stream(),
            self.clock(),
        ]
    }

    /// Every key of the product, for clearing a deleted sale.
    pub fn all(&self) -> Vec<String> {
        let mut keys = self.purchase_keys().to_vec();
        keys.push(self.dead_letter());
        keys.push(self.wait_mark());
        keys
    }
}

/// Sale-wide keys.
#[derive(Clone, Debug)]
pub struct SaleKeys {
    base: String,
}

impl SaleKeys {
    pub fn new(sale: &SaleId) -> Self {
        Self {
            base: format!("fs:{{{}/{}}}", sale.namespace, sale.name),
        }
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.base)
    }

    /// Hash: `skus` (comma-separated), `warmed_at_ms`.
    pub fn meta(&self) -> String {
        self.key("meta")
    }
    /// Sorted set: gateway pod -> last report time (ms).
    pub fn gateways(&self) -> String {
        self.key("gateways")
    }
    /// Hash: gateway pod -> its last load report (JSON).
    pub fn gateway_reports(&self) -> String {
        self.key("gwreports")
    }

    /// String: the gateway pod holding `user`'s WebSocket (with a TTL the
    /// pod refreshes while the socket is open).
    pub fn push_user(&self, user: &str) -> String {
        format!("{}:push:user:{user}", self.base)
    }
    /// The prefix of the per-pod push channels (`<prefix><pod>`); channels
    /// share the sale's hash tag, so a script can publish to one on the slot
    /// of the registry key it read.
    pub fn push_channel_prefix(&self) -> String {
        self.key("push:pod:")
    }
    pub fn push_channel(&self, pod: &str) -> String {
        format!("{}{pod}", self.push_channel_prefix())
    }

    /// Hash: `user \x1f idempotency-key` -> `"<sku> <quantity>"`, the request
    /// the buyer's key first came with in this sale (`claim_key.lua`); it
    /// expires a day after the sale's end plus its payment timeout.
    pub fn idempotency(&self) -> String {
        self.key("idem")
    }

    pub fn all(&self) -> Vec<String> {
        vec![
            self.meta(),
            self.gateways(),
            self.gateway_reports(),
            self.idempotency(),
        ]
    }
}

/// The instant the `clock` key expires at (2100-01-01T00:00:00Z, Unix ms);
/// `purchase.lua` holds the same constant.
pub const CLOCK_EPOCH_MS: i64 = 4_102_444_800_000;

/// The consumer group every consumer of a sale joins.
pub const CONSUMER_GROUP: &str = "persist";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_keys_share_one_hash_tag() {
        let k = ProductKeys::new(&SaleId::new("shop", "sd"), "phone-17");
        for key in k
            .all()
            .into_iter()
            .chain([k.ticket("01ARZ3NDEKTSV4RRFFQ69G5FAV")])
        {
            assert!(key.starts_with("fs:{shop/sd/phone-17}:"), "{key}");
        }
        assert_eq!(
            SaleKeys::new(&SaleId::new("shop", "sd")).meta(),
            "fs:{shop/sd}:meta"
        );
    }
}
