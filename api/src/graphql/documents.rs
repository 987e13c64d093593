//! Documents sent by reference instead of by text: Apollo's automatic
//! persisted queries (APQ: `extensions.persistedQuery.sha256Hash`), and
//! trusted documents (a manifest of the only documents most callers may
//! run, sent by `documentId` or by that same hash).
//!
//! A request's document is settled here, before it is parsed: a reference
//! becomes the document's text, a text is checked against the hash sent
//! with it and against the manifest, and the caller's role decides what
//! it may run and what it may register.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_graphql::Value;
use sha2::{Digest, Sha256};

use crate::auth::Role;
use crate::error::ApiError;
use crate::metrics::{Metrics, PersistedLookup};

/// Most bytes of document text the APQ cache keeps; the least recently
/// used go first. A document is at most a request body.
pub const APQ_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// A document's SHA-256.
type Sha = [u8; 32];

/// What the server accepts by reference, from its flags.
#[derive(Debug, Clone, Default)]
pub struct DocumentSettings {
    /// Automatic persisted queries: hashes sent with their documents are
    /// remembered, and a hash alone runs its document.
    pub persisted_queries: bool,
    /// The trusted documents, when only those may run.
    pub trusted: Option<Arc<TrustedDocuments>>,
    /// Whether `service_role` is held to the trusted documents too.
    pub trusted_for_all: bool,
}

/// Why a manifest of trusted documents cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("TRUSTED_DOCUMENTS: cannot read {path}: {source}")]
    Read {
        /// The manifest.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a manifest.
    #[error(
        "TRUSTED_DOCUMENTS: {path} is not a manifest: {reason}; expected a JSON object of \
         hash → document (graphql-codegen's client preset or Relay), or an Apollo persisted \
         query manifest"
    )]
    Shape {
        /// The manifest.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// One of its documents does not parse.
    #[error("TRUSTED_DOCUMENTS: {path}: the document of \"{key}\" does not parse: {error}")]
    Document {
        /// The manifest.
        path: PathBuf,
        /// The document's key in it.
        key: String,
        /// The parser's message.
        error: String,
    },
    /// It has no document: every restricted caller would be refused.
    #[error(
        "TRUSTED_DOCUMENTS: {path} has no documents, so every caller held to it would be refused"
    )]
    Empty {
        /// The manifest.
        path: PathBuf,
    },
}

/// The documents a manifest trusts, by their SHA-256 (computed here, so a
/// manifest keyed otherwise, e.g. Relay's MD5 ids, is still found by hash)
/// and by the key the manifest gives them.
#[derive(Debug)]
pub struct TrustedDocuments {
    by_sha: HashMap<Sha, Arc<str>>,
    by_key: HashMap<String, Arc<str>>,
}

impl TrustedDocuments {
    /// Reads and checks the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_manifest(path, &text)
    }

    /// The documents of a manifest's text (`path` names it in errors).
    pub fn from_manifest(path: &Path, text: &str) -> Result<Self, ManifestError> {
        let shape = |reason: String| ManifestError::Shape {
            path: path.to_owned(),
            reason,
        };
        let manifest: serde_json::Value =
            serde_json::from_str(text).map_err(|error| shape(error.to_string()))?;
        let serde_json::Value::Object(object) = manifest else {
            return Err(shape("not a JSON object".into()));
        };
        let entries: Vec<(String, String)> =
            if object.get("format").and_then(|format| format.as_str())
                == Some("apollo-persisted-query-manifest")
            {
                let operations = object
                    .get("operations")
                    .and_then(|operations| operations.as_array())
                    .ok_or_else(|| shape("\"operations\" is not an array".into()))?;
                operations
                    .iter()
                    .map(|operation| {
                        let field = |name: &str| {
                            operation
                                .get(name)
                                .and_then(|value| value.as_str())
                                .map(str::to_owned)
                                .ok_or_else(|| shape(format!("an operation has no \"{name}\"")))
                        };
                        Ok((field("id")?, field("body")?))
                    })
                    .collect::<Result<_, _>>()?
            } else {
                object
                    .into_iter()
                    .map(|(key, document)| match document {
                        serde_json::Value::String(document) => Ok((key, document)),
                        _ => Err(shape(format!("the value of \"{key}\" is not a string"))),
                    })
                    .collect::<Result<_, _>>()?
            };
        if entries.is_empty() {
            return Err(ManifestError::Empty {
                path: path.to_owned(),
            });
        }
        let mut trusted = Self {
            by_sha: HashMap::with_capacity(entries.len()),
            by_key: HashMap::with_capacity(entries.len()),
        };
        for (key, document) in entries {
            if let Err(error) = async_graphql::parser::parse_query(&document) {
                return Err(ManifestError::Document {
                    path: path.to_owned(),
                    key,
                    error: error.to_string(),
                });
            }
            let document: Arc<str> = document.into();
            trusted.by_sha.insert(sha256(&document), document.clone());
            trusted.by_key.insert(key, document);
        }
        Ok(trusted)
    }

    /// How many documents it trusts.
    pub fn len(&self) -> usize {
        self.by_sha.len()
    }

    /// Whether it trusts none (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.by_sha.is_empty()
    }
}

