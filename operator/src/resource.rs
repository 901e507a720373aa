//! The `FlashSale` custom resource: `flashsale.dev/v1alpha1`, short name `fs`.
//!
//! The sale itself (window, products, limits, payment) is the data plane's
//! [`SaleSpec`], flattened into the spec so the operator, the gateway's
//! ConfigMap and the local run read one shape. Around it sit what only a
//! cluster needs: connection Secrets, gateway and consumer settings, and the
//! scaling behaviour the autoscaler follows.

use dataplane::durability::Durability;
use dataplane::redis_conn::{RedisConnError, RedisMode, RedisTarget};
use dataplane::spec::{Phase, SaleSpec};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

pub const GROUP: &str = "flashsale.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "flashsale.dev/v1alpha1";
pub const KIND: &str = "FlashSale";

/// A flash sale: what is sold, when, and the capacity that serves it.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "flashsale.dev",
    version = "v1alpha1",
    kind = "FlashSale",
    namespaced,
    shortname = "fs",
    category = "flashsale",
    status = "FlashSaleStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Remaining","type":"integer","description":"Units still for sale, all products","jsonPath":".status.remaining"}"#,
    printcolumn = r#"{"name":"Gateways","type":"integer","description":"Available gateway pods","jsonPath":".status.gateway.availableReplicas"}"#,
    printcolumn = r#"{"name":"Consumers","type":"integer","description":"Available consumer pods","jsonPath":".status.consumer.availableReplicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","description":"The Ready condition: False while the spec is refused or a child cannot be applied","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","description":"Why Ready is what it is","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = sale_schema_rules)]
pub struct FlashSaleSpec {
    /// Window, products, rate limits and payment timeout, as the data plane reads them.
    #[serde(flatten)]
    pub sale: SaleSpec,
    /// Where stock, buyers and order streams live.
    pub redis: RedisSpec,
    /// Where orders are persisted (PostgreSQL); the operator never deletes orders.
    pub database: ConnectionSpec,
    /// The HMAC secret the shop's login signs user tokens with.
    pub token_secret_ref: SecretKeyRef,
    /// The payment provider's Ed25519 public key (base64 or hex) that signs
    /// payment callbacks. Without it the gateways answer
    /// `POST /v1/payments/callback` with 503; unpaid orders still time out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_key_secret_ref: Option<SecretKeyRef>,
    /// The ISO 4217 code payment callbacks must pay in (prices carry none);
    /// another currency is answered 422 `currency_mismatch`. Default USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Z]{3}$"))]
    pub payment_currency: Option<String>,
    #[serde(default)]
    pub gateway: GatewaySpec,
    #[serde(default)]
    pub consumer: ConsumerSpec,
    /// How fast the autoscaler may move replica counts (HPA `behavior` semantics).
    #[serde(default)]
    pub scaling: ScalingBehavior,
}

/// Rules the API server enforces that plain JSON Schema cannot express: SKUs
/// are unique (a list-map keyed by `sku`, so the server itself refuses a
/// duplicate) and the window ends after it starts (CEL).
fn sale_schema_rules(schema: &mut schemars::Schema) {
    if let Some(products) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("products"))
        .and_then(|p| p.as_object_mut())
    {
        products.insert("x-kubernetes-list-type".into(), json!("map"));
        products.insert("x-kubernetes-list-map-keys".into(), json!(["sku"]));
    }
    schema.insert(
        "x-kubernetes-validations".into(),
        json!([{
            "rule": "self.endTime > self.startTime",
            // No `reason` or `fieldPath`: Kubernetes knows them from 1.28,
            // and kubectl's strict validation refuses them before.
            "message": "endTime must be after startTime"
        }]),
    );
}

/// A connection URL kept in a Secret.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionSpec {
    pub url_secret_ref: SecretKeyRef,
}

/// The sale's Redis: a URL kept in a Secret, and how to use it.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// The Secret key holding one URL (`standalone`), or a Redis Cluster's
    /// seed node URLs, comma-separated (`cluster`; list several: a gateway's
    /// push subscription moves along them when its node dies).
    pub url_secret_ref: SecretKeyRef,
    /// `standalone` (one Redis server) or `cluster` (a Redis Cluster).
    #[serde(default)]
    pub mode: RedisMode,
    /// When a purchase, a persisted entry or a release counts: `replica`
    /// once a replica holds it (`WAIT 1`; a 202 survives a failover, and a
    /// shard with no replica cannot sell), `local` once the master does (a
    /// failover can lose the last 202s). Default: `replica` in cluster mode,
    /// `local` standalone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<Durability>,
}

