//! The Lua scripts of the Redis contract. `redis::Script` calls them by SHA
//! (EVALSHA) and loads them on NOSCRIPT, so each is sent in full once per server.

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{Cmd, FromRedisValue, RedisResult, RedisWrite, Script, ToRedisArgs};

use crate::keys::PurchaseKeys;

/// The purchase decision (`purchase.lua`).
pub static PURCHASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/purchase.lua")));
/// `rejoin.lua`: a consumer's lost groups created again, only while the
/// sale's meta record exists (standalone).
pub static REJOIN: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/rejoin.lua")));
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
/// A committed batch's orders confirmed and its entries acknowledged in one
/// call (`confirm.lua` after `transition.lua` as a function), so a refused
/// confirmation acknowledges nothing.
pub static CONFIRM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/counters.lua"),
        "local function transition(KEYS, ARGV)\n",
        include_str!("scripts/transition.lua"),
        "end\n",
        include_str!("scripts/confirm.lua")
    ))
});
/// An entry given up on in one call (`dead_letter.lua` after `release.lua`
/// as a function): copied, its order failed, then acknowledged.
pub static DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("scripts/counters.lua"),
        "local function release(KEYS, ARGV)\n",
        include_str!("scripts/release.lua"),
        "end\n",
        include_str!("scripts/dead_letter.lua")
    ))
});
/// Moves one order's record to paid (from accepted or confirmed only, with
/// the product's counters: `TRANSITION`); the status it had before ('' when
/// unknown). The payment callback and the sweeper's owed marks both use it.
pub async fn mark_paid<C: ConnectionLike + Send>(
    conn: &mut C,
    keys: &crate::keys::ProductKeys,
    order_id: &str,
) -> RedisResult<String> {
    let before: Vec<String> = TRANSITION
        .key(keys.orders())
        .key(keys.info())
        .arg(crate::order::OrderStatus::Paid.as_str())
        .arg("accepted,confirmed")
        .arg(order_id)
        .invoke_async(conn)
        .await?;
    Ok(before.into_iter().next().unwrap_or_default())
}

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

/// A lock released only by its holder (`unlock.lua`).
pub static UNLOCK: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/unlock.lua")));

/// A sale's applied spec published for running pods (`publish_spec.lua`).
pub static PUBLISH_SPEC: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/publish_spec.lua")));

/// The purchase script's source, for `redis-benchmark` comparisons.
pub const PURCHASE_SOURCE: &str = include_str!("scripts/purchase.lua");
/// One push event routed to the pod holding the user's socket (`push.lua`).
pub static PUSH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/push.lua")));
/// A pod's push registry entries kept alive, never taken back from the pod a
/// user connected to since (`refresh_push.lua`).
pub static REFRESH_PUSH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/refresh_push.lua")));
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
    pub fn invocation(&self) -> Call {
        let mut call = Call::new(&PURCHASE, self.key_count(), self.arg_count());
        self.keys_only(&mut call);
        self.args_only(&mut call);
        call
    }

    /// The key's binding, then the purchase, in one call on a standalone
    /// Redis (`CLAIM_AND_PURCHASE`): answers as [`Self::invocation`] does, or
    /// `{'reused', the key's first request, ''}`. The binding's field is the
    /// purchase's idempotency field.
    pub fn claiming(&self, claim: &KeyClaim) -> Call {
        let mut call = Call::new(
            &CLAIM_AND_PURCHASE,
            1 + self.key_count(),
            KeyClaim::ARGS + self.arg_count(),
        );
        call.arg(claim.hash);
        self.keys_only(&mut call);
        claim.args(&mut call, self.idempotency_field);
        self.args_only(&mut call);
        call
    }

    fn key_count(&self) -> usize {
        self.keys.len() + usize::from(self.ticket.is_some())
    }

    fn arg_count(&self) -> usize {
        4 + usize::from(self.ticket.is_some())
    }

    fn keys_only(&self, call: &mut Call) {
        for k in self.keys {
            call.arg(k);
        }
        if let Some((key, _)) = self.ticket {
            call.arg(key);
        }
    }

    fn args_only(&self, call: &mut Call) {
        call.arg(self.user)
            .arg(self.quantity)
            .arg(self.order_id)
            .arg(self.idempotency_field);
        if let Some((_, expires_at_ms)) = self.ticket {
            call.arg(*expires_at_ms);
        }
    }
}

/// One script call, written straight into its `EVALSHA` command: the script's
/// SHA, the key count, then the keys and the arguments, in that order.
///
/// Why not `redis::ScriptInvocation`: it keeps each key and argument in a
/// `Vec<u8>` of its own and copies them into the command when sent, twelve
/// allocations per purchase on the gateway's hottest path (counted with
/// `perf probe` on libc's malloc); this writes the same bytes into one
/// buffer. NOSCRIPT is handled as `ScriptInvocation::invoke_async` handles
/// it: load the script, send again.
pub struct Call {
    script: &'static Script,
    cmd: Cmd,
}