/// The APQ cache: documents by hash, bounded by their total size.
struct ApqCache {
    documents: lru::LruCache<Sha, Arc<str>>,
    bytes: usize,
}

/// Documents by reference, as the settings allow; one per process.
pub struct PersistedDocuments {
    settings: DocumentSettings,
    apq: Mutex<ApqCache>,
}

/// `extensions.persistedQuery` of a request.
struct PersistedQuery {
    sha: Sha,
}

impl PersistedDocuments {
    /// Documents by reference as `settings` allow.
    pub fn new(settings: DocumentSettings) -> Self {
        Self {
            settings,
            apq: Mutex::new(ApqCache {
                documents: lru::LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    /// Whether `role` may run only trusted documents.
    fn restricted(&self, role: Role) -> bool {
        self.settings.trusted.is_some()
            && (role != Role::ServiceRole || self.settings.trusted_for_all)
    }

    /// Settles the document of `request` for a caller of `role`: a
    /// reference (`document_id`, or an APQ hash without a query) becomes
    /// its text; a text sent with a hash must match it, and is remembered
    /// when APQ is on and the caller is not held to the trusted
    /// documents; a caller held to them may run nothing else. A request
    /// with neither text nor reference is left as it is.
    pub fn settle(
        &self,
        request: &mut async_graphql::Request,
        document_id: Option<&str>,
        role: Role,
        metrics: &Metrics,
    ) -> Result<(), ApiError> {
        if self.settings.trusted.is_none() && document_id.is_none() && request.extensions.is_empty()
        {
            return Ok(());
        }
        let restricted = self.restricted(role);
        let persisted = persisted_query(request.extensions.get("persistedQuery"))?;
        if !request.query.trim().is_empty() {
            let sha = match &persisted {
                Some(persisted) => {
                    let sha = sha256(&request.query);
                    if sha != persisted.sha {
                        return Err(ApiError::bad_input(
                            "extensions.persistedQuery.sha256Hash",
                            "extensions.persistedQuery.sha256Hash is not the SHA-256 of the \
                             query sent with it: send the hash of exactly this query text",
                        ));
                    }
                    Some(sha)
                }
                None if restricted => Some(sha256(&request.query)),
                None => None,
            };
            if restricted {
                let trusted = self.settings.trusted.as_deref();
                if !sha.is_some_and(|sha| trusted.is_some_and(|t| t.by_sha.contains_key(&sha))) {
                    metrics.persisted_lookup(PersistedLookup::Refused);
                    return Err(ApiError::PersistedQueryRequired);
                }
            } else if let (Some(sha), true) = (sha, self.settings.persisted_queries) {
                self.remember(sha, &request.query);
                metrics.persisted_lookup(PersistedLookup::Registered);
            }
            return Ok(());
        }
        let found = match (document_id, &persisted) {
            (Some(id), _) => self.by_document_id(id, restricted),
            (None, Some(persisted)) => {
                if !restricted
                    && !self.settings.persisted_queries
                    && self.settings.trusted.is_none()
                {
                    return Err(ApiError::PersistedQueryNotSupported);
                }
                self.by_sha(&persisted.sha, restricted)
            }
            (None, None) => return Ok(()),
        };
        match found {
            Some(document) => {
                metrics.persisted_lookup(PersistedLookup::Hit);
                request.query = document.to_string();
                Ok(())
            }
            None => {
                metrics.persisted_lookup(PersistedLookup::Miss);
                Err(ApiError::PersistedQueryNotFound)
            }
        }
    }

    /// The document `id` names: a manifest's key, or `sha256:<hex>`.
    fn by_document_id(&self, id: &str, restricted: bool) -> Option<Arc<str>> {
        if let Some(document) = self
            .settings
            .trusted
            .as_ref()
            .and_then(|trusted| trusted.by_key.get(id))
        {
            return Some(document.clone());
        }
        let sha = id.strip_prefix("sha256:").and_then(parse_sha)?;
        self.by_sha(&sha, restricted)
    }

    /// The document whose hash is `sha`: trusted, or (for a caller not
    /// held to the trusted documents) remembered by APQ.
    fn by_sha(&self, sha: &Sha, restricted: bool) -> Option<Arc<str>> {
        if let Some(document) = self
            .settings
            .trusted
            .as_ref()
            .and_then(|trusted| trusted.by_sha.get(sha))
        {
            return Some(document.clone());
        }
        if restricted || !self.settings.persisted_queries {
            return None;
        }
        self.lock().documents.get(sha).cloned()
    }

    /// Keeps `document` under `sha`, dropping the least recently used
    /// documents past the cache's size.
    fn remember(&self, sha: Sha, document: &str) {
        if document.len() > APQ_CACHE_BYTES {
            return;
        }
        let mut cache = self.lock();
        if cache.documents.get(&sha).is_some() {
            return;
        }
        cache.bytes += document.len();
        cache.documents.put(sha, document.into());
        while cache.bytes > APQ_CACHE_BYTES {
            let Some((_, evicted)) = cache.documents.pop_lru() else {
                break;
            };
            cache.bytes -= evicted.len();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApqCache> {
        // Consistent between statements: a panic cannot leave it half-made.
        self.apq.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}

fn sha256(text: &str) -> Sha {
    Sha256::digest(text.as_bytes()).into()
}

/// 64 hexadecimal digits (either case) as a hash.
fn parse_sha(hex: &str) -> Option<Sha> {
    if hex.len() != 64 {
        return None;
    }
    let mut sha = [0_u8; 32];
    for (index, byte) in sha.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(sha)
}

/// `extensions.persistedQuery`, if sent: `{version: 1, sha256Hash}`.
fn persisted_query(value: Option<&Value>) -> Result<Option<PersistedQuery>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let refused = || {
        ApiError::bad_input(
            "extensions.persistedQuery",
            "extensions.persistedQuery must be {\"version\": 1, \"sha256Hash\": \"<64 hex digits>\"}",
        )
    };
    let Value::Object(fields) = value else {
        return Err(refused());
    };
    match fields.get("version") {
        Some(Value::Number(version)) if version.as_u64() == Some(1) => {}
        _ => return Err(refused()),
    }
    let sha = match fields.get("sha256Hash") {
        Some(Value::String(hex)) => parse_sha(hex).ok_or_else(refused)?,
        _ => return Err(refused()),
    };
    Ok(Some(PersistedQuery { sha }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(text: &str) -> Result<TrustedDocuments, ManifestError> {
        TrustedDocuments::from_manifest(Path::new("docs.json"), text)
    }

    #[test]
    fn manifests_of_codegen_relay_and_apollo_are_read_by_hash_and_key() {
        let query = "query A { syncStates { resource } }";
        let sha = sha256(query);
        let relay = manifest(&format!(r#"{{"5f2c": "{query}"}}"#)).unwrap();
        assert_eq!(relay.len(), 1);
        assert_eq!(&*relay.by_sha[&sha], query);
        assert_eq!(&*relay.by_key["5f2c"], query);
        let apollo = manifest(&format!(
            r#"{{"format": "apollo-persisted-query-manifest", "version": 1,
                "operations": [{{"id": "abc", "name": "A", "type": "query", "body": "{query}"}}]}}"#
        ))
        .unwrap();
        assert_eq!(&*apollo.by_key["abc"], query);
        assert!(apollo.by_sha.contains_key(&sha));
    }

    #[test]
    fn a_manifest_that_cannot_be_used_is_refused_saying_why() {
        for (text, says) in [
            ("[]", "not a JSON object"),
            ("{", "not a manifest"),
            (r#"{"a": 1}"#, "the value of \"a\" is not a string"),
            (
                r#"{"a": "{ unclosed"}"#,
                "the document of \"a\" does not parse",
            ),
            ("{}", "has no documents"),
            (
                r#"{"format": "apollo-persisted-query-manifest", "operations": [{"id": "x"}]}"#,
                "no \"body\"",
            ),
        ] {
            let error = manifest(text).err().unwrap().to_string();
            assert!(error.starts_with("TRUSTED_DOCUMENTS: "), "{error}");
            assert!(error.contains(says), "{text}: {error}");
        }
        let missing = TrustedDocuments::load(Path::new("/no/such/manifest.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            missing.contains("cannot read /no/such/manifest.json"),
            "{missing}"
        );
    }

    #[test]
    fn hashes_are_64_hex_digits_of_either_case() {
        let sha = sha256("{ a }");
        let hex: String = sha.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(parse_sha(&hex), Some(sha));
        assert_eq!(parse_sha(&hex.to_uppercase()), Some(sha));
        for bad in [
            "",
            "abc",
            &hex[..62],
            &format!("{hex}00"),
            &format!("zz{}", &hex[2..]),
        ] {
            assert_eq!(parse_sha(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_apq_cache_keeps_what_fits_and_drops_the_least_recently_used() {
        let documents = PersistedDocuments::new(DocumentSettings {
            persisted_queries: true,
            ..DocumentSettings::default()
        });
        let big = "x".repeat(APQ_CACHE_BYTES / 2 - 1);
        let (first, second, third) = (format!("a{big}"), format!("b{big}"), format!("c{big}"));
        documents.remember(sha256(&first), &first);
        documents.remember(sha256(&second), &second);
        // Touch the first: the second is now the least recently used.
        assert!(documents.by_sha(&sha256(&first), false).is_some());
        documents.remember(sha256(&third), &third);
        assert!(documents.by_sha(&sha256(&first), false).is_some());
        assert!(documents.by_sha(&sha256(&second), false).is_none());
        assert!(documents.by_sha(&sha256(&third), false).is_some());
        assert!(documents.lock().bytes <= APQ_CACHE_BYTES);
        // Never for a restricted caller.
        assert!(documents.by_sha(&sha256(&first), true).is_none());
    }
}
