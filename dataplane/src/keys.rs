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

    /// Hash: `stock` (total), `price`, `limit`, `start_ms`, `end_ms`; `rules`,
    /// the same for `purchase.lua` in one field: `"<layout> <start_ms>
    /// <end_ms> <limit> <price>"` (`LAYOUT`, the key layout the product was
    /// warmed with); and the status counters `persisted`, `paid`,
    /// `cancelled`, `failed` (units, moved by `counters.lua`; see `counters`).
    pub fn info(&self) -> String {
        self.key("info")
    }
    /// String: units still for sale.
    pub fn stock(&self) -> String {
        self.key("stock")
    }
    /// Hash: user -> `"<held> <seq> <newest order id>"` (`BuyerEntry`): units
    /// held by the user's active (not failed/cancelled) orders, how many
    /// orders the user ever placed (never decreases; the database's unique
    /// (sale, sku, user, seq) key uses it) and the newest of them, the head
    /// of the user's chain of orders (each order record names the one before
    /// it). One entry per buyer, written once by a buyer's first order: the
    /// purchase script's only per-buyer insert. An entry outlives its units.
    pub fn buyers(&self) -> String {
        self.key("buyers")
    }
    /// Hash: `user \x1f idempotency-key` -> order id.
    pub fn idempotency(&self) -> String {
        self.key("idem")
    }
    /// Hash: order id -> order record (space-separated, see `order::OrderRecord`).
    pub fn orders(&self) -> String {
        self.key("orders")
    }
    /// Stream of accepted order requests, read by the consumers' group; each
    /// entry is one field `o`: `"<order id> <user> <qty> <seq> <price> <at ms>"`
    /// (`consumer::parse_entry`).
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
    /// info, stock, buyers, idem, orders, stream, clock (a purchase with a
    /// ticket adds `ticket` as the eighth).
    pub fn purchase_keys(&self) -> PurchaseKeys {
        [
            self.info(),
            self.stock(),
            self.buyers(),
            self.idempotency(),
            self.orders(),
            self.stream(),
            self.clock(),
        ]
    }

    /// Every key of the product, for clearing a deleted sale (with layout
    /// 1's `users` hash, so a sale warmed before layout 2 is cleared whole).
    pub fn all(&self) -> Vec<String> {
        let mut keys = self.purchase_keys().to_vec();
        keys.push(self.dead_letter());
        keys.push(self.wait_mark());
        keys.push(self.key("users"));
        keys
    }
}

/// `ProductKeys::purchase_keys`.
pub type PurchaseKeys = [String; 7];

/// The version of this key layout, written into a product's `info` (the
/// first word of `rules`) when it is first warmed, and kept by every later
/// warm. `purchase.lua` refuses a product warmed with another layout (503
/// `redis_layout`), so a gateway of a newer data plane never sells a sale an
/// older one started, and never writes entries that sale's consumers could
/// not read. Layout 2: `rules`, one `buyers` entry per user (held, seq,
/// newest order) and one-field stream entries; layout 1 (no `rules` field)
/// kept `users` apart and six stream fields. `purchase.lua` holds the same
/// constant.
pub const LAYOUT: &str = "2";

/// One `buyers` hash value: `"<held> <seq> <newest order id>"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuyerEntry {
    /// Units held by the buyer's active orders.
    pub held: i64,
    /// Orders the buyer ever placed of this product.
    pub seq: i64,
    /// The newest of them ('' never happens once an order was placed).
    pub newest: String,
}

impl BuyerEntry {
    pub fn parse(raw: &str) -> Option<Self> {
        let mut words = raw.splitn(3, ' ');
        Some(Self {
            held: words.next()?.parse().ok()?,
            seq: words.next()?.parse().ok()?,
            newest: words.next()?.to_string(),
        })
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
        self.push_user_key(user).to_string()
    }
    /// [`Self::push_user`] unformatted, to be written straight into a command.
    pub fn push_user_key<'a>(&'a self, user: &'a str) -> impl std::fmt::Display + 'a {
        struct PushUser<'a>(&'a str, &'a str);
        impl std::fmt::Display for PushUser<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}:push:user:{}", self.0, self.1)
            }
        }
        PushUser(&self.base, user)
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
    /// the buyer's key first came with in this sale (`claim.lua`); it
    /// expires a day after the sale's end plus its payment timeout.
    pub fn idempotency(&self) -> String {
        self.key("idem")
    }

    /// String: the holder of the sale's apply lock (`stock::apply`), with a
    /// TTL so a holder that died frees it.
    pub fn apply_lock(&self) -> String {
        self.key("apply")
    }

    pub fn all(&self) -> Vec<String> {
        vec![
            self.meta(),
            self.gateways(),
            self.gateway_reports(),
            self.idempotency(),
            self.apply_lock(),
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

    #[test]
    fn the_purchase_script_refuses_by_this_layout() {
        let line = format!("local LAYOUT = '{LAYOUT}'");
        assert!(crate::scripts::PURCHASE_SOURCE.contains(&line), "{line}");
    }

    #[test]
    fn buyer_entries_parse_or_are_refused() {
        assert_eq!(
            BuyerEntry::parse("2 3 phone.01ARZ3NDEKTSV4RRFFQ69G5FAV"),
            Some(BuyerEntry {
                held: 2,
                seq: 3,
                newest: "phone.01ARZ3NDEKTSV4RRFFQ69G5FAV".into()
            })
        );
        // Layout 1's plain unit count is not an entry.
        assert_eq!(BuyerEntry::parse("2"), None);
        assert_eq!(BuyerEntry::parse("x 1 o"), None);
    }
}