impl RedisSpec {
    /// The durability in force: the spec's, else the mode's default.
    pub fn durability(&self) -> Durability {
        self.durability
            .unwrap_or_else(|| Durability::default_for(self.mode))
    }

    /// The Redis the Secret's `url` names, read in this spec's mode.
    pub fn target(&self, url: &str) -> Result<RedisTarget, RedisConnError> {
        RedisTarget::parse(url, Some(self.mode))
    }
}

/// One key of a Secret in the sale's namespace.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The gateways: they take the crowd's requests and hold the WebSockets.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Container image; defaults to the data plane image of the operator's own version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub replicas: GatewayReplicas,
    /// Open WebSocket connections one pod should hold.
    #[serde(default = "default_target_connections")]
    #[schemars(range(min = 1))]
    pub target_connections_per_pod: u32,
    /// Purchase requests per second one pod should serve.
    #[serde(default = "default_target_rps")]
    #[schemars(range(min = 1))]
    pub target_requests_per_second_per_pod: u32,
    /// Container resources; the operator sets modest requests when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Behind a proxy (an ingress, a load balancer), the header it writes the
    /// client's address into, e.g. `x-forwarded-for`: the per-IP rate limit
    /// takes the header's last address, the one the proxy added. Without
    /// it the limit counts the proxy's address, one bucket for everyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub client_ip_header: Option<String>,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            image: None,
            replicas: GatewayReplicas::default(),
            target_connections_per_pod: default_target_connections(),
            target_requests_per_second_per_pod: default_target_rps(),
            resources: None,
            client_ip_header: None,
        }
    }
}

fn default_target_connections() -> u32 {
    20_000
}

fn default_target_rps() -> u32 {
    15_000
}

/// Replica bounds of the gateways; the autoscaler moves between them.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.min <= self.max", "message": "replicas.min must not exceed replicas.max"},
    {"rule": "!has(self.atStart) || (self.atStart >= self.min && self.atStart <= self.max)",
     "message": "replicas.atStart must lie between min and max"}
]))]
pub struct GatewayReplicas {
    #[serde(default = "default_gateway_min")]
    #[schemars(range(min = 1, max = 1000))]
    pub min: i32,
    #[serde(default = "default_gateway_max")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
    /// Gateways already running at `startTime - warmupSeconds`, before the crowd arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub at_start: Option<i32>,
}

impl Default for GatewayReplicas {
    fn default() -> Self {
        Self {
            min: default_gateway_min(),
            max: default_gateway_max(),
            at_start: None,
        }
    }
}

fn default_gateway_min() -> i32 {
    2
}

fn default_gateway_max() -> i32 {
    50
}

/// The consumers: they persist accepted orders from the Redis streams.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerSpec {
    /// Container image; defaults to the data plane image of the operator's own version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub replicas: ConsumerReplicas,
    /// Stream entries not yet persisted that one pod should carry.
    #[serde(default = "default_target_lag")]
    #[schemars(range(min = 1))]
    pub target_lag_per_pod: u32,
    /// Container resources; the operator sets modest requests when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for ConsumerSpec {
    fn default() -> Self {
        Self {
            image: None,
            replicas: ConsumerReplicas::default(),
            target_lag_per_pod: default_target_lag(),
            resources: None,
        }
    }
}

fn default_target_lag() -> u32 {
    5_000
}

/// Replica bounds of the consumers.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.min <= self.max", "message": "replicas.min must not exceed replicas.max"}
]))]
pub struct ConsumerReplicas {
    #[serde(default = "default_consumer_min")]
    #[schemars(range(min = 1, max = 1000))]
    pub min: i32,
    #[serde(default = "default_consumer_max")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
}

impl Default for ConsumerReplicas {
    fn default() -> Self {
        Self {
            min: default_consumer_min(),
            max: default_consumer_max(),
        }
    }
}

