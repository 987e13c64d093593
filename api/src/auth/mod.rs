//! Bearer tokens as Supabase issues them: HS256 with the project's secret,
//! or ES256, RS256 and EdDSA with keys from a JSON Web Key Set. The key
//! decides the algorithm; the claims carry `exp` and a role.

mod jwks;
mod signing;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

pub use jwks::{DEFAULT_JWKS_REFRESH, Jwks, JwksSource, UNKNOWN_KID_INTERVAL, VerifyingKey};
pub use signing::SigningKey;

use crate::db::Identity;
pub use crate::db::Role;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Shortest accepted JWT secret, in bytes (HS256 wants at least 256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

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
    /// The token's `sub`, if it has one (whom a rate limit counts).
    pub subject: Option<Arc<str>>,
}

impl Caller {
    /// Time left until the token expires (zero if past); `None` for anon.
    pub fn expires_in(&self) -> Option<std::time::Duration> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.expires_at
            .map(|exp| std::time::Duration::from_secs(exp).saturating_sub(now))
    }

    /// The caller without a token.
    pub fn anon() -> Self {
        Self::for_role(Role::Anon)
    }

    /// Whether this caller may read (queries and subscriptions): the
    /// access rules, written once for every transport.
    pub fn may_read(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Anon => Err(ApiError::Unauthenticated),
            Role::Authenticated | Role::ServiceRole => Ok(()),
        }
    }

    /// Whether this caller may write (mutations).
    pub fn may_write(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Anon => Err(ApiError::Unauthenticated),
            Role::Authenticated => Err(ApiError::Forbidden {
                role: "authenticated",
                action: "run mutations; they need a service_role token",
            }),
            Role::ServiceRole => Ok(()),
        }
    }

    /// Whether this caller may manage webhooks and read their deliveries
    /// (their URLs and logs are operators' business).
    pub fn may_manage_webhooks(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Anon => Err(ApiError::Unauthenticated),
            Role::Authenticated => Err(ApiError::Forbidden {
                role: "authenticated",
                action: "manage or read webhooks; they need a service_role token",
            }),
            Role::ServiceRole => Ok(()),
        }
    }

    /// A caller with no token but a role (the server's own work, tests).
    pub fn for_role(role: Role) -> Self {
        Self {
            role,
            claims: Identity::of_role(role).claims,
            expires_at: None,
            subject: None,
        }
    }

    /// Whom this caller's database work runs as.
    pub fn identity(&self) -> Identity {
        Identity {
            role: self.role,
            claims: self.claims.clone(),
        }
    }
}

/// What a token's claims must say besides `exp`: the issuer and audience,
/// when configured, and where the role is.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    /// `iss` must equal this, when set.
    pub issuer: Option<String>,
    /// `aud` must contain one of these, when not empty.
    pub audience: Vec<String>,
    /// Dotted path to the role claim (`role`, `app_metadata.role`).
    pub role_claim: Vec<String>,
}

impl Default for ClaimRules {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: Vec::new(),
            role_claim: vec!["role".into()],
        }
    }
}

