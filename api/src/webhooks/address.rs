//! Where webhooks may point. Loopback, private, link-local and other
//! non-public addresses are refused unless allowed, and the check is made
//! on the addresses a name resolves to, at creation and at every delivery
//! (the client resolves names only through [`PublicOnly`]), so a DNS change
//! cannot aim the server at an internal host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    /// Not a URL at all.
    #[error("\"{0}\" is not a URL")]
    Malformed(String),
    /// Another scheme than http or https.
    #[error("only http:// and https:// URLs are allowed, not {0}://")]
    Scheme(String),
    /// No host, or credentials in the URL.
    #[error("the URL needs a host and no user or password")]
    Host,
    /// The name does not resolve.
    #[error("{host} does not resolve: {reason}")]
    Unresolved {
        /// The host name.
        host: String,
        /// What the resolver said.
        reason: String,
    },
    /// It is or resolves to a non-public address.
    #[error(
        "{host} is {ip}, a loopback, private or link-local address; set WEBHOOK_ALLOW_PRIVATE=true to allow such addresses"
    )]
    Private {
        /// The host as written.
        host: String,
        /// The address refused.
        ip: IpAddr,
    },
}

/// Whether `ip` is an address the internet can reach: not loopback,
/// private (RFC 1918, unique local), link-local, shared (CGNAT),
/// unspecified, broadcast, multicast or documentation.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(ip),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        || first == 0x2001 && ip.segments()[1] == 0x0db8)
}

/// Checks `url` as written, resolving nothing: http(s), a host, no
/// credentials, and (unless `allow_private`) no non-public address
/// literal. At delivery this is the whole check: the client resolves names
/// only through [`PublicOnly`].
pub fn check_written(url: &str, allow_private: bool) -> Result<Url, UrlRefused> {
    let parsed = Url::parse(url).map_err(|_| UrlRefused::Malformed(url.to_owned()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(UrlRefused::Scheme(parsed.scheme().to_owned()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlRefused::Host);
    }
    let ip = literal(&parsed).ok_or(UrlRefused::Host)?;
    match ip {
        Some(ip) if !allow_private && !is_public(ip) => Err(UrlRefused::Private {
            host: ip.to_string(),
            ip,
        }),
        _ => Ok(parsed),
    }
}

/// At creation: [`check_written`], then (unless `allow_private`) every
/// address a name resolves to must be public.
pub async fn check(url: &str, allow_private: bool) -> Result<Url, UrlRefused> {
    let parsed = check_written(url, allow_private)?;
    if allow_private || matches!(literal(&parsed), Some(Some(_))) {
        return Ok(parsed);
    }
    let host = parsed.host_str().unwrap_or_default().to_owned();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|error| UrlRefused::Unresolved {
            host: host.clone(),
            reason: error.to_string(),
        })?;
    for addr in addrs {
        if !is_public(addr.ip()) {
            return Err(UrlRefused::Private {
                host: host.clone(),
                ip: addr.ip(),
            });
        }
    }
    Ok(parsed)
}

/// The URL's host as an address when it is one (`Some(None)`: a name;
/// `None`: no host).
fn literal(url: &Url) -> Option<Option<IpAddr>> {
    let host = url.host_str()?;
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok(),
    )
}

/// The delivery client's resolver: the system's, keeping only public
/// addresses (a name with none fails to resolve).
#[derive(Debug, Clone, Copy)]
pub struct PublicOnly;

impl PublicOnly {
    /// As reqwest takes it.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self)
    }
}

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|addr| is_public(addr.ip()))
                .collect();
            if public.is_empty() {
                return Err(format!(
                    "{host} resolves only to loopback, private or link-local addresses ({resolved:?}); set WEBHOOK_ALLOW_PRIVATE=true to allow them"
                )
                .into());
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses_are_recognised() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.215.14", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked_before_any_request() {
        assert_eq!(
            check("ftp://example.com/hook", true).await,
            Err(UrlRefused::Scheme("ftp".into()))
        );
        assert!(matches!(
            check("http://127.0.0.1:9/hook", false).await,
            Err(UrlRefused::Private { .. })
        ));
        assert!(matches!(
            check("http://localhost:9/hook", false).await,
            Err(UrlRefused::Private { .. })
        ));
        assert!(check("http://127.0.0.1:9/hook", true).await.is_ok());
        assert_eq!(
            check("http://user:pw@example.com/", true).await,
            Err(UrlRefused::Host)
        );
    }
}
