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
/// A buyer's Idempotency-Key bound to its first request in the sale (`claim_key.lua`).
pub static CLAIM_KEY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/claim_key.lua")));
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
pub fn purchase<'a>(
    keys: &PurchaseKeys,
    user: &str,
    quantity: i64,
    order_id: &str,
    idempotency_field: &str,
    ticket: Option<&(String, i64)>,
) -> redis::ScriptInvocation<'a> {
    let mut inv = PURCHASE.prepare_invoke();
    for k in keys {
        inv.key(k);
    }
    inv.arg(user)
        .arg(quantity)
        .arg(order_id)
        .arg(idempotency_field);
    if let Some((key, expires_at_ms)) = ticket {
        inv.key(key).arg(*expires_at_ms);
    }
    inv
}
