//! User tokens: HS256 JWTs issued by the shop's login and checked by every
//! gateway with the shared secret (from a Kubernetes Secret). The gateway only
//! needs the user id (`sub`) and the expiry (`exp`).

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::jwt::{Hs256, JwtError, KeyError};

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    /// A token for a named audience is for that audience: the gateway
    /// names none, so such a token is refused (RFC 7519 §4.1.3).
    #[serde(default, skip_serializing)]
    aud: Option<serde::de::IgnoredAny>,
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
    key: Hs256,
}

impl TokenVerifier {
    pub fn new(secret: &[u8]) -> Result<Self, KeyError> {
        Ok(Self {
            key: Hs256::new(secret)?,
        })
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

    /// `sub` and `exp` are required; `exp` is honoured exactly: a token is
    /// accepted while the gateway's clock, in whole Unix seconds, is at or
    /// before it (the shop's login sets it; a leeway would silently extend
    /// every token).
    pub fn user(&self, token: &str) -> Result<String, TokenError> {
        let claims: Claims = self.key.verify(token).map_err(|e| match e {
            JwtError::BadSignature => TokenError::BadSignature,
            JwtError::Malformed => TokenError::Malformed,
        })?;
        if claims.aud.is_some() {
            return Err(TokenError::Malformed);
        }
        if claims.exp < jsonwebtoken::get_current_timestamp() {
            return Err(TokenError::Expired);
        }
        if valid_user_id(&claims.sub) {
            Ok(claims.sub)
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
        aud: None,
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

    type Res = Result<(), Box<dyn std::error::Error>>;

    fn signed(claims: &serde_json::Value) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
    }

    #[test]
    fn round_trip_and_failures() -> Res {
        let v = TokenVerifier::new(b"s3cret")?;
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
        let expired = signed(&serde_json::json!({"sub": "alice", "exp": 1_000}))?;
        assert_eq!(v.user(&expired), Err(TokenError::Expired));
        // No leeway: one second past `exp` is expired.
        let now = jsonwebtoken::get_current_timestamp();
        let at = |exp: u64| signed(&serde_json::json!({"sub": "alice", "exp": exp}));
        assert_eq!(v.user(&at(now - 1)?), Err(TokenError::Expired));
        assert_eq!(v.user(&at(now + 2)?), Ok("alice".into()));
        let bad = issue(b"s3cret", "a,b", 60)?;
        assert_eq!(v.user(&bad), Err(TokenError::BadSubject));
        Ok(())
    }

    /// The claims rules `jsonwebtoken` applied before this verifier took
    /// over (`sub` and `exp` required, `exp` a whole number, a named
    /// audience refused, other claims ignored) still hold, token by token.
    #[test]
    fn claims_are_judged_as_jsonwebtoken_judged_them() -> Res {
        use jsonwebtoken::{DecodingKey, Validation};
        // What the gateway decoded tokens into then.
        #[derive(Debug, Deserialize)]
        struct OldClaims {
            #[allow(dead_code)]
            sub: String,
            #[allow(dead_code)]
            exp: u64,
        }
        let v = TokenVerifier::new(b"s3cret")?;
        let mut old = Validation::new(Algorithm::HS256);
        old.leeway = 0;
        old.set_required_spec_claims(&["exp", "sub"]);
        let exp = jsonwebtoken::get_current_timestamp() + 60;
        let cases = [
            serde_json::json!({"sub": "alice", "exp": exp}),
            serde_json::json!({"sub": "alice", "exp": exp, "iss": "shop", "iat": 1, "roles": ["a"]}),
            serde_json::json!({"sub": "alice"}),
            serde_json::json!({"exp": exp}),
            serde_json::json!({"sub": 42, "exp": exp}),
            serde_json::json!({"sub": "alice", "exp": "soon"}),
            serde_json::json!({"sub": "alice", "exp": 1.5}),
            serde_json::json!({"sub": "alice", "exp": -1}),
            serde_json::json!({"sub": "alice", "exp": exp, "aud": "shop"}),
            serde_json::json!({"sub": "alice", "exp": exp, "aud": ["shop"]}),
            serde_json::json!({"sub": "alice", "exp": 1_000}),
        ];
        for claims in cases {
            let t = signed(&claims)?;
            let before =
                jsonwebtoken::decode::<OldClaims>(&t, &DecodingKey::from_secret(b"s3cret"), &old);
            let now = v.user(&t);
            assert_eq!(
                before.is_ok(),
                now.is_ok(),
                "{claims}: {before:?} / {now:?}"
            );
            if let Err(e) = &before {
                let expired = matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature);
                assert_eq!(expired, now == Err(TokenError::Expired), "{claims}");
            }
        }
        Ok(())
    }
}
