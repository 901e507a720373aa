//! Order events for push: what a user's WebSocket receives, and how a
//! publisher (gateway on accept, consumer on confirm/fail, payment callback
//! on paid, timeout sweeper on cancel) routes one to the single gateway pod
//! that holds the user's socket.
//!
//! Routing: `fs:{ns/sale}:push:user:<user>` names the pod (TTL refreshed
//! while the socket is open); a publisher reads it (`push.lua` for one
//! event, an `MGET` for a batch) and PUBLISHes on that pod's channel only.
//! Pub/sub is lossy (a pod restarting its subscription misses what was sent
//! meanwhile); the guarantee is the resume snapshot a client gets on
//! (re)connect. See docs/push.md.

use std::borrow::Cow;

use redis::RedisWrite;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};

use crate::keys::SaleKeys;
use crate::order::OrderStatus;
use crate::scripts;
use crate::spec::SaleId;

/// One order update as pushed to its owner.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderEvent {
    /// `order.accepted`, `order.confirmed`, `order.paid`, `order.failed` or `order.cancelled`.
    #[serde(rename = "type")]
    pub kind: Cow<'static, str>,
    pub order_id: String,
    pub sku: String,
    pub status: OrderStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the order entered this status, Unix milliseconds: live events
    /// are stamped by their publisher right after the change; snapshot events
    /// carry the time stored with the order (Redis clock).
    pub at: i64,
    /// True when the event comes from the snapshot sent on (re)connect
    /// rather than live.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
}

impl OrderEvent {
    pub fn new(order_id: &str, sku: &str, status: OrderStatus, reason: Option<String>) -> Self {
        Self {
            kind: Cow::Borrowed(event_type(status)),
            order_id: order_id.to_string(),
            sku: sku.to_string(),
            status,
            reason,
            at: jiff::Timestamp::now().as_millisecond(),
            resumed: false,
        }
    }
}

/// The event type of a status.
pub fn event_type(status: OrderStatus) -> &'static str {
    match status {
        OrderStatus::Accepted => "order.accepted",
        OrderStatus::Confirmed => "order.confirmed",
        OrderStatus::Paid => "order.paid",
        OrderStatus::Failed => "order.failed",
        OrderStatus::Cancelled => "order.cancelled",
    }
}

/// How far along its life a status is. An order only moves forward, so a
/// connection never sends a status ranked at or below one it already sent
/// for that order (late live events and snapshot overlap are dropped).
pub fn rank(status: OrderStatus) -> u8 {
    match status {
        OrderStatus::Accepted => 0,
        OrderStatus::Confirmed => 1,
        OrderStatus::Paid | OrderStatus::Failed | OrderStatus::Cancelled => 2,
    }
}

/// The wire form on a pod's channel, `<user>\n<event JSON>`, written into
/// `w` (a command's argument: no string of its own). User ids are visible
/// ASCII (no newline), so the pod routes without parsing the JSON.
pub fn encode_into(
    mut w: impl std::io::Write,
    user: &str,
    event: &OrderEvent,
) -> std::io::Result<()> {
    w.write_all(user.as_bytes())?;
    w.write_all(b"\n")?;
    serde_json::to_writer(w, event).map_err(std::io::Error::other)
}

/// Splits a channel message into user and event JSON.
pub fn decode(message: &str) -> Option<(&str, &str)> {
    message.split_once('\n')
}

/// Publishes events; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    keys: SaleKeys,
    prefix: String,
}

/// Events pipelined per round trip when publishing many.
const PUBLISH_CHUNK: usize = 500;

impl Publisher {
    pub fn new(sale: &SaleId) -> Self {
        let keys = SaleKeys::new(sale);
        Self {
            prefix: keys.push_channel_prefix(),
            keys,
        }
    }

    fn invocation(&self, user: &str, event: &OrderEvent) -> scripts::Call {
        let mut call = scripts::Call::new(&scripts::PUSH, 1, 2);
        call.arg_fmt(self.keys.push_user_key(user))
            .arg(&self.prefix)
            .arg_with(|w| encode_into(w, user, event));
        call
    }

    /// The registry entries of a batch's users, one `MGET` (all share the
    /// sale's hash tag, so one node answers it in a cluster too).
    fn registry_of(&self, events: &[(String, OrderEvent)]) -> redis::Cmd {
        let mut mget = redis::Cmd::with_capacity(1 + events.len(), 64 * events.len());
        mget.arg("MGET");
        for (user, _) in events {
            mget.write_arg_fmt(self.keys.push_user_key(user));
        }
        mget
    }

