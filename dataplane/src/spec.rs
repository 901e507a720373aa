//! The part of a `FlashSale` spec the data plane runs on.
//!
//! The operator's CRD embeds these types (it adds deployment settings around
//! them), and the local run reads the same YAML, so the gateway, the consumer,
//! the operator and `flashsale local` all agree on one shape. No `kube` here.

use std::collections::HashSet;

use jiff::Timestamp;
use rust_decimal::Decimal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Everything the data plane needs to run one sale.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SaleSpec {
    /// When buying opens (RFC 3339, UTC).
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub start_time: Timestamp,
    /// When buying closes (RFC 3339, UTC); must be after `startTime`.
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub end_time: Timestamp,
    /// Redis is warmed and capacity pre-scaled this many seconds before start.
    #[serde(default = "default_warmup_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub warmup_seconds: u32,
    /// The products on sale; SKUs are unique.
    #[schemars(length(min = 1, max = 1000))]
    pub products: Vec<ProductSpec>,
    #[serde(default)]
    pub rate_limits: RateLimits,
    #[serde(default)]
    pub payment: PaymentSpec,
    /// Purchase tickets (动态令牌): when enabled, a purchase needs a ticket
    /// from `POST /v1/sales/{sale}/tickets`. Live: it can be switched and
    /// retimed mid-sale.
    #[serde(default)]
    pub purchase_ticket: PurchaseTicketSpec,
}

fn default_warmup_seconds() -> u32 {
    300
}

/// One product: its stock, price and how many units one user may buy.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProductSpec {
    /// Lower-case letters, digits, `-`, `_`; it is part of Redis keys and order ids.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9][a-z0-9_-]*$"))]
    pub sku: String,
    /// Units for sale. Raising it mid-sale adds the difference; lowering it
    /// below what is already sold is refused.
    #[schemars(range(min = 0, max = 100000000))]
    pub stock: i64,
    /// Unit price as a decimal string (never a float for money), e.g. "5999.00".
    #[serde(with = "rust_decimal::serde::str")]
    #[schemars(with = "String", regex(pattern = r"^[0-9]{1,12}(\.[0-9]{1,2})?$"))]
    pub price: Decimal,
    /// Units one user may buy of this product over the whole sale.
    #[serde(default = "default_per_user_limit")]
    #[schemars(range(min = 1, max = 1000))]
    pub per_user_limit: u32,
}

fn default_per_user_limit() -> u32 {
    1
}

/// Token buckets applied by the gateways before Redis is touched.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimits {
    /// The whole sale's request budget, split evenly across live gateway pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<RateLimit>,
    /// Per authenticated user, per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_user: Option<RateLimit>,
    /// Per client IP, per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_ip: Option<RateLimit>,
}

/// A token bucket: a sustained rate and the burst it tolerates.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    #[schemars(range(min = 1))]
    pub requests_per_second: u32,
    #[schemars(range(min = 1))]
    pub burst: u32,
}

/// How long a winner has to pay before the order is cancelled and the stock returned.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PaymentSpec {
    #[serde(default = "default_payment_timeout")]
    #[schemars(range(min = 10, max = 604800))]
    pub timeout_seconds: u32,
}

impl Default for PaymentSpec {
    fn default() -> Self {
        Self {
            timeout_seconds: default_payment_timeout(),
        }
    }
}

fn default_payment_timeout() -> u32 {
    600
}

/// Opt-in purchase tickets: short-lived, single-use, bound to buyer and sale.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PurchaseTicketSpec {
    /// Whether a purchase must carry a ticket (`Purchase-Ticket` header).
    #[serde(default)]
    pub enabled: bool,
    /// How long a ticket stays valid, counted from its issue or from the
    /// sale's start, whichever is later.
    #[serde(default = "default_ticket_ttl")]
    #[schemars(range(min = 1, max = 300))]
    pub ttl_seconds: u32,
}

impl Default for PurchaseTicketSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl_seconds: default_ticket_ttl(),
        }
    }
}

fn default_ticket_ttl() -> u32 {
    10
}