impl ClaimRules {
    /// Rules from the settings' text forms: a comma-separated audience and
    /// a dotted role path.
    pub fn parse(
        issuer: Option<&str>,
        audience: Option<&str>,
        role_claim: &str,
    ) -> Result<Self, String> {
        let role_claim: Vec<String> = role_claim.split('.').map(str::to_owned).collect();
        if role_claim.iter().any(|part| part.trim().is_empty()) {
            return Err(format!(
                "JWT_ROLE_CLAIM: \"{}\" is not a dotted path such as role or app_metadata.role",
                role_claim.join(".")
            ));
        }
        let audience = audience
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|audience| !audience.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Self {
            issuer: issuer
                .map(str::trim)
                .filter(|issuer| !issuer.is_empty())
                .map(str::to_owned),
            audience,
            role_claim,
        })
    }

    /// The dotted role path, as configured.
    fn role_path(&self) -> String {
        self.role_claim.join(".")
    }

    /// The claims of a new token for `role`: `role` (and the role path,
    /// if another), `iat`, `exp`, `sub`, and the configured `iss` and
    /// `aud` (Supabase's `authenticated` for signed-in users otherwise).
    pub fn claims(
        &self,
        role: Role,
        ttl: Duration,
        subject: Option<&str>,
    ) -> Result<Map<String, Value>, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|error| error.to_string())?;
        let mut claims = Map::new();
        claims.insert("role".into(), role.as_str().into());
        if self.role_claim != ["role"] {
            let mut at = &mut claims;
            let (last, parents) = self
                .role_claim
                .split_last()
                .ok_or("the role claim path is empty")?;
            for parent in parents {
                let next = at
                    .entry(parent.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                at = next
                    .as_object_mut()
                    .ok_or("the role claim path crosses the role")?;
            }
            at.insert(last.clone(), role.as_str().into());
        }
        claims.insert("iat".into(), now.as_secs().into());
        claims.insert("exp".into(), (now + ttl).as_secs().into());
        if let Some(subject) = subject {
            claims.insert("sub".into(), subject.into());
        }
        if let Some(issuer) = &self.issuer {
            claims.insert("iss".into(), issuer.clone().into());
        }
        match self.audience.first() {
            Some(audience) => {
                claims.insert("aud".into(), audience.clone().into());
            }
            None if role == Role::Authenticated => {
                claims.insert("aud".into(), "authenticated".into());
            }
            None => {}
        }
        Ok(claims)
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        // No leeway: an expired token is expired. `nbf` is honoured.
        validation.leeway = 0;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if self.audience.is_empty() {
            // Supabase user tokens say `aud: authenticated`, service tokens
            // carry none: unless told otherwise, the role is what counts.
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audience);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation
    }
}

/// The keys that verify tokens: the HS256 secret and/or a key set.
#[derive(Debug, Default)]
pub struct KeySettings {
    /// HS256 secret, at least [`MIN_SECRET_BYTES`] long.
    pub secret: Option<Vec<u8>>,
    /// JSON Web Key Set and its refresh interval.
    pub jwks: Option<(JwksSource, Duration)>,
    /// What the claims must say.
    pub rules: ClaimRules,
}

/// Verifies tokens (and mints HS256 ones). Cheap to clone: every
/// connection holds one.
#[derive(Clone)]
pub struct TokenKeys(Arc<Keys>);

