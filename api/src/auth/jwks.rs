//! A JSON Web Key Set, from a URL or a file: the public keys that verify
//! asymmetrically signed tokens (Supabase's `/auth/v1/.well-known/jwks.json`),
//! kept fresh on an interval and fetched at once for a key id it does not
//! know, at most once per [`UNKNOWN_KID_INTERVAL`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use serde_json::Value;
use tokio::time::Instant;

use crate::metrics::{JwksOutcome, Metrics};

/// Time between refreshes of a JSON Web Key Set (`--jwks-refresh-secs`).
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(600);
/// Fetches for unknown key ids are at most this frequent.
pub const UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest accepted RSA modulus.
const MIN_RSA_BITS: usize = 2048;
/// Largest key set document read.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Longest a fetch of the key set may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the key set comes from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// Fetched with GET (e.g. `https://<ref>.supabase.co/auth/v1/.well-known/jwks.json`).
    Url(String),
    /// Read from a file.
    File(PathBuf),
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(url) => f.write_str(url),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A verification key and the one algorithm it verifies.
#[derive(Clone)]
pub struct VerifyingKey {
    /// Decided by the key's type, never by a token.
    pub algorithm: Algorithm,
    /// The key material.
    pub key: Arc<DecodingKey>,
}

type KeyMap = HashMap<String, VerifyingKey>;

