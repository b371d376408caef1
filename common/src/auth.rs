//! JWT (HS256) tokens: the claim `uid` names the user, `exp` is enforced.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token is invalid, expired or badly signed")]
    InvalidToken,
    #[error("token has no usable uid claim")]
    MissingUid,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default)]
    uid: Option<serde_json::Value>,
    exp: u64,
}

/// Signs a token for `uid` valid for `ttl_secs`.
pub fn issue_token(secret: &str, uid: u64, ttl_secs: u64) -> String {
    let claims = Claims { uid: Some(uid.into()), exp: crate::ids::now_ms() / 1000 + ttl_secs };
    // HS256 signing with an in-memory key cannot fail.
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap_or_default()
}

/// Checks signature and expiry, and returns the user id.
pub fn verify_token(secret: &str, token: &str) -> Result<u64, AuthError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    let data = decode::<Claims>(token, &DecodingKey::from_secret(secret.as_bytes()), &validation)
        .map_err(|_| AuthError::InvalidToken)?;
    let uid = match data.claims.uid {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    uid.filter(|&u| u > 0).ok_or(AuthError::MissingUid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let t = issue_token("s3cret", 42, 60);
        assert_eq!(verify_token("s3cret", &t), Ok(42));
        assert_eq!(verify_token("other", &t), Err(AuthError::InvalidToken));
        assert_eq!(verify_token("s3cret", "garbage"), Err(AuthError::InvalidToken));
        let expired = encode(
            &Header::new(Algorithm::HS256),
            &Claims { uid: Some(42.into()), exp: crate::ids::now_ms() / 1000 - 10 },
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(verify_token("s3cret", &expired), Err(AuthError::InvalidToken));
        let no_uid = encode(
            &Header::new(Algorithm::HS256),
            &Claims { uid: None, exp: crate::ids::now_ms() / 1000 + 60 },
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(verify_token("s3cret", &no_uid), Err(AuthError::MissingUid));
    }

    #[test]
    fn alg_none_is_refused() {
        // header {"alg":"none","typ":"JWT"}, payload {"uid":42,"exp":9999999999}, empty signature.
        let t = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJ1aWQiOjQyLCJleHAiOjk5OTk5OTk5OTl9.";
        assert_eq!(verify_token("s3cret", t), Err(AuthError::InvalidToken));
    }
}
