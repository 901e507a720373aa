//! The Lua scripts of the Redis contract. `redis::Script` calls them by SHA
//! (EVALSHA) and loads them on NOSCRIPT, so each is sent in full once per server.

use std::sync::LazyLock;

use redis::Script;

use crate::keys::PurchaseKeys;

/// The purchase decision (`purchase.lua`).
pub static PURCHASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/purchase.lua")));
/// Stock and limit returned for an order that will not be fulfilled
/// (`release.lua`, after the status counters of `counters.lua`).
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/counters.lua"),
        include_str!("scripts/release.lua")
    ))
});
/// Guarded order status change (`transition.lua`, after the status counters
/// of `counters.lua`).
pub static TRANSITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/counters.lua"),
        include_str!("scripts/transition.lua")
    ))
});
/// A buyer's Idempotency-Key bound to its first request in the sale
/// (`claim.lua`): `{'new' | 'same' | 'reused', the key's first request, ''}`.
pub static CLAIM_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/claim.lua"),
        "return {claimed, ARGV[2], ''}\n"
    ))
});
/// The key's binding and the purchase in one call, for a standalone Redis
/// (in a cluster the sale's binding and the product live in two slots):
/// `claim.lua`, then `purchase.lua` as a function of the KEYS and ARGV after
/// the claim's own, so it reads exactly as when called alone. One call saves
/// the keyed purchase a round trip and a script dispatch.
pub static CLAIM_AND_PURCHASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/claim.lua"),
        "local function purchase(KEYS, ARGV)\n",
        include_str!("scripts/purchase.lua"),
        "end\nreturn purchase({unpack(KEYS, 2)}, {unpack(ARGV, 4)})\n"
    ))
});
/// A user's orders of one product, read along their chain (`orders_of.lua`).
pub static ORDERS_OF: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/orders_of.lua")));
/// Catalog and stock written once per sale (`warm.lua`).
pub static WARM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/warm.lua")));

/// A sale's applied spec published for running pods (`publish_spec.lua`).
pub static PUBLISH_SPEC: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/publish_spec.lua")));

/// The purchase script's source, for `redis-benchmark` comparisons.
pub const PURCHASE_SOURCE: &str = include_str!("scripts/purchase.lua");
/// One push event routed to the pod holding the user's socket (`push.lua`).
pub static PUSH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/push.lua")));
/// Many events routed in one call (`push_many.lua`), for a consumer's batch.
pub static PUSH_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/push_many.lua")));
/// A push registry entry removed only by the pod it names (`unregister.lua`).
pub static UNREGISTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/unregister.lua")));

/// One call of the purchase script: `keys` from `ProductKeys::purchase_keys`,
/// an empty `idempotency_field` for a request without a key, and on a ticket
/// sale the ticket to spend: its key (`ProductKeys::ticket`, the eighth KEY)
/// and expiry (Unix ms, the fifth ARGV). Without one the script runs no
/// ticket command.
pub struct Purchase<'a> {
    pub keys: &'a PurchaseKeys,
    pub user: &'a str,
    pub quantity: i64,
    pub order_id: &'a str,
    /// `user \x1f Idempotency-Key`, or empty.
    pub idempotency_field: &'a str,
    pub ticket: Option<&'a (String, i64)>,
}

impl<'k> Purchase<'k> {
    /// One unit for `user`, without an Idempotency-Key or a ticket.
    pub fn new_buyer(keys: &'k PurchaseKeys, user: &'k str, order_id: &'k str) -> Self {
        Self {
            keys,
            user,
            quantity: 1,
            order_id,
            idempotency_field: "",
            ticket: None,
        }
    }

    /// `purchase.lua` alone.
    pub fn invocation<'a>(&self) -> redis::ScriptInvocation<'a> {
        let mut inv = PURCHASE.prepare_invoke();
        self.args(&mut inv);
        inv
    }

    /// The key's binding, then the purchase, in one call on a standalone
    /// Redis (`CLAIM_AND_PURCHASE`): answers as [`Self::invocation`] does, or
    /// `{'reused', the key's first request, ''}`. The binding's field is the
    /// purchase's idempotency field.
    pub fn claiming<'a>(&self, claim: &KeyClaim) -> redis::ScriptInvocation<'a> {
        let mut inv = CLAIM_AND_PURCHASE.prepare_invoke();
        claim.args(&mut inv, self.idempotency_field);
        self.args(&mut inv);
        inv
    }

    fn args(&self, inv: &mut redis::ScriptInvocation) {
        for k in self.keys {
            inv.key(k);
        }
        inv.arg(self.user)
            .arg(self.quantity)
            .arg(self.order_id)
            .arg(self.idempotency_field);
        if let Some((key, expires_at_ms)) = self.ticket {
            inv.key(key).arg(*expires_at_ms);
        }
    }
}

/// What `purchase.lua` (or `CLAIM_AND_PURCHASE`) answered. An accepted order
/// is one integer, the stock left: the caller made the order id, and a table
/// reply costs Redis more than any command the decision runs. Every other
/// outcome is `{outcome, a, b}` (the script's header lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurchaseAnswer {
    Accepted { remaining: i64 },
    Other(String, String, String),
}

impl redis::FromRedisValue for PurchaseAnswer {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        match v {
            redis::Value::Int(remaining) => Ok(Self::Accepted { remaining }),
            other => {
                let (outcome, a, b) = redis::from_redis_value(other)?;
                Ok(Self::Other(outcome, a, b))
            }
        }
    }
}

/// An Idempotency-Key's binding to its first request in the sale.
pub struct KeyClaim<'a> {
    /// The sale's idempotency hash (`SaleKeys::idempotency`).
    pub hash: &'a str,
    /// `"<sku> <quantity>"`.
    pub request: &'a str,
    /// When the bindings may go (Unix ms).
    pub keep_until_ms: i64,
}

impl KeyClaim<'_> {
    /// The binding alone (`CLAIM_KEY`) of `field` (`user \x1f key`), as on a
    /// Redis Cluster.
    pub fn invocation<'a>(&self, field: &str) -> redis::ScriptInvocation<'a> {
        let mut inv = CLAIM_KEY.prepare_invoke();
        self.args(&mut inv, field);
        inv
    }

    fn args(&self, inv: &mut redis::ScriptInvocation, field: &str) {
        inv.key(self.hash)
            .arg(field)
            .arg(self.request)
            .arg(self.keep_until_ms);
    }
}

#[cfg(test)]
mod tests {
    use redis::{FromRedisValue, Value};

    use super::PurchaseAnswer;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn an_integer_is_an_accepted_order_and_a_table_any_other_outcome() {
        assert_eq!(
            PurchaseAnswer::from_redis_value(Value::Int(41)).ok(),
            Some(PurchaseAnswer::Accepted { remaining: 41 })
        );
        let sold_out = Value::Array(vec![bulk("soldout"), bulk("0"), bulk("")]);
        assert_eq!(
            PurchaseAnswer::from_redis_value(sold_out).ok(),
            Some(PurchaseAnswer::Other(
                "soldout".into(),
                "0".into(),
                String::new()
            ))
        );
        assert!(PurchaseAnswer::from_redis_value(bulk("ok")).is_err());
    }
}