/// The key set in use, and how to refresh it.
pub struct Jwks {
    source: JwksSource,
    refresh: Duration,
    client: reqwest::Client,
    keys: RwLock<Arc<KeyMap>>,
    loaded: AtomicBool,
    /// When the last load began; held across a load, so loads never overlap.
    last_load: tokio::sync::Mutex<Option<Instant>>,
    /// When a token's unknown `kid` last caused a load.
    last_unknown_kid_load: std::sync::Mutex<Option<Instant>>,
    metrics: OnceLock<Arc<Metrics>>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("source", &self.source)
            .field("loaded", &self.is_loaded())
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// A key set from `source`, refreshed every `refresh`. A file is read
    /// now (a bad one stops the start); a URL is fetched once the server
    /// runs ([`Jwks::keep_fresh`]).
    pub fn new(source: JwksSource, refresh: Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|error| format!("cannot build the HTTP client: {error}"))?;
        let jwks = Self {
            source,
            refresh,
            client,
            keys: RwLock::new(Arc::default()),
            loaded: AtomicBool::new(false),
            last_load: tokio::sync::Mutex::new(None),
            last_unknown_kid_load: std::sync::Mutex::new(None),
            metrics: OnceLock::new(),
        };
        if let JwksSource::File(path) = &jwks.source {
            let document = std::fs::read(path)
                .map_err(|error| format!("JWKS_FILE: cannot read {}: {error}", path.display()))?;
            let keys = parse_key_set(&document)
                .map_err(|error| format!("JWKS_FILE {}: {error}", path.display()))?;
            jwks.install(keys);
        }
        Ok(jwks)
    }

    /// Whether a key set has been loaded (`/readyz` waits for it).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The key named `kid`, if the set in use has it.
    pub fn find(&self, kid: &str) -> Option<VerifyingKey> {
        let keys = match self.keys.read() {
            Ok(keys) => keys.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        keys.get(kid).cloned()
    }

    /// The key named `kid`; when the set does not have it, loads the set
    /// again first, unless a load began less than [`UNKNOWN_KID_INTERVAL`]
    /// ago (a rotated-in key works at once; a flood of made-up ids costs
    /// one fetch per interval).
    pub async fn find_or_load(&self, kid: &str) -> Option<VerifyingKey> {
        if let Some(key) = self.find(kid) {
            return Some(key);
        }
        {
            let mut last = self.last_load.lock().await;
            // Another request may have loaded it while this one waited.
            if let Some(key) = self.find(kid) {
                return Some(key);
            }
            let due = {
                let mut gate = match self.last_unknown_kid_load.lock() {
                    Ok(gate) => gate,
                    Err(poisoned) => poisoned.into_inner(),
                };
                let due = gate.is_none_or(|at| at.elapsed() >= UNKNOWN_KID_INTERVAL);
                if due {
                    *gate = Some(Instant::now());
                }
                due
            };
            if due {
                *last = Some(Instant::now());
                let _ = self.load().await;
            }
        }
        self.find(kid)
    }

    /// Refreshes the set every interval until `jwks` is dropped; until the
    /// first load succeeds, retries sooner (1 s, doubling up to 30 s).
    pub async fn keep_fresh(jwks: Weak<Self>, metrics: Arc<Metrics>) {
        let mut retry = Duration::from_secs(1);
        loop {
            let Some(current) = jwks.upgrade() else {
                return;
            };
            let _ = current.metrics.set(metrics.clone());
            let wait = {
                let mut last = current.last_load.lock().await;
                let due = match *last {
                    Some(at) if current.is_loaded() => at + current.refresh,
                    Some(at) => at + retry,
                    None => Instant::now(),
                };
                if due <= Instant::now() {
                    *last = Some(Instant::now());
                    if current.load().await.is_err() && !current.is_loaded() {
                        retry = (retry * 2).min(Duration::from_secs(30));
                    }
                    Duration::ZERO
                } else {
                    due - Instant::now()
                }
            };
            drop(current);
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }

    /// Loads the set once; a failure keeps the set in use.
    /// Reads the key set now, without installing it: the key ids it holds,
    /// sorted (what `vantage-sync check` reports).
    pub async fn key_ids(&self) -> Result<Vec<String>, String> {
        let document = match &self.source {
            JwksSource::Url(url) => self.fetch(url).await?,
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|error| format!("cannot read: {error}"))?,
        };
        let mut kids: Vec<String> = parse_key_set(&document)?.into_keys().collect();
        kids.sort();
        Ok(kids)
    }

    /// Where the key set comes from.
    pub fn source(&self) -> &JwksSource {
        &self.source
    }

    async fn load(&self) -> Result<(), String> {
        let result = match &self.source {
            JwksSource::Url(url) => self.fetch(url).await,
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|error| format!("cannot read: {error}")),
        }
        .and_then(|document| parse_key_set(&document));
        match result {
            Ok(keys) => {
                let count = keys.len();
                self.install(keys);
                self.record(JwksOutcome::Ok);
                tracing::debug!(source = %self.source, keys = count, "loaded the JSON Web Key Set");
                Ok(())
            }
            Err(error) => {
                self.record(JwksOutcome::Failed);
                tracing::warn!(source = %self.source, %error, "could not load the JSON Web Key Set; keeping the last good one");
                Err(error)
            }
        }
    }

    fn install(&self, keys: KeyMap) {
        let keys = Arc::new(keys);
        match self.keys.write() {
            Ok(mut slot) => *slot = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
        self.loaded.store(true, Ordering::Release);
    }

    fn record(&self, outcome: JwksOutcome) {
        if let Some(metrics) = self.metrics.get() {
            let keys = match self.keys.read() {
                Ok(keys) => keys.len(),
                Err(poisoned) => poisoned.into_inner().len(),
            };
            metrics.jwks_loaded(outcome, keys);
        }
    }

    async fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut response = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|error| format!("cannot fetch: {error}"))?;
        if !response.status().is_success() {
            return Err(format!("fetch answered {}", response.status()));
        }
        let mut document = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| format!("cannot fetch: {error}"))?
        {
            if document.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(format!(
                    "the key set is larger than {MAX_DOCUMENT_BYTES} bytes"
                ));
            }
            document.extend_from_slice(&chunk);
        }
        Ok(document)
    }
}

/// The usable keys of a key set document, by `kid`. Keys this service
/// cannot or will not use are skipped with a warning; a set of keys none
/// of which is usable is an error (the last good set stays).
fn parse_key_set(document: &[u8]) -> Result<KeyMap, String> {
    let document: Value =
        serde_json::from_slice(document).map_err(|error| format!("not JSON: {error}"))?;
    let Some(entries) = document.get("keys").and_then(Value::as_array) else {
        return Err("not a JSON Web Key Set: no \"keys\" array".into());
    };
    let mut keys = KeyMap::new();
    for entry in entries {
        match usable_key(entry) {
            Ok((kid, key)) => match keys.entry(kid) {
                std::collections::hash_map::Entry::Occupied(entry) => tracing::warn!(
                    kid = entry.key(),
                    "the key set names this key id twice; the first key is used"
                ),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    entry.insert(key);
                }
            },
            Err(reason) => {
                let kid = entry.get("kid").and_then(Value::as_str).unwrap_or("(none)");
                tracing::warn!(kid, reason, "skipped a key of the JSON Web Key Set");
            }
        }
    }
    if keys.is_empty() && !entries.is_empty() {
        return Err("none of the set's keys is usable (see the warnings above)".into());
    }
    Ok(keys)
}