    /// A `PUBLISH` on `pod`'s channel for each event whose user the registry
    /// placed there (`pods` in `events` order); events of users without a
    /// socket are neither encoded nor sent.
    fn publishes(
        &self,
        events: &[(String, OrderEvent)],
        pods: &[Option<String>],
    ) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for ((user, event), pod) in events.iter().zip(pods) {
            let Some(pod) = pod else { continue };
            let mut publish = redis::cmd("PUBLISH");
            publish.write_arg_fmt(format_args!("{}{pod}", self.prefix));
            {
                // A failed encode would leave a partial message the pod drops
                // as unreadable JSON; these plain fields do not fail.
                let mut w = publish.writer_for_next_arg();
                let _ = encode_into(&mut w, user, event);
            }
            pipe.add_command(publish);
        }
        pipe
    }

    /// Routes one event; true if a gateway pod received it.
    pub async fn publish<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        user: &str,
        event: &OrderEvent,
    ) -> Result<bool, redis::RedisError> {
        let reached: i64 = self.invocation(user, event).invoke_async(conn).await?;
        metrics::counter!("flashsale_push_published_total", "routed" => if reached > 0 { "yes" } else { "no" })
            .increment(1);
        Ok(reached > 0)
    }

    /// Routes many events: per 500, one `MGET` of their users' registry
    /// entries, then one pipelined `PUBLISH` per event whose user holds a
    /// socket. Returns how many reached a pod. A winner without a socket
    /// (an API client, a closed tab: most of a crowd) costs Redis one key of
    /// an `MGET`; a script taking every event's message cost it the whole
    /// message as an argument (see docs/push.md).
    pub async fn publish_many<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        events: &[(String, OrderEvent)],
    ) -> Result<usize, redis::RedisError> {
        let mut reached = 0;
        for chunk in events.chunks(PUBLISH_CHUNK) {
            let pods: Vec<Option<String>> = self.registry_of(chunk).query_async(conn).await?;
            let pipe = self.publishes(chunk, &pods);
            let routed = if pipe.is_empty() {
                0
            } else {
                let listeners: Vec<i64> = pipe.query_async(conn).await?;
                listeners.iter().filter(|&&n| n > 0).count()
            };
            metrics::counter!("flashsale_push_published_total", "routed" => "yes")
                .increment(routed as u64);
            metrics::counter!("flashsale_push_published_total", "routed" => "no")
                .increment((chunk.len() - routed) as u64);
            reached += routed;
        }
        Ok(reached)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form as the pods read it, built apart from `encode_into`.
    fn wire(user: &str, event: &OrderEvent) -> String {
        let json = serde_json::to_string(event).unwrap_or_default();
        format!("{user}\n{json}")
    }

    /// The batch reads each user's registry key, then publishes the wire
    /// form on the channel of the pod that holds the user, only for users
    /// that have one; a single event goes through `push.lua`.
    #[test]
    fn publisher_commands_carry_keys_channels_and_wire_forms() {
        let publisher = Publisher::new(&SaleId::new("shop", "sale"));
        let keys = SaleKeys::new(&SaleId::new("shop", "sale"));
        let events: Vec<(String, OrderEvent)> = ["alice", "bob", "carol"]
            .iter()
            .map(|u| {
                let e = OrderEvent::new(&format!("item.{u}"), "item", OrderStatus::Accepted, None);
                (u.to_string(), e)
            })
            .collect();
        let mut mget = redis::cmd("MGET");
        for (u, _) in &events {
            mget.arg(keys.push_user(u));
        }
        assert_eq!(
            publisher.registry_of(&events).get_packed_command(),
            mget.get_packed_command()
        );
        let pods = [Some("pod-a".to_string()), None, Some("pod-b".to_string())];
        let mut publishes = redis::pipe();
        for (i, pod) in [(0, "pod-a"), (2, "pod-b")] {
            let (u, e) = &events[i];
            publishes
                .cmd("PUBLISH")
                .arg(format!("{}{pod}", keys.push_channel_prefix()))
                .arg(wire(u, e));
        }
        assert_eq!(
            publisher.publishes(&events, &pods).get_packed_pipeline(),
            publishes.get_packed_pipeline()
        );
        assert!(publisher.publishes(&events, &[None, None, None]).is_empty());
        let (u, e) = &events[0];
        let mut one = scripts::PUSH.prepare_invoke();
        one.key(keys.push_user(u))
            .arg(keys.push_channel_prefix())
            .arg(wire(u, e));
        let packed = redis::pipe()
            .add_command(publisher.invocation(u, e).into_cmd())
            .get_packed_pipeline();
        assert_eq!(
            packed,
            redis::pipe().invoke_script(&one).get_packed_pipeline()
        );
    }

    #[test]
    fn wire_form_round_trips() {
        let e = OrderEvent::new(
            "item.01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "item",
            OrderStatus::Confirmed,
            None,
        );
        let mut written = Vec::new();
        assert!(encode_into(&mut written, "alice", &e).is_ok());
        let written = String::from_utf8(written).unwrap_or_default();
        assert_eq!(written, wire("alice", &e));
        let (user, json) = decode(&written).unwrap_or_default();
        assert_eq!(user, "alice");
        let back: Result<OrderEvent, _> = serde_json::from_str(json);
        assert!(matches!(back, Ok(b) if b == e));
        assert!(json.contains(r#""type":"order.confirmed""#), "{json}");
        assert!(!json.contains("resumed"), "{json}");
    }

    #[test]
    fn ranks_only_move_forward() {
        assert!(rank(OrderStatus::Accepted) < rank(OrderStatus::Confirmed));
        assert!(rank(OrderStatus::Confirmed) < rank(OrderStatus::Paid));
        assert_eq!(rank(OrderStatus::Cancelled), rank(OrderStatus::Failed));
    }
}