struct Keys {
    secret: Option<(VerifyingKey, EncodingKey)>,
    jwks: Option<Arc<Jwks>>,
    rules: ClaimRules,
    /// One per algorithm a key may decide.
    validations: [(Algorithm, Validation); 4],
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    /// Keys for the HS256 `secret` alone, which must be at least
    /// [`MIN_SECRET_BYTES`] long, with the default claim rules.
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        Self::from_settings(KeySettings {
            secret: Some(secret.to_vec()),
            ..KeySettings::default()
        })
    }

    /// Keys from `settings`: at least a secret or a key set. A key set
    /// file is read now; a URL is fetched once [`TokenKeys::start`] runs.
    pub fn from_settings(settings: KeySettings) -> Result<Self, String> {
        let secret = match settings.secret {
            Some(secret) if secret.len() < MIN_SECRET_BYTES => {
                return Err(format!(
                    "JWT_SECRET is {} bytes long; use at least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)",
                    secret.len()
                ));
            }
            Some(secret) => Some((
                VerifyingKey {
                    algorithm: Algorithm::HS256,
                    key: Arc::new(DecodingKey::from_secret(&secret)),
                },
                EncodingKey::from_secret(&secret),
            )),
            None => None,
        };
        let jwks = match settings.jwks {
            Some((source, refresh)) => Some(Arc::new(Jwks::new(source, refresh)?)),
            None => None,
        };
        if secret.is_none() && jwks.is_none() {
            return Err(
                "no key to verify tokens with: set JWT_SECRET (HS256), JWKS_URL or JWKS_FILE"
                    .into(),
            );
        }
        let rules = settings.rules;
        let validations = [
            Algorithm::HS256,
            Algorithm::ES256,
            Algorithm::RS256,
            Algorithm::EdDSA,
        ]
        .map(|algorithm| (algorithm, rules.validation(algorithm)));
        Ok(Self(Arc::new(Keys {
            secret,
            jwks,
            rules,
            validations,
        })))
    }

    /// Starts keeping the key set fresh, if there is one; its loads are
    /// counted in `metrics`.
    pub fn start(&self, metrics: Arc<Metrics>) {
        if let Some(jwks) = &self.0.jwks {
            tokio::spawn(Jwks::keep_fresh(Arc::downgrade(jwks), metrics));
        }
    }

    /// Whether an HS256 secret verifies tokens.
    pub fn has_secret(&self) -> bool {
        self.0.secret.is_some()
    }

    /// The key set, if tokens are verified by one.
    pub fn key_set(&self) -> Option<&Jwks> {
        self.0.jwks.as_deref()
    }

    /// Whether tokens can be verified: the key set, if any, is loaded.
    pub fn is_ready(&self) -> bool {
        self.0.jwks.as_ref().is_none_or(|jwks| jwks.is_loaded())
    }

    /// What the claims must say.
    pub fn rules(&self) -> &ClaimRules {
        &self.0.rules
    }

    /// The caller for an `Authorization` header value (or its absence).
    pub async fn caller(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
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
        self.verify(token).await
    }

    /// Verifies `token` and returns its caller.
    pub async fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let keys = &*self.0;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| ApiError::InvalidToken(unreadable_header(token)))?;
        let key = self.key_for(header.kid.as_deref(), header.alg).await?;
        if header.alg != key.algorithm {
            return Err(ApiError::InvalidToken(format!(
                "the token says it is signed with {:?}, but its key verifies {:?} only",
                header.alg, key.algorithm
            )));
        }
        let validation = keys
            .validations
            .iter()
            .find(|(algorithm, _)| *algorithm == key.algorithm)
            .map(|(_, validation)| validation)
            .ok_or_else(|| ApiError::internal("no validation for a key's algorithm"))?;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation)
            .map_err(|error| ApiError::InvalidToken(describe(&error, &keys.rules)))?;
        let claims = data.claims;
        let exp = claims.get("exp").and_then(Value::as_u64).ok_or_else(|| {
            ApiError::InvalidToken("the `exp` claim must be a number of seconds".into())
        })?;
        let path = keys.rules.role_path();
        let role = role_at(&claims, &keys.rules.role_claim).ok_or_else(|| {
            ApiError::InvalidToken(format!("the token must carry a role at `{path}`"))
        })?;
        let role = Role::parse(role).ok_or_else(|| {
            ApiError::InvalidToken(format!(
                "role \"{}\" (at `{path}`) is not accepted; use anon, authenticated or service_role",
                role.chars().take(64).collect::<String>()
            ))
        })?;
        let subject = claims.get("sub").and_then(Value::as_str).map(Arc::from);
        Ok(Caller {
            role,
            claims: Value::Object(claims).to_string().into(),
            expires_at: Some(exp),
            subject,
        })
    }

    /// The key a token names: by `kid` from the key set (loading it again
    /// for an id it does not know), else the HS256 secret. An HS256 token
    /// whose `kid` the set does not have is checked against the secret
    /// too, as Supabase's HS256 tokens may carry one.
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<VerifyingKey, ApiError> {
        let keys = &*self.0;
        let secret = keys.secret.as_ref().map(|(key, _)| key.clone());
        let Some(kid) = kid else {
            return secret.ok_or_else(|| {
                ApiError::InvalidToken(
                    "the token names no key (`kid`); only HS256 tokens may, and no HS256 secret is configured"
                        .into(),
                )
            });
        };
        if let Some(jwks) = &keys.jwks
            && let Some(key) = jwks.find_or_load(kid).await
        {
            return Ok(key);
        }
        match secret {
            Some(secret) if alg == Algorithm::HS256 => Ok(secret),
            _ => Err(ApiError::InvalidToken(format!(
                "unknown key id \"{}\"",
                kid.chars().take(64).collect::<String>()
            ))),
        }
    }

    /// Mints an HS256 token for `role`, valid for `ttl`, with an optional
    /// subject; needs the secret.
    pub fn mint(&self, role: Role, ttl: Duration, subject: Option<&str>) -> Result<String, String> {
        let (_, encoding) = self
            .0
            .secret
            .as_ref()
            .ok_or("no HS256 secret to sign with (JWT_SECRET)")?;
        let claims = self.0.rules.claims(role, ttl, subject)?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding)
            .map_err(|error| error.to_string())
    }
}

/// A JSON Web Key's name for one of the algorithms a key may decide.
fn key_algorithm(algorithm: Algorithm) -> jsonwebtoken::jwk::KeyAlgorithm {
    use jsonwebtoken::jwk::KeyAlgorithm;
    match algorithm {
        Algorithm::HS256 => KeyAlgorithm::HS256,
        Algorithm::ES256 => KeyAlgorithm::ES256,
        Algorithm::EdDSA => KeyAlgorithm::EdDSA,
        _ => KeyAlgorithm::RS256,
    }
}

