//! Standard Webhooks signatures (<https://www.standardwebhooks.com>):
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`,
//! keyed with the bytes of a `whsec_<base64>` secret.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Prefix of a secret's text form.
const SECRET_PREFIX: &str = "whsec_";
/// Bytes of key in a new secret (the scheme asks for 24 to 64).
const SECRET_BYTES: usize = 32;

/// Why a secret could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The operating system gave no randomness.
    #[error("no randomness for a webhook secret: {0}")]
    Random(getrandom::Error),
    /// A stored secret is not `whsec_<base64>`.
    #[error("a stored webhook secret is not whsec_<base64>")]
    Malformed,
}

/// A new secret, `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> Result<String, SecretError> {
    let mut key = [0_u8; SECRET_BYTES];
    getrandom::fill(&mut key).map_err(SecretError::Random)?;
    Ok(format!("{SECRET_PREFIX}{}", STANDARD.encode(key)))
}

/// The `webhook-signature` value of `body` sent as message `id` at
/// `timestamp` (unix seconds), signed with `secret`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, SecretError> {
    let key = secret
        .strip_prefix(SECRET_PREFIX)
        .and_then(|key| STANDARD.decode(key).ok())
        .ok_or(SecretError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| SecretError::Malformed)?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac.finalize().into_bytes())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's test suite.
    #[test]
    fn signs_the_standard_webhooks_example() {
        let signature = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn new_secrets_differ_and_sign() {
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("whsec_"));
        assert_ne!(
            sign(&a, "1", 0, b"x").unwrap(),
            sign(&b, "1", 0, b"x").unwrap()
        );
        assert!(matches!(
            sign("nope", "1", 0, b"x"),
            Err(SecretError::Malformed)
        ));
    }
}