fn default_consumer_min() -> i32 {
    1
}

fn default_consumer_max() -> i32 {
    20
}

/// `spec.scaling`: the autoscaler's own `behavior` types, shaped like
/// `autoscaling/v2` (one definition for the CRD and the algorithm).
pub use crate::scaling::{PolicyType, ScalingBehavior, ScalingPolicy, ScalingRules, SelectPolicy};

/// What the operator (and the autoscaler, under its own field manager) observed.
///
/// Every field is optional and skipped when empty: status is written by
/// server-side apply from two managers, and a field one of them sends it owns.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FlashSaleStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SalePhase>,
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `RedisWarmed`, `GatewayAvailable`, `ConsumersAvailable`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Units still for sale over all products.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["sku"]))]
    pub products: Vec<ProductStatus>,
    /// The spec generation Redis was last warmed from; warming runs again only
    /// when the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<ConsumerStatus>,
}

/// The sale's phase: the clock's four, plus `Failed` for a spec it cannot run.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum SalePhase {
    Pending,
    Warming,
    Active,
    Ended,
    Failed,
}

impl From<Phase> for SalePhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Pending => Self::Pending,
            Phase::Warming => Self::Warming,
            Phase::Active => Self::Active,
            Phase::Ended => Self::Ended,
        }
    }
}

impl std::fmt::Display for SalePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Pending => "Pending",
            Self::Warming => "Warming",
            Self::Active => "Active",
            Self::Ended => "Ended",
            Self::Failed => "Failed",
        };
        f.write_str(s)
    }
}

/// One product's counters in units, read from Redis in one atomic step
/// (docs/operator.md says where each comes from).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProductStatus {
    pub sku: String,
    /// Stock Redis holds for the product (the spec's, once warmed).
    pub stock: i64,
    /// Stock of the product's inventory row in PostgreSQL. Raises reach it
    /// before Redis and cuts after, so it is never below `stock`; at rest the
    /// two agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_stock: Option<i64>,
    /// Units still for sale.
    pub remaining: i64,
    /// Units held by live orders: accepted (not yet persisted), confirmed or
    /// paid; `stock - remaining`.
    pub sold: i64,
    /// Units of orders in PostgreSQL that count: confirmed or paid.
    pub persisted: i64,
    /// Units of paid orders.
    #[serde(default)]
    pub paid: i64,
    /// Units of orders cancelled for want of payment; their stock went back on sale.
    #[serde(default)]
    pub cancelled: i64,
    /// Units of orders that failed to persist (dead-lettered); their stock went back on sale.
    #[serde(default)]
    pub failed: i64,
}

impl ProductStatus {
    /// The status of a product as Redis' counters give it, with PostgreSQL's
    /// stock beside Redis'.
    pub fn from_counters(
        c: &dataplane::counters::ProductCounters,
        database_stock: Option<i64>,
    ) -> Self {
        Self {
            sku: c.sku.clone(),
            stock: c.stock,
            database_stock,
            remaining: c.remaining,
            sold: c.sold(),
            persisted: c.persisted,
            paid: c.paid,
            cancelled: c.cancelled,
            failed: c.failed,
        }
    }
}

/// Gateway figures. `availableReplicas` is the reconciler's (from the
/// Deployment); the rest is the autoscaler's.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Open WebSocket connections over all gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<i64>,
    /// Purchase requests per second over all gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub last_scale_time: Option<Timestamp>,
    /// The metric that decided the last recommendation (`connections` or `requestsPerSecond`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driving_metric: Option<String>,
    /// What holds the count short of the driving metric's proposal:
    /// `scaleUpStabilization`, `scaleDownStabilization`, `scaleUpPolicy` or `scaleDownPolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    /// When a stabilization window stops holding the count, if nothing else changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub held_until: Option<Timestamp>,
}

/// Consumer figures. `availableReplicas` is the reconciler's; the rest is the autoscaler's.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Stream entries not yet persisted, over all products.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub last_scale_time: Option<Timestamp>,
    /// What holds the count short of the lag's proposal (as for the gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    /// When a stabilization window stops holding the count, if nothing else changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub held_until: Option<Timestamp>,
}