/// Longest ticket validity: a ticket is a "press now" pass, not a session.
pub const MAX_TICKET_TTL_SECONDS: u32 = 300;

/// Which sale: the `FlashSale`'s namespace and name. It prefixes every Redis
/// key and every order row.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SaleId {
    pub namespace: String,
    pub name: String,
}

impl SaleId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `namespace/name`, the sale's key in Redis hash tags and PostgreSQL rows.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl std::fmt::Display for SaleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A spec the data plane cannot run, with a machine-readable reason (it becomes
/// the operator's `Ready=False` reason) and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct SpecProblem {
    pub reason: &'static str,
    pub message: String,
}

impl SaleSpec {
    /// Checks what the CRD schema cannot (or what a cluster without the schema
    /// let through). Returns every problem, not just the first.
    pub fn validate(&self) -> Result<(), Vec<SpecProblem>> {
        let mut problems = Vec::new();
        if self.end_time <= self.start_time {
            problems.push(SpecProblem {
                reason: "EndBeforeStart",
                message: format!(
                    "endTime {} is not after startTime {}",
                    self.end_time, self.start_time
                ),
            });
        }
        if self.products.is_empty() {
            problems.push(SpecProblem {
                reason: "NoProducts",
                message: "spec.products is empty".into(),
            });
        }
        let mut seen = HashSet::new();
        for p in &self.products {
            if !seen.insert(p.sku.as_str()) {
                problems.push(SpecProblem {
                    reason: "DuplicateSku",
                    message: format!("sku {:?} appears more than once", p.sku),
                });
            }
            if !valid_sku(&p.sku) {
                problems.push(SpecProblem {
                    reason: "InvalidSku",
                    message: format!(
                        "sku {:?} must be 1-64 of a-z, 0-9, '-', '_' and start with a letter or digit",
                        p.sku
                    ),
                });
            }
            if p.stock < 0 {
                problems.push(SpecProblem {
                    reason: "NegativeStock",
                    message: format!("sku {:?} has stock {}", p.sku, p.stock),
                });
            }
            if p.price.is_sign_negative() {
                problems.push(SpecProblem {
                    reason: "NegativePrice",
                    message: format!("sku {:?} has price {}", p.sku, p.price),
                });
            }
            if p.per_user_limit == 0 {
                problems.push(SpecProblem {
                    reason: "ZeroPerUserLimit",
                    message: format!("sku {:?} has perUserLimit 0", p.sku),
                });
            }
        }
        for (name, limit) in [
            ("global", &self.rate_limits.global),
            ("perUser", &self.rate_limits.per_user),
            ("perIp", &self.rate_limits.per_ip),
        ] {
            if let Some(l) = limit
                && (l.requests_per_second == 0 || l.burst == 0)
            {
                problems.push(SpecProblem {
                    reason: "InvalidRateLimit",
                    message: format!("rateLimits.{name} needs requestsPerSecond and burst above 0"),
                });
            }
        }
        let ttl = self.purchase_ticket.ttl_seconds;
        if ttl == 0 || ttl > MAX_TICKET_TTL_SECONDS {
            problems.push(SpecProblem {
                reason: "InvalidPurchaseTicket",
                message: format!(
                    "purchaseTicket.ttlSeconds is {ttl}; it must be 1 to {MAX_TICKET_TTL_SECONDS}"
                ),
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    pub fn product(&self, sku: &str) -> Option<&ProductSpec> {
        self.products.iter().find(|p| p.sku == sku)
    }

    /// When Redis is warmed and gateways are pre-scaled.
    pub fn warmup_start(&self) -> Timestamp {
        self.start_time
            .checked_sub(jiff::SignedDuration::from_secs(i64::from(
                self.warmup_seconds,
            )))
            .unwrap_or(self.start_time)
    }

    /// Where the sale is at `now`, by the clock alone.
    pub fn phase_at(&self, now: Timestamp) -> Phase {
        if now >= self.end_time {
            Phase::Ended
        } else if now >= self.start_time {
            Phase::Active
        } else if now >= self.warmup_start() {
            Phase::Warming
        } else {
            Phase::Pending
        }
    }
}

/// The sale's phase as the clock gives it (the operator adds `Failed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    Pending,
    Warming,
    Active,
    Ended,
}

/// SKUs are embedded in Redis keys and order ids, so they are kept plain.
pub fn valid_sku(sku: &str) -> bool {
    let b = sku.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

/// A `FlashSale` document as YAML holds it (the operator's resource, the local
/// run's input and the gateway's ConfigMap): only what the data plane reads.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct SaleDocument {
    pub metadata: DocumentMetadata,
    pub spec: SaleSpec,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct DocumentMetadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a FlashSale document: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("{path}: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        path: String,
        problems: Vec<SpecProblem>,
    },
}

impl SaleDocument {
    pub fn id(&self) -> SaleId {
        SaleId::new(&self.metadata.namespace, &self.metadata.name)
    }

    /// Reads and validates a document from a YAML file.
    pub fn load(path: &std::path::Path) -> Result<Self, SpecError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, SpecError> {
        let doc: SaleDocument = serde_yaml::from_str(text).map_err(|source| SpecError::Parse {
            path: origin.to_string(),
            source,
        })?;
        doc.spec.validate().map_err(|problems| SpecError::Invalid {
            path: origin.to_string(),
            problems,
        })?;
        Ok(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SaleSpec {
        let doc = SaleDocument::parse(
            include_str!("../../examples/singles-day.yaml"),
            "singles-day.yaml",
        );
        match doc {
            Ok(d) => d.spec,
            Err(e) => panic!("example must parse: {e}"),
        }
    }

    #[test]
    fn example_parses_with_defaults() {
        let s = spec();
        assert_eq!(s.products.len(), 3);
        assert_eq!(s.products[0].price.to_string(), "5999.00");
        assert_eq!(s.payment.timeout_seconds, 600);
    }

    #[test]
    fn reports_every_problem() {
        let mut s = spec();
        s.end_time = s.start_time;
        s.products[1].sku = s.products[0].sku.clone();
        s.products[2].stock = -1;
        let problems = s.validate().err().unwrap_or_default();
        let reasons: Vec<_> = problems.iter().map(|p| p.reason).collect();
        assert_eq!(reasons, ["EndBeforeStart", "DuplicateSku", "NegativeStock"]);
    }

    #[test]
    fn purchase_ticket_defaults_off_and_bounds_its_ttl() {
        let mut s = spec();
        assert_eq!(s.purchase_ticket, PurchaseTicketSpec::default());
        assert!(!s.purchase_ticket.enabled);
        assert_eq!(s.purchase_ticket.ttl_seconds, 10);
        for bad in [0, MAX_TICKET_TTL_SECONDS + 1] {
            s.purchase_ticket.ttl_seconds = bad;
            let reasons: Vec<_> = s
                .validate()
                .err()
                .unwrap_or_default()
                .iter()
                .map(|p| p.reason)
                .collect();
            assert_eq!(reasons, ["InvalidPurchaseTicket"], "ttlSeconds {bad}");
        }
        s.purchase_ticket.ttl_seconds = MAX_TICKET_TTL_SECONDS;
        assert!(s.validate().is_ok());
    }

    #[test]
    fn phases_follow_the_clock() {
        let s = spec();
        let at = |secs: i64| {
            s.start_time
                .checked_add(jiff::SignedDuration::from_secs(secs))
        };
        let phase = |secs| at(secs).map(|t| s.phase_at(t)).ok();
        assert_eq!(phase(-301), Some(Phase::Pending));
        assert_eq!(phase(-300), Some(Phase::Warming));
        assert_eq!(phase(0), Some(Phase::Active));
        assert_eq!(phase(1800), Some(Phase::Ended));
    }

    #[test]
    fn sku_charset() {
        assert!(valid_sku("phone-17"));
        assert!(!valid_sku("Phone"));
        assert!(!valid_sku("a.b"));
        assert!(!valid_sku(""));
    }
}
