//! Purchase tickets (动态令牌): a short-lived pass a buyer fetches from the
//! sale page shortly before the start and hands to the purchase, so a script
//! that skips the page cannot buy.
//!
//! A ticket is an HS256 JWT carrying buyer, sale, expiry and a unique id.
//! Signature, buyer, sale and expiry are checked by any gateway without
//! Redis; single use is enforced by the purchase script (see `keys::ProductKeys::ticket`).
//!
//! The signing key is derived from the login token secret with a domain
//! separation label (HMAC-SHA256(secret, label)): every gateway of a sale
//! already holds that secret, so no new Secret has to be provisioned and
//! rotated in step, while a login token can never pass as a ticket nor a
//! ticket as a login token (they verify under different keys).

use hmac::{Hmac, Mac};
use jiff::{SignedDuration, Timestamp};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::jwt::{Hs256, JwtError};
use crate::spec::{SaleId, SaleSpec};

/// Domain separation for the ticket key (versioned: a new label retires every ticket).
const KEY_LABEL: &[u8] = b"flashsale purchase-ticket v1";

/// Tickets are issued from this long before the sale's start.
pub const OPENS_BEFORE_START: SignedDuration = SignedDuration::from_secs(60);

/// The longest `Purchase-Ticket` header taken (a ticket is about 250 bytes).
pub const MAX_TICKET_BYTES: usize = 1024;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The buyer (the login token's `sub`).
    sub: String,
    /// The sale, `namespace/name`.
    sale: String,
    /// Unique id; the purchase script records it to refuse a second use.
    jti: String,
    /// Expiry, Unix milliseconds (the gateway's and Redis' clocks both check it).
    #[serde(rename = "expMs")]
    exp_ms: i64,
}

/// Why a ticket was refused (all answered `403 ticket_invalid`, with the reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("the ticket is malformed")]
    Malformed,
    #[error("the ticket's signature does not verify")]
    BadSignature,
    #[error("the ticket has expired")]
    Expired,
    #[error("the ticket was issued to another buyer")]
    OtherBuyer,
    #[error("the ticket was issued for another sale")]
    OtherSale,
    #[error("the ticket was already used")]
    Used,
}

impl TicketError {
    /// The `reason` field of the 403 body.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::OtherBuyer => "other_buyer",
            Self::OtherSale => "other_sale",
            Self::Used => "used",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot sign a purchase ticket: {0}")]
pub struct IssueError(#[from] jsonwebtoken::errors::Error);

/// A ticket as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub token: String,
    pub id: String,
    pub expires_at_ms: i64,
}

/// A ticket whose signature, buyer, sale and expiry checked out; single use
/// is still Redis' to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedTicket {
    pub id: String,
    pub expires_at_ms: i64,
}

/// Issues and verifies one sale's tickets; cheap to share.
#[derive(Clone)]
pub struct TicketSigner {
    sale: String,
    encoding: EncodingKey,
    decoding: Hs256,
}

impl TicketSigner {
    pub fn new(token_secret: &[u8], sale: &SaleId) -> Result<Self, KeyError> {
        let key = derive_key(token_secret)?;
        Ok(Self {
            sale: sale.key(),
            encoding: EncodingKey::from_secret(&key),
            decoding: Hs256::new(&key).map_err(|e| KeyError(e.0))?,
        })
    }