/// The string at the dotted `path` of `claims`.
fn role_at<'a>(claims: &'a Map<String, Value>, path: &[String]) -> Option<&'a str> {
    let (first, rest) = path.split_first()?;
    rest.iter()
        .try_fold(claims.get(first)?, |at, part| at.get(part))?
        .as_str()
}

/// Why a token's header could not be read, said as precisely as possible
/// (never echoing more than the algorithm's name).
fn unreadable_header(token: &str) -> String {
    let algorithm = token
        .split('.')
        .next()
        .and_then(|part| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<Value>(&json).ok())
        .and_then(|header| header.get("alg")?.as_str().map(str::to_owned));
    match algorithm {
        Some(alg) if alg.eq_ignore_ascii_case("none") => {
            "unsigned tokens (alg: none) are refused".into()
        }
        Some(alg) => format!(
            "the algorithm \"{}\" is not accepted; tokens are signed with HS256, ES256, RS256 or EdDSA",
            alg.chars().take(16).collect::<String>()
        ),
        None => "the token is malformed".into(),
    }
}

fn describe(error: &jsonwebtoken::errors::Error, rules: &ClaimRules) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEddsaKey => "the token's signature is not valid".into(),
        ErrorKind::InvalidAlgorithm => "the token's algorithm does not fit its key".into(),
        ErrorKind::InvalidIssuer => format!(
            "wrong issuer: `iss` must be {}",
            rules.issuer.as_deref().unwrap_or_default()
        ),
        ErrorKind::InvalidAudience => {
            format!(
                "wrong audience: `aud` must include one of {}",
                rules.audience.join(", ")
            )
        }
        ErrorKind::MissingRequiredClaim(claim) => format!("the token must carry a `{claim}` claim"),
        ErrorKind::ImmatureSignature => "the token is not valid yet (`nbf`)".into(),
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

    #[tokio::test]
    async fn minted_tokens_verify_with_their_role_and_subject() {
        let keys = TokenKeys::new(SECRET).unwrap();
        let token = keys
            .mint(Role::Authenticated, Duration::from_secs(60), Some("user-1"))
            .unwrap();
        let caller = keys.verify(&token).await.unwrap();
        assert_eq!(caller.role, Role::Authenticated);
        let claims: Value = serde_json::from_str(&caller.claims).unwrap();
        assert_eq!(claims["sub"], "user-1");
        assert_eq!(claims["aud"], "authenticated");
    }

    #[tokio::test]
    async fn missing_header_is_anon_and_a_non_bearer_header_is_refused() {
        let keys = TokenKeys::new(SECRET).unwrap();
        assert_eq!(keys.caller(None).await.unwrap().role, Role::Anon);
        assert!(matches!(
            keys.caller(Some("Basic abc")).await,
            Err(ApiError::InvalidToken(_))
        ));
        assert!(matches!(
            keys.caller(Some("Bearer ")).await,
            Err(ApiError::InvalidToken(_))
        ));
    }

    #[tokio::test]
    async fn the_role_is_read_at_the_configured_path_and_minted_there() {
        let keys = TokenKeys::from_settings(KeySettings {
            secret: Some(SECRET.to_vec()),
            jwks: None,
            rules: ClaimRules::parse(
                Some("https://example.test/auth/v1"),
                Some("api, other"),
                "app_metadata.role",
            )
            .unwrap(),
        })
        .unwrap();
        let token = keys
            .mint(Role::ServiceRole, Duration::from_secs(60), None)
            .unwrap();
        let caller = keys.verify(&token).await.unwrap();
        assert_eq!(caller.role, Role::ServiceRole);
        let claims: Value = serde_json::from_str(&caller.claims).unwrap();
        assert_eq!(claims["app_metadata"]["role"], "service_role");
        assert_eq!(claims["iss"], "https://example.test/auth/v1");
        assert_eq!(claims["aud"], "api");
        // The same token checked by default rules: role at the top, any issuer.
        let plain = TokenKeys::new(SECRET).unwrap();
        assert_eq!(plain.verify(&token).await.unwrap().role, Role::ServiceRole);
        assert!(ClaimRules::parse(None, None, "app_metadata..role").is_err());
    }
}
