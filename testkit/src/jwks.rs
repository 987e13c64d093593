//! Asymmetric keys for tests: private keys made by `openssl genpkey`, and a
//! JSON Web Key Set served over HTTP on a free loopback port, whose keys a
//! test can change and whose fetches it can count.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use vantage_sync::auth::{ClaimRules, Role, SigningKey};

/// A key type the service accepts from a key set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// EC P-256: ES256.
    Es256,
    /// RSA 2048: RS256.
    Rs256,
    /// Ed25519: EdDSA.
    EdDsa,
}

/// A private key, its PEM text and its signer.
pub struct TestKey {
    /// The PKCS#8 PEM, as `openssl genpkey` writes it.
    pub pem: Vec<u8>,
    /// The signer, named `kid`.
    pub signer: SigningKey,
}

impl TestKey {
    /// A new key of `kind` named `kid`.
    pub fn new(kind: KeyKind, kid: &str) -> TestKey {
        let pem = private_key_pem(kind);
        let signer = SigningKey::from_pem(&pem, Some(kid.to_owned())).unwrap();
        TestKey { pem, signer }
    }

    /// The public key as a JSON Web Key.
    pub fn public_jwk(&self) -> Value {
        serde_json::to_value(&self.signer.key_set().keys[0]).unwrap()
    }

    /// The public key as PEM (`openssl pkey -pubout`).
    pub fn public_pem(&self) -> Vec<u8> {
        let dir = tempfile_dir();
        let path = dir.join("key.pem");
        std::fs::write(&path, &self.pem).unwrap();
        let output = Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&path)
            .output()
            .expect("openssl is needed for the key tests");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(output.status.success(), "openssl pkey -pubout failed");
        output.stdout
    }

    /// A token for `role`, valid for 10 minutes, with the default claims.
    pub fn token(&self, role: &str) -> String {
        self.token_with(&ClaimRules::default(), role)
    }

    /// A token for `role` with the claims `rules` make.
    pub fn token_with(&self, rules: &ClaimRules, role: &str) -> String {
        self.signer
            .mint(
                rules,
                Role::parse(role).unwrap(),
                std::time::Duration::from_secs(600),
                Some("jwks-user"),
            )
            .unwrap()
    }
}

fn tempfile_dir() -> std::path::PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vantage-sync-keys-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A new private key of `kind`, PKCS#8 PEM.
pub fn private_key_pem(kind: KeyKind) -> Vec<u8> {
    let args: &[&str] = match kind {
        KeyKind::Es256 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        KeyKind::Rs256 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        KeyKind::EdDsa => &["-algorithm", "ED25519"],
    };
    let output = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .output()
        .expect("openssl is needed for the key tests");
    assert!(output.status.success(), "openssl genpkey failed");
    output.stdout
}

#[derive(Default)]
struct Served {
    keys: Mutex<Vec<Value>>,
    fetches: AtomicUsize,
}

/// A key set served at `http://127.0.0.1:<port>/jwks.json`.
pub struct JwksServer {
    /// Where it listens.
    pub addr: SocketAddr,
    served: Arc<Served>,
    stop: Option<oneshot::Sender<()>>,
}

impl JwksServer {
    /// Serves `keys` (JSON Web Keys).
    pub async fn start(keys: Vec<Value>) -> JwksServer {
        let served = Arc::new(Served::default());
        *served.keys.lock().unwrap() = keys;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let app = Router::new()
            .route("/jwks.json", get(key_set))
            .with_state(served.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        JwksServer {
            addr,
            served,
            stop: Some(stop),
        }
    }

    /// The key set's URL.
    pub fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    /// Replaces the keys served.
    pub fn set_keys(&self, keys: Vec<Value>) {
        *self.served.keys.lock().unwrap() = keys;
    }

    /// How many times the set was fetched.
    pub fn fetches(&self) -> usize {
        self.served.fetches.load(Ordering::SeqCst)
    }

    /// Stops serving: fetches fail from now on.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn key_set(State(served): State<Arc<Served>>) -> axum::Json<Value> {
    served.fetches.fetch_add(1, Ordering::SeqCst);
    let keys = served.keys.lock().unwrap().clone();
    axum::Json(json!({ "keys": keys }))
}
