//! User tokens: HS256 JWTs issued by the shop's login and checked by every
//! gateway with the shared secret (from a Kubernetes Secret). The gateway only
//! needs the user id (`sub`) and the expiry (`exp`).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing Authorization: Bearer token")]
    Missing,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token's subject is not a usable user id")]
    BadSubject,
}

/// Checks bearer tokens; cheap to clone into every request.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` is honoured exactly: a token is accepted while the gateway's
        // clock, in whole Unix seconds, is at or before `exp`. The shop's
        // login sets `exp`; a leeway would silently extend every token.
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// The user id of a valid `Authorization` header value.
    pub fn user_from_header(&self, header: Option<&str>) -> Result<String, TokenError> {
        let token = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(TokenError::Missing)?;
        self.user(token)
    }

    pub fn user(&self, token: &str) -> Result<String, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                _ => TokenError::Malformed,
            },
        )?;
        let sub = data.claims.sub;
        if valid_user_id(&sub) {
            Ok(sub)
        } else {
            Err(TokenError::BadSubject)
        }
    }
}

/// User ids become Redis hash fields and database values: 1-128 visible ASCII
/// characters, no commas (the per-user order list is comma-separated).
pub fn valid_user_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

#[derive(Debug, thiserror::Error)]
#[error("cannot sign a token: {0}")]
pub struct SignError(#[from] jsonwebtoken::errors::Error);

/// Issues a token as the shop's login would (for the crowd generator, tests and
/// the README tour).
pub fn issue(secret: &[u8], user: &str, ttl_seconds: u64) -> Result<String, SignError> {
    let claims = Claims {
        sub: user.to_string(),
        exp: jsonwebtoken::get_current_timestamp() + ttl_seconds,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_failures() -> Result<(), SignError> {
        let v = TokenVerifier::new(b"s3cret");
        let t = issue(b"s3cret", "alice", 60)?;
        assert_eq!(
            v.user_from_header(Some(&format!("Bearer {t}"))),
            Ok("alice".into())
        );
        assert_eq!(v.user_from_header(None), Err(TokenError::Missing));
        assert_eq!(
            v.user_from_header(Some("Basic x")),
            Err(TokenError::Missing)
        );
        assert_eq!(v.user("nonsense"), Err(TokenError::Malformed));
        let forged = issue(b"other", "alice", 60)?;
        assert_eq!(v.user(&forged), Err(TokenError::BadSignature));
        let claims = Claims {
            sub: "alice".into(),
            exp: 1_000,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )?;
        assert_eq!(v.user(&expired), Err(TokenError::Expired));
        // No leeway: one second past `exp` is expired.
        let now = jsonwebtoken::get_current_timestamp();
        let at = |exp: u64| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &Claims {
                    sub: "alice".into(),
                    exp,
                },
                &EncodingKey::from_secret(b"s3cret"),
            )
        };
        assert_eq!(v.user(&at(now - 1)?), Err(TokenError::Expired));
        assert_eq!(v.user(&at(now + 2)?), Ok("alice".into()));
        let bad = issue(b"s3cret", "a,b", 60)?;
        assert_eq!(v.user(&bad), Err(TokenError::BadSubject));
        Ok(())
    }
}