impl Call {
    /// `EVALSHA <sha> <keys>`; the caller adds `keys` keys, then `args`
    /// arguments (room is made for that many; more still fit).
    pub fn new(script: &'static Script, keys: usize, args: usize) -> Self {
        // 512 bytes hold a purchase's SHA, keys and arguments.
        let mut cmd = Cmd::with_capacity(3 + keys + args, 512);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        Self { script, cmd }
    }

    /// The next key or argument.
    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// The next key or argument, formatted into the command.
    pub fn arg_fmt(&mut self, arg: impl std::fmt::Display) -> &mut Self {
        self.cmd.write_arg_fmt(arg);
        self
    }

    /// The next key or argument, written into the command by `write`. What
    /// it wrote before an error stays the argument.
    pub fn arg_with(
        &mut self,
        write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> &mut Self {
        {
            let mut w = self.cmd.writer_for_next_arg();
            let _ = write(&mut w);
        }
        self
    }

    /// Runs the script; a server without it (NOSCRIPT: restarted, failed
    /// over, flushed) gets it loaded and the call again.
    pub async fn invoke_async<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> RedisResult<T> {
        match self.cmd.query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.script.load_async(conn).await?;
                self.cmd.query_async(conn).await
            }
            answer => answer,
        }
    }

    /// The `EVALSHA` command, for a pipeline; there a NOSCRIPT answer is the
    /// caller's to handle (that call did not run).
    pub fn into_cmd(self) -> Cmd {
        self.cmd
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
    /// The binding's arguments: field, request, keep-until.
    const ARGS: usize = 3;

    /// The binding alone (`CLAIM_KEY`) of `field` (`user \x1f key`), as on a
    /// Redis Cluster.
    pub fn invocation(&self, field: &str) -> Call {
        let mut call = Call::new(&CLAIM_KEY, 1, Self::ARGS);
        call.arg(self.hash);
        self.args(&mut call, field);
        call
    }

    fn args(&self, call: &mut Call, field: &str) {
        call.arg(field).arg(self.request).arg(self.keep_until_ms);
    }
}

#[cfg(test)]
mod tests {
    use redis::{FromRedisValue, Value};

    use super::{
        CLAIM_AND_PURCHASE, CLAIM_KEY, Call, KeyClaim, PURCHASE, Purchase, PurchaseAnswer,
    };
    use crate::keys::PurchaseKeys;

    fn packed(call: Call) -> Vec<u8> {
        redis::pipe()
            .add_command(call.into_cmd())
            .get_packed_pipeline()
    }

    fn packed_by_redis(inv: &redis::ScriptInvocation) -> Vec<u8> {
        redis::pipe().invoke_script(inv).get_packed_pipeline()
    }

    /// `Call` sends what `redis::ScriptInvocation` sends for the same keys
    /// and arguments: the scripts see the same KEYS and ARGV.
    #[test]
    fn a_call_is_the_command_redis_rs_would_send() {
        let keys: PurchaseKeys = std::array::from_fn(|i| format!("fs:{{sale/item}}:k{i}"));
        let ticket = (
            "fs:{sale/item}:ticket:01ARZ".to_string(),
            1_700_000_000_123_i64,
        );
        let claim = KeyClaim {
            hash: "fs:{sale}:idempotency",
            request: "item 2",
            keep_until_ms: 1_800_000_000_000,
        };
        for with_ticket in [false, true] {
            let purchase = Purchase {
                keys: &keys,
                user: "u-1",
                quantity: 2,
                order_id: "item.01ARZ3NDEK",
                idempotency_field: "u-1\x1fk",
                ticket: with_ticket.then_some(&ticket),
            };
            let args = |inv: &mut redis::ScriptInvocation| {
                for k in &keys {
                    inv.key(k);
                }
                inv.arg("u-1")
                    .arg(2_i64)
                    .arg("item.01ARZ3NDEK")
                    .arg("u-1\x1fk");
                if with_ticket {
                    inv.key(&ticket.0).arg(ticket.1);
                }
            };
            let mut alone = PURCHASE.prepare_invoke();
            args(&mut alone);
            assert_eq!(packed(purchase.invocation()), packed_by_redis(&alone));
            let mut claiming = CLAIM_AND_PURCHASE.prepare_invoke();
            claiming
                .key(claim.hash)
                .arg("u-1\x1fk")
                .arg("item 2")
                .arg(1_800_000_000_000_i64);
            args(&mut claiming);
            assert_eq!(
                packed(purchase.claiming(&claim)),
                packed_by_redis(&claiming)
            );
        }
        let mut binding = CLAIM_KEY.prepare_invoke();
        binding
            .key(claim.hash)
            .arg("f")
            .arg("item 2")
            .arg(1_800_000_000_000_i64);
        assert_eq!(packed(claim.invocation("f")), packed_by_redis(&binding));
    }

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