/// One key of a set, if usable: its id and the algorithm its type decides.
fn usable_key(entry: &Value) -> Result<(String, VerifyingKey), String> {
    let jwk: Jwk = serde_json::from_value(entry.clone())
        .map_err(|error| format!("not a JSON Web Key: {error}"))?;
    let kid = jwk
        .common
        .key_id
        .clone()
        .ok_or("no \"kid\": a token could not name it")?;
    if let Some(usage) = &jwk.common.public_key_use
        && *usage != PublicKeyUse::Signature
    {
        return Err("not a signature key (\"use\" is not \"sig\")".into());
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|error| format!("unreadable key: {error}"))?;
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(params) if params.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(params) if params.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::RSA(_) => {
            let bits = match key.kind() {
                DecodingKeyKind::RsaModulusExponent { n, .. } => {
                    n.iter().skip_while(|byte| **byte == 0).count() * 8
                }
                DecodingKeyKind::SecretOrDer(_) => 0,
            };
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "an RSA key of {bits} bits; at least {MIN_RSA_BITS} are needed"
                ));
            }
            Algorithm::RS256
        }
        AlgorithmParameters::OctetKey(_) => {
            let bytes = key.try_get_as_bytes().map(<[u8]>::len).unwrap_or(0);
            if bytes < super::MIN_SECRET_BYTES {
                return Err(format!(
                    "a symmetric key of {bytes} bytes; at least {} are needed",
                    super::MIN_SECRET_BYTES
                ));
            }
            Algorithm::HS256
        }
        _ => return Err("unsupported key type or curve (use EC P-256, RSA, Ed25519)".into()),
    };
    if let Some(stated) = jwk.common.key_algorithm
        && stated != super::key_algorithm(algorithm)
    {
        return Err(format!(
            "its \"alg\" ({stated:?}) does not fit its key type, which verifies {algorithm:?} only"
        ));
    }
    Ok((
        kid,
        VerifyingKey {
            algorithm,
            key: Arc::new(key),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P256: (&str, &str) = (
        "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
    );

    #[test]
    fn the_key_type_decides_the_algorithm_and_bad_keys_are_skipped() {
        let set = json!({"keys": [
            {"kty": "EC", "crv": "P-256", "x": P256.0, "y": P256.1, "kid": "ec", "use": "sig", "alg": "ES256", "ext": true, "key_ops": ["verify"]},
            {"kty": "EC", "crv": "P-256", "x": P256.0, "y": P256.1, "kid": "lies", "alg": "RS256"},
            {"kty": "EC", "crv": "P-256", "x": P256.0, "y": P256.1},
            {"kty": "EC", "crv": "P-256", "x": P256.0, "y": P256.1, "kid": "enc", "use": "enc"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "short"},
            {"kty": "oct", "k": "c2hvcnQ", "kid": "weak"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": "ed"},
        ]});
        let keys = parse_key_set(set.to_string().as_bytes()).unwrap();
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["ec", "ed"]);
        assert_eq!(keys["ec"].algorithm, Algorithm::ES256);
        assert_eq!(keys["ed"].algorithm, Algorithm::EdDSA);
    }

    #[test]
    fn a_set_without_usable_keys_or_keys_array_is_an_error() {
        assert!(
            parse_key_set(br#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "x"}]}"#)
                .is_err()
        );
        assert!(parse_key_set(br#"{"key": []}"#).is_err());
        assert!(parse_key_set(b"<html>").is_err());
        assert!(parse_key_set(br#"{"keys": []}"#).unwrap().is_empty());
    }
}
