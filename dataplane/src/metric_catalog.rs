//! Every metric the gateway and the consumer export, registered at start with
//! its help text and every label value it can take. A series that first
//! appears at 1 is invisible to `increase()`, so the first dead letter would
//! never page; registered at 0 it does, and dashboards fill on the first scrape.

use metrics::{Label, Unit};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric: its name as scraped (counters end in `_total`) and
/// each label with the values it takes.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: &'static [(&'static str, &'static [&'static str])],
}

const fn metric(
    name: &'static str,
    kind: Kind,
    help: &'static str,
    labels: &'static [(&'static str, &'static [&'static str])],
) -> Metric {
    Metric {
        name,
        kind,
        help,
        labels,
    }
}

use Kind::{Counter, Gauge, Histogram};

const PUBLISHED: Metric = metric(
    "flashsale_push_published_total",
    Counter,
    "Order events published: routed=yes sent to the pod holding the user's socket, no when the user had none",
    &[("routed", &["yes", "no"])],
);

const REPLICA_WAIT: Metric = metric(
    "flashsale_redis_replica_wait_total",
    Counter,
    "WAITs issued under redis.durability: replica, by where and outcome: confirmed (a replica holds the writes), pending (none did within the timeout; nothing relied on them), error (the pipeline failed)",
    &[
        ("path", &crate::durability::WaitPath::ALL),
        ("outcome", &crate::durability::OUTCOMES),
    ],
);

const REPLICA_WAIT_SECONDS: Metric = metric(
    "flashsale_redis_replica_wait_seconds",
    Histogram,
    "Round trip of a pipeline that ends in WAIT (the writes, then the replica's acknowledgement)",
    &[("path", &crate::durability::WaitPath::ALL)],
);

/// What a gateway exports.
pub const GATEWAY: &[Metric] = &[
    REPLICA_WAIT,
    REPLICA_WAIT_SECONDS,
    metric(
        "flashsale_gateway_commit_batch_size",
        Histogram,
        "Purchases one replica acknowledgement (WAIT) confirmed together, per product (group commit)",
        &[],
    ),
    metric(
        "flashsale_gateway_commit_abandoned_total",
        Counter,
        "Queued purchases not run because their request had already been answered 503 store_timeout (group commit)",
        &[],
    ),
    metric(
        "flashsale_gateway_requests_total",
        Counter,
        "Purchase answers by outcome",
        &[(
            "outcome",
            &[
                "accepted",
                "duplicate",
                "sold_out",
                "sold_out_local",
                "insufficient_stock",
                "limit_reached",
                "not_started",
                "ended",
                "rate_limited",
                "bad_request",
                "unauthenticated",
                "ticket_required",
                "ticket_invalid",
                "unavailable",
                "replication_pending",
            ],
        )],
    ),
    metric(
        "flashsale_gateway_tickets_total",
        Counter,
        "Purchase ticket requests by outcome",
        &[("outcome", crate::gateway::tickets::outcome::ALL)],
    ),
    metric(
        "flashsale_gateway_request_duration_seconds",
        Histogram,
        "Purchase latency inside the gateway",
        &[("route", &["purchase"])],
    ),
    metric(
        "flashsale_gateway_redis_duration_seconds",
        Histogram,
        "The purchase script's round trip to Redis",
        &[],
    ),
    metric(
        "flashsale_gateway_rate_limited_total",
        Counter,
        "Purchases refused by a rate limit, by bucket",
        &[("scope", &["ip", "user", "global"])],
    ),
    metric(
        "flashsale_gateway_sale_page_requests_total",
        Counter,
        "Sale page answers (GET /v1/sales/{sale}) by outcome",
        &[(
            "outcome",
            &["ok", "not_modified", "unknown_sale", "not_ready"],
        )],
    ),
    metric(
        "flashsale_gateway_sale_page_refreshes_total",
        Counter,
        "The sale page refresher's stock reads from Redis, by result",
        &[("result", &["ok", "failed"])],
    ),
    metric(
        "flashsale_gateway_sale_page_stock_age_seconds",
        Gauge,
        "Age of the stock figures the sale page serves (under 0.3 normally; grows while Redis is unreachable)",
        &[],
    ),
    metric(
        "flashsale_gateway_load_report_timestamp_seconds",
        Gauge,
        "Unix time of the last load report this gateway published to Redis (0: none yet)",
        &[],
    ),
    metric(
        "flashsale_gateway_live_gateways",
        Gauge,
        "Gateways of the sale with a fresh load report, as this gateway last counted them (its share of the global rate limit is 1/n)",
        &[],
    ),
    metric(
        "flashsale_push_connections",
        Gauge,
        "Open WebSockets on this gateway",
        &[],
    ),
    PUBLISHED,
    metric(
        "flashsale_push_received_total",
        Counter,
        "Order events this gateway received for its sockets",
        &[],
    ),
    metric(
        "flashsale_push_slow_disconnects_total",
        Counter,
        "Sockets dropped because the client fell 64 events behind",
        &[],
    ),
    metric(
        "flashsale_payment_callbacks_total",
        Counter,
        "Payment callbacks by outcome; repeat=yes for a replay",
        &[
            ("outcome", &["paid", "rejected", "refund_due"]),
            ("repeat", &["no", "yes"]),
        ],
    ),
    metric(
        "flashsale_spec_version",
        Gauge,
        "Version of the sale's applied spec this process runs on (live settings; 0 until the first is read)",
        &[],
    ),
];

