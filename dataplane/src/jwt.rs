//! Verifying HS256 JSON Web Tokens on the request path: login tokens and
//! purchase tickets.
//!
//! Written here rather than left to `jsonwebtoken` (which still issues them):
//! per token that crate parses the header twice, keys a new HMAC and boxes a
//! verifier, and parses the claims twice (into the caller's type and into its
//! own for validation). Every purchase verifies a token, so this does each step
//! once, on an HMAC keyed once per secret. Only the compact framing
//! (RFC 7515 §7.1) is ours; base64url, HMAC-SHA256 and its constant-time
//! comparison, and the JSON are the `base64`, `hmac`, `sha2` and `serde_json`
//! crates'. The claims each kind of token needs are its caller's to check.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;

/// Why a token was refused before its claims were looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url segments, a header that is not HS256, or claims
    /// that are not the expected JSON.
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature does not verify")]
    BadSignature,
}

#[derive(Debug, thiserror::Error)]
#[error("unusable HMAC key: {0}")]
pub struct KeyError(#[from] pub hmac::digest::InvalidLength);

/// Checks HS256 signatures under one secret; cheap to clone.
#[derive(Clone)]
pub struct Hs256 {
    /// Keyed once: each verification clones this state instead of hashing
    /// the key's inner and outer pads again.
    mac: Hmac<Sha256>,
}

/// The header fields that matter: the algorithm, and `crit` (extensions
/// this verifier would have to understand: it understands none).
#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: std::borrow::Cow<'a, str>,
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

/// Segments decode into a buffer on the stack when they fit (a login token's
/// header and claims are well under this).
const STACK_SEGMENT: usize = 256;

impl Hs256 {
    pub fn new(secret: &[u8]) -> Result<Self, KeyError> {
        Ok(Self {
            mac: <Hmac<Sha256> as Mac>::new_from_slice(secret)?,
        })
    }

    /// The claims of `token` once its header says HS256 and its signature
    /// verifies; the claims are parsed only after the signature checked out.
    pub fn verify<T: DeserializeOwned>(&self, token: &str) -> Result<T, JwtError> {
        let (signed, signature) = token.rsplit_once('.').ok_or(JwtError::Malformed)?;
        let (header, claims) = signed.split_once('.').ok_or(JwtError::Malformed)?;
        with_decoded(header, |bytes| {
            let h: Header = serde_json::from_slice(bytes).map_err(|_| JwtError::Malformed)?;
            if h.alg != "HS256" || h.crit.is_some() {
                return Err(JwtError::Malformed);
            }
            Ok(())
        })?;
        let mut sig = [0u8; 32];
        let len = match URL_SAFE_NO_PAD.decode_slice(signature, &mut sig) {
            Ok(n) => n,
            // Decodes, but to more than a SHA-256 MAC: it cannot match.
            Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
                return Err(JwtError::BadSignature);
            }
            Err(base64::DecodeSliceError::DecodeError(_)) => return Err(JwtError::Malformed),
        };
        let mut mac = self.mac.clone();
        mac.update(signed.as_bytes());
        mac.verify_slice(&sig[..len])
            .map_err(|_| JwtError::BadSignature)?;
        with_decoded(claims, |bytes| {
            serde_json::from_slice(bytes).map_err(|_| JwtError::Malformed)
        })
    }
}

/// Runs `f` on the base64url-decoded `segment`.
fn with_decoded<R>(
    segment: &str,
    f: impl FnOnce(&[u8]) -> Result<R, JwtError>,
) -> Result<R, JwtError> {
    let mut stack = [0u8; STACK_SEGMENT];
    match URL_SAFE_NO_PAD.decode_slice(segment, &mut stack) {
        Ok(n) => f(&stack[..n]),
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
            let heap = URL_SAFE_NO_PAD
                .decode(segment)
                .map_err(|_| JwtError::Malformed)?;
            f(&heap)
        }
        Err(base64::DecodeSliceError::DecodeError(_)) => Err(JwtError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{Algorithm, EncodingKey, Header as JwtHeader};
    use serde::Serialize;

    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct C {
        sub: String,
    }

    fn sign(alg: Algorithm, secret: &[u8], claims: &impl Serialize) -> String {
        jsonwebtoken::encode(
            &JwtHeader::new(alg),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap_or_default()
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    /// A token with this header and claims, signed under `secret` as given.
    fn raw(header: &str, claims: &str, secret: &[u8]) -> Result<String, KeyError> {
        let signed = format!("{}.{}", b64(header), b64(claims));
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)?;
        mac.update(signed.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Ok(format!("{signed}.{sig}"))
    }

    #[test]
    fn what_jsonwebtoken_signs_verifies() -> Result<(), KeyError> {
        let v = Hs256::new(b"s3cret")?;
        let t = sign(
            Algorithm::HS256,
            b"s3cret",
            &C {
                sub: "alice".into(),
            },
        );
        assert_eq!(
            v.verify::<C>(&t),
            Ok(C {
                sub: "alice".into()
            })
        );
        // Claims longer than the stack buffer take the heap.
        let long = "x".repeat(STACK_SEGMENT * 2);
        let t = sign(Algorithm::HS256, b"s3cret", &C { sub: long.clone() });
        assert_eq!(v.verify::<C>(&t), Ok(C { sub: long }));
        Ok(())
    }

    #[test]
    fn forged_tampered_and_malformed_tokens_are_refused() -> Result<(), KeyError> {
        let v = Hs256::new(b"s3cret")?;
        let c = C {
            sub: "alice".into(),
        };
        let bad = |t: &str| v.verify::<C>(t);
        // Another secret; another algorithm of the family; claims swapped
        // under a valid signature; a signature cut or lengthened.
        assert_eq!(
            bad(&sign(Algorithm::HS256, b"other", &c)),
            Err(JwtError::BadSignature)
        );
        assert_eq!(
            bad(&sign(Algorithm::HS384, b"s3cret", &c)),
            Err(JwtError::Malformed)
        );
        let good = sign(Algorithm::HS256, b"s3cret", &c);
        let mut parts: Vec<&str> = good.split('.').collect();
        let mallory = b64(r#"{"sub":"mallory"}"#);
        parts[1] = &mallory;
        assert_eq!(bad(&parts.join(".")), Err(JwtError::BadSignature));
        assert_eq!(bad(&good[..good.len() - 3]), Err(JwtError::BadSignature));
        assert_eq!(bad(&format!("{good}AAAA")), Err(JwtError::BadSignature));
        // `alg: none`, unknown critical extensions, a header that is not JSON.
        let none = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(r#"{"sub":"a"}"#));
        assert_eq!(bad(&none), Err(JwtError::Malformed));
        let crit = raw(
            r#"{"alg":"HS256","crit":["exp"]}"#,
            r#"{"sub":"a"}"#,
            b"s3cret",
        )?;
        assert_eq!(bad(&crit), Err(JwtError::Malformed));
        let junk = raw("nope", r#"{"sub":"a"}"#, b"s3cret")?;
        assert_eq!(bad(&junk), Err(JwtError::Malformed));
        // Signed, but the claims are not the caller's shape.
        let shape = raw(r#"{"alg":"HS256"}"#, r#"{"sub":7}"#, b"s3cret")?;
        assert_eq!(bad(&shape), Err(JwtError::Malformed));
        for t in ["", "a", "a.b", "a.b.c.d", "!!.??.**", ".."] {
            assert!(bad(t).is_err(), "{t:?}");
        }
        Ok(())
    }
}