    /// A new ticket for `user`, valid until `expires_at_ms`.
    pub fn issue(&self, user: &str, expires_at_ms: i64) -> Result<Ticket, IssueError> {
        let id = ulid::Ulid::new().to_string();
        let claims = Claims {
            sub: user.to_string(),
            sale: self.sale.clone(),
            jti: id.clone(),
            exp_ms: expires_at_ms,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok(Ticket {
            token,
            id,
            expires_at_ms,
        })
    }

    /// Checks signature, sale, buyer and expiry (by `now_ms`, this gateway's clock).
    pub fn verify(
        &self,
        ticket: &str,
        user: &str,
        now_ms: i64,
    ) -> Result<VerifiedTicket, TicketError> {
        // Expiry is the `expMs` claim, checked below in milliseconds.
        let claims: Claims = self.decoding.verify(ticket).map_err(|e| match e {
            JwtError::BadSignature => TicketError::BadSignature,
            JwtError::Malformed => TicketError::Malformed,
        })?;
        if claims.sale != self.sale {
            return Err(TicketError::OtherSale);
        }
        if claims.sub != user {
            return Err(TicketError::OtherBuyer);
        }
        if now_ms >= claims.exp_ms {
            return Err(TicketError::Expired);
        }
        // Our own ULID (the signature says so); checked anyway, it names a Redis key.
        if ulid::Ulid::from_string(&claims.jti).is_err() {
            return Err(TicketError::Malformed);
        }
        Ok(VerifiedTicket {
            id: claims.jti,
            expires_at_ms: claims.exp_ms,
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot derive the purchase ticket key from the token secret: {0}")]
pub struct KeyError(hmac::digest::InvalidLength);

/// HMAC-SHA256 of the label under the token secret: a key of its own for tickets.
fn derive_key(token_secret: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token_secret).map_err(KeyError)?;
    mac.update(KEY_LABEL);
    Ok(mac.finalize().into_bytes().to_vec())
}

/// Whether a ticket may be issued at `now`, and until when it is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The sale does not use tickets.
    NotEnabled,
    /// Too early; tickets are issued from `opens_at`.
    NotOpen { opens_at: Timestamp },
    /// The sale has ended.
    Ended { ended_at: Timestamp },
    /// Issue one, valid until `expires_at_ms`: `ttlSeconds` after the later of
    /// now and the start, so a page that fetched its ticket during the last
    /// minute of the countdown can still buy at the start.
    Open { expires_at_ms: i64 },
}

pub fn window(spec: &SaleSpec, now: Timestamp) -> Window {
    let settings = spec.purchase_ticket;
    if !settings.enabled {
        return Window::NotEnabled;
    }
    let opens_at = spec
        .start_time
        .checked_sub(OPENS_BEFORE_START)
        .unwrap_or(spec.start_time);
    if now >= spec.end_time {
        return Window::Ended {
            ended_at: spec.end_time,
        };
    }
    if now < opens_at {
        return Window::NotOpen { opens_at };
    }
    let from = now.max(spec.start_time);
    Window::Open {
        expires_at_ms: from.as_millisecond() + i64::from(settings.ttl_seconds) * 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(secret: &[u8], sale: &str) -> TicketSigner {
        match TicketSigner::new(secret, &SaleId::new("shop", sale)) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn verifies_what_it_issued_and_refuses_the_rest() -> Result<(), IssueError> {
        let s = signer(b"s3cret", "sd");
        let t = s.issue("alice", 2_000)?;
        assert_eq!(
            s.verify(&t.token, "alice", 1_999),
            Ok(VerifiedTicket {
                id: t.id.clone(),
                expires_at_ms: 2_000
            })
        );
        assert_eq!(
            s.verify(&t.token, "alice", 2_000),
            Err(TicketError::Expired)
        );
        assert_eq!(
            s.verify(&t.token, "bob", 1_000),
            Err(TicketError::OtherBuyer)
        );
        let other_sale = signer(b"s3cret", "other");
        assert_eq!(
            other_sale.verify(&t.token, "alice", 1_000),
            Err(TicketError::OtherSale)
        );
        let other_secret = signer(b"other", "sd");
        assert_eq!(
            other_secret.verify(&t.token, "alice", 1_000),
            Err(TicketError::BadSignature)
        );
        assert_eq!(
            s.verify("nonsense", "alice", 1_000),
            Err(TicketError::Malformed)
        );
        Ok(())
    }

    #[test]
    fn a_login_token_is_not_a_ticket() -> Result<(), crate::token::SignError> {
        let login = crate::token::issue(b"s3cret", "alice", 60)?;
        assert_eq!(
            signer(b"s3cret", "sd").verify(&login, "alice", 0),
            Err(TicketError::BadSignature)
        );
        Ok(())
    }

    #[test]
    fn window_opens_a_minute_before_start_and_counts_ttl_from_start() {
        let doc = crate::spec::SaleDocument::parse(
            include_str!("../../examples/singles-day.yaml"),
            "singles-day.yaml",
        );
        let Ok(mut doc) = doc else {
            panic!("example must parse")
        };
        let start = doc.spec.start_time;
        let at = |secs: i64| start + SignedDuration::from_secs(secs);
        assert_eq!(window(&doc.spec, at(-30)), Window::NotEnabled);
        doc.spec.purchase_ticket.enabled = true;
        let spec = &doc.spec;
        assert_eq!(window(spec, at(-61)), Window::NotOpen { opens_at: at(-60) });
        let valid_from_start = Window::Open {
            expires_at_ms: at(10).as_millisecond(),
        };
        assert_eq!(window(spec, at(-60)), valid_from_start);
        assert_eq!(window(spec, at(0)), valid_from_start);
        assert_eq!(
            window(spec, at(100)),
            Window::Open {
                expires_at_ms: at(110).as_millisecond()
            }
        );
        assert_eq!(
            window(spec, spec.end_time),
            Window::Ended {
                ended_at: spec.end_time
            }
        );
    }
}
