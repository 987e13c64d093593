//! Bearer tokens: Supabase-compatible HS256 JWTs carrying `role` and `exp`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Shortest accepted JWT secret, in bytes (HS256 wants at least 256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// The database role a request runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// No token: may introspect, nothing else.
    Anon,
    /// A signed-in user: may read.
    Authenticated,
    /// An ETL worker: may read and write.
    ServiceRole,
}

impl Role {
    /// The PostgreSQL role name (and the token's `role` claim).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anon => "anon",
            Self::Authenticated => "authenticated",
            Self::ServiceRole => "service_role",
        }
    }

    /// Parses a role name; only the three roles of the contract exist.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "anon" => Some(Self::Anon),
            "authenticated" => Some(Self::Authenticated),
            "service_role" => Some(Self::ServiceRole),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is calling: the role, and the verified claims that go to the
/// database as `request.jwt.claims`.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The role the request runs as.
    pub role: Role,
    /// The token's claims as JSON text (`{"role":"anon"}` without a
    /// token), serialised once and shared by every database transaction
    /// and subscription of the caller.
    pub claims: Arc<str>,
    /// When the token expires, in seconds since the epoch; `None` for anon.
    pub expires_at: Option<u64>,
}

impl Caller {
    /// The caller without a token.
    pub fn anon() -> Self {
        Self::for_role(Role::Anon)
    }

    /// The server itself acting as `role` (e.g. the feed reading the log).
    pub fn for_role(role: Role) -> Self {
        Self {
            role,
            claims: serde_json::json!({ "role": role.as_str() })
                .to_string()
                .into(),
            expires_at: None,
        }
    }
}

/// Verifies tokens and mints them, with one secret. Cheap to clone: every
/// connection holds one.
#[derive(Clone)]
pub struct TokenKeys(Arc<Keys>);

struct Keys {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    /// Keys for `secret`, which must be at least [`MIN_SECRET_BYTES`] long.
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the JWT secret is {} bytes long; use at least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)",
                secret.len()
            ));
        }
        // Only HS256, no leeway on expiry, and no audience requirement:
        // Supabase user tokens say `aud: authenticated`, service tokens
        // carry none, and the role claim is what grants access here.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Ok(Self(Arc::new(Keys {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
        })))
    }

    /// The caller for an `Authorization` header value (or its absence).
    pub fn caller(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let Some(header) = authorization else {
            return Ok(Caller::anon());
        };
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                ApiError::InvalidToken("the Authorization header must be `Bearer <token>`".into())
            })?;
        self.verify(token)
    }

    /// Verifies `token` and returns its caller.
    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let keys = &*self.0;
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &keys.decoding, &keys.validation)
                .map_err(|error| ApiError::InvalidToken(describe(&error)))?;
        let claims = data.claims;
        let (Some(role), Some(exp)) = (
            claims.get("role").and_then(Value::as_str),
            claims.get("exp").and_then(Value::as_u64),
        ) else {
            return Err(ApiError::InvalidToken(
                "the token must carry `role` and `exp` claims".into(),
            ));
        };
        let role = Role::parse(role).ok_or_else(|| {
            ApiError::InvalidToken(format!(
                "role \"{role}\" is not accepted; use anon, authenticated or service_role"
            ))
        })?;
        Ok(Caller {
            role,
            claims: Value::Object(claims).to_string().into(),
            expires_at: Some(exp),
        })
    }

    /// Mints a token for `role`, valid for `ttl`, with an optional subject.
    pub fn mint(&self, role: Role, ttl: Duration, subject: Option<&str>) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|error| error.to_string())?;
        let claims = MintedClaims {
            role: role.as_str(),
            iat: now.as_secs(),
            exp: (now + ttl).as_secs(),
            sub: subject,
            aud: (role == Role::Authenticated).then_some("authenticated"),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.0.encoding)
            .map_err(|error| error.to_string())
    }
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    role: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

fn describe(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::InvalidSignature => "the token's signature is not valid".into(),
        ErrorKind::InvalidAlgorithm => "the token must be signed with HS256".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token must carry a `{claim}` claim"),
        ErrorKind::ImmatureSignature => "the token is not valid yet".into(),
        _ => "the token is malformed".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn short_secrets_are_refused() {
        assert!(TokenKeys::new(b"short").is_err());
    }

    #[test]
    fn minted_tokens_verify_with_their_role_and_subject() {
        let keys = TokenKeys::new(SECRET).unwrap();
        let token = keys
            .mint(Role::Authenticated, Duration::from_secs(60), Some("user-1"))
            .unwrap();
        let caller = keys.verify(&token).unwrap();
        assert_eq!(caller.role, Role::Authenticated);
        let claims: Value = serde_json::from_str(&caller.claims).unwrap();
        assert_eq!(claims["sub"], "user-1");
        assert_eq!(claims["aud"], "authenticated");
    }

    #[test]
    fn missing_header_is_anon_and_a_non_bearer_header_is_refused() {
        let keys = TokenKeys::new(SECRET).unwrap();
        assert_eq!(keys.caller(None).unwrap().role, Role::Anon);
        assert!(matches!(
            keys.caller(Some("Basic abc")),
            Err(ApiError::InvalidToken(_))
        ));
        assert!(matches!(
            keys.caller(Some("Bearer ")),
            Err(ApiError::InvalidToken(_))
        ));
    }
}
