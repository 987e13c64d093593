//! Signing with a private key (`token --private-key`) and the public key
//! set that verifies it (`jwks --private-key`): asymmetric tokens without
//! Supabase, and end-to-end tests of that path.

use std::time::Duration;

use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse, ThumbprintHash,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::{ClaimRules, Role, key_algorithm};

/// A private key and what goes with it: the algorithm its type decides,
/// its key id and its public half as a JSON Web Key.
pub struct SigningKey {
    key: EncodingKey,
    algorithm: Algorithm,
    public: Jwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a PEM private key: EC P-256 (ES256), RSA of 2048 bits or more
    /// (RS256) or Ed25519 (EdDSA), PKCS#8 (`openssl genpkey`) or, for RSA,
    /// PKCS#1. Without `kid`, the key's RFC 7638 thumbprint names it, so
    /// `token` and `jwks` agree without being told.
    pub fn from_pem(pem: &[u8], kid: Option<String>) -> Result<Self, String> {
        let (key, algorithm) = if let Ok(key) = EncodingKey::from_ec_pem(pem) {
            (key, Algorithm::ES256)
        } else if let Ok(key) = EncodingKey::from_ed_pem(pem) {
            (key, Algorithm::EdDSA)
        } else if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
            (key, Algorithm::RS256)
        } else {
            return Err(
                "not a PEM private key of a supported type: use EC P-256, RSA (2048 bits or more) or Ed25519, e.g. `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`"
                    .into(),
            );
        };
        let mut public = Jwk::from_encoding_key(&key, algorithm)
            .map_err(|error| format!("cannot derive the public key: {error}"))?;
        match &public.algorithm {
            AlgorithmParameters::EllipticCurve(params) if params.curve != EllipticCurve::P256 => {
                return Err("only P-256 EC keys are accepted (ES256)".into());
            }
            AlgorithmParameters::RSA(params) if params.n.len() * 6 < 2048 => {
                return Err("RSA keys need at least 2048 bits".into());
            }
            _ => {}
        }
        let kid = match kid {
            Some(kid) if !kid.trim().is_empty() => kid,
            Some(_) => return Err("the key id (--kid) is empty".into()),
            None => public
                .thumbprint(ThumbprintHash::SHA256)
                .map_err(|error| format!("cannot compute the key's thumbprint: {error}"))?,
        };
        public.common = CommonParameters {
            public_key_use: Some(PublicKeyUse::Signature),
            key_algorithm: Some(key_algorithm(algorithm)),
            key_id: Some(kid),
            ..CommonParameters::default()
        };
        Ok(Self {
            key,
            algorithm,
            public,
        })
    }

    /// The key's id (`kid`).
    pub fn kid(&self) -> &str {
        self.public.common.key_id.as_deref().unwrap_or_default()
    }

    /// The algorithm the key signs with.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The public key set that verifies this key's tokens.
    pub fn key_set(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.public.clone()],
        }
    }

    /// A token for `role`, valid for `ttl`, with the claims `rules` expect.
    pub fn mint(
        &self,
        rules: &ClaimRules,
        role: Role,
        ttl: Duration,
        subject: Option<&str>,
    ) -> Result<String, String> {
        let claims = rules.claims(role, ttl, subject)?;
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid().to_owned());
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|error| error.to_string())
    }
}