/// What a consumer exports (its payment timeout sweeper included).
pub const CONSUMER: &[Metric] = &[
    REPLICA_WAIT,
    REPLICA_WAIT_SECONDS,
    metric(
        "flashsale_consumer_orders_persisted_total",
        Counter,
        "Orders inserted into PostgreSQL (redeliveries not counted)",
        &[],
    ),
    metric(
        "flashsale_consumer_batch_duration_seconds",
        Histogram,
        "Read to commit of one batch",
        &[],
    ),
    metric(
        "flashsale_consumer_store_errors_total",
        Counter,
        "Batches the database did not take: transient (retried) or refused (split to find the bad entry)",
        &[("kind", &["transient", "refused"])],
    ),
    metric(
        "flashsale_consumer_dead_lettered_total",
        Counter,
        "Orders given up on: failed, stock returned, entry on the dead-letter stream",
        &[],
    ),
    metric(
        "flashsale_consumer_claimed_total",
        Counter,
        "Stream entries taken over from a dead consumer",
        &[],
    ),
    metric(
        "flashsale_orders_cancelled_total",
        Counter,
        "Unpaid orders cancelled by the payment timeout sweeper (stock returned)",
        &[("reason", &["payment_timeout"])],
    ),
    metric(
        "flashsale_payment_outbox_unapplied",
        Gauge,
        "Cancelled orders whose stock is not yet back in Redis (outbox rows not applied)",
        &[],
    ),
    metric(
        "flashsale_payment_outbox_oldest_unapplied_seconds",
        Gauge,
        "Age of the oldest unapplied outbox row (0: none)",
        &[],
    ),
    metric(
        "flashsale_consumer_stock_behind_total",
        Counter,
        "Orders the inventory refused while PostgreSQL's stock was below Redis' (a stock raise still on its way); they wait, never fail",
        &[],
    ),
    metric(
        "flashsale_consumer_oversell_refusals_total",
        Counter,
        "Orders the inventory refused with no newer stock covering them: an oversell alarm",
        &[],
    ),
    metric(
        "flashsale_spec_version",
        Gauge,
        "Version of the sale's applied spec this process runs on (live settings; 0 until the first is read)",
        &[],
    ),
    PUBLISHED,
];

/// Registers `metrics` on the process' recorder: help text, and every label
/// combination at zero.
pub fn register(metrics: &[Metric]) {
    crate::telemetry::prometheus();
    for m in metrics {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram if m.name.ends_with("_seconds") => {
                metrics::describe_histogram!(m.name, Unit::Seconds, m.help)
            }
            Kind::Histogram => metrics::describe_histogram!(m.name, Unit::Count, m.help),
        }
        for labels in combinations(m.labels) {
            match m.kind {
                Kind::Counter => metrics::counter!(m.name, labels).increment(0),
                Kind::Gauge => metrics::gauge!(m.name, labels).increment(0.0),
                Kind::Histogram => {
                    let _ = metrics::histogram!(m.name, labels);
                }
            }
        }
    }
}

/// Every label set the declared values make (one empty set without labels).
fn combinations(labels: &[(&'static str, &'static [&'static str])]) -> Vec<Vec<Label>> {
    let mut sets: Vec<Vec<Label>> = vec![Vec::new()];
    for (key, values) in labels {
        sets = sets
            .into_iter()
            .flat_map(|set| {
                values.iter().map(move |v| {
                    let mut next = set.clone();
                    next.push(Label::new(*key, *v));
                    next
                })
            })
            .collect();
    }
    sets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_are_the_cartesian_product() {
        let sets = combinations(&[("a", &["1", "2"]), ("b", &["x", "y", "z"])]);
        assert_eq!(sets.len(), 6);
        assert_eq!(combinations(&[]), vec![Vec::<Label>::new()]);
    }

    #[test]
    fn names_are_unique_per_process_kind_and_counters_end_in_total() {
        for list in [GATEWAY, CONSUMER] {
            let mut names: Vec<&str> = list.iter().map(|m| m.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), list.len());
        }
        for m in GATEWAY.iter().chain(CONSUMER) {
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
        }
    }
}
