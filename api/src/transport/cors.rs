//! Browsers on other origins (CORS): tower-http's layer with the service's
//! allow-list, plus the two things it does not do as the contract asks:
//! a preflight answers 204, and a refused origin gets no CORS headers at all.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(3600);

/// The origins browsers may call the API from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// Same-origin only: no CORS headers for anyone.
    #[default]
    None,
    /// Any origin (`*`); no credentials are ever allowed.
    Any,
    /// These exact origins.
    List(Vec<HeaderValue>),
}

impl CorsOrigins {
    /// Parses `*` or a comma-separated list of origins such as
    /// `https://dash.example.com` or `http://localhost:5173`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let items: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .collect();
        if items == ["*"] {
            return Ok(Self::Any);
        }
        if items.is_empty() {
            return Ok(Self::None);
        }
        items
            .into_iter()
            .map(|item| {
                if item == "*" {
                    return Err("`*` cannot be combined with other origins".to_owned());
                }
                let uri: axum::http::Uri = item
                    .parse()
                    .map_err(|_| format!("\"{item}\" is not an origin such as https://dash.example.com"))?;
                let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
                // A browser's Origin never has a path, not even "/": an
                // entry with one would silently never match.
                if !scheme_ok || uri.host().is_none() || item.ends_with('/') || uri.path_and_query().is_some_and(|path| path.as_str() != "/") {
                    return Err(format!(
                        "\"{item}\" is not an origin: write scheme://host[:port], without a path or trailing slash"
                    ));
                }
                HeaderValue::from_str(&item.to_ascii_lowercase())
                    .map_err(|_| format!("\"{item}\" is not a valid header value"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::List)
    }

    /// Whether a request from `origin` gets CORS headers.
    fn allows(&self, origin: &HeaderValue) -> bool {
        match self {
            Self::None => false,
            Self::Any => true,
            Self::List(origins) => origins.iter().any(|allowed| allowed == origin),
        }
    }

    /// The layer for the routes, or `None` when no origin is allowed.
    pub fn layer(&self) -> Option<CorsLayer> {
        let allow_origin = match self {
            Self::None => return None,
            Self::Any => AllowOrigin::any(),
            Self::List(origins) => AllowOrigin::list(origins.iter().cloned()),
        };
        Some(
            CorsLayer::new()
                .allow_origin(allow_origin)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::ACCEPT,
                    HeaderName::from_static("last-event-id"),
                ])
                .max_age(PREFLIGHT_MAX_AGE),
        )
    }
}

/// Runs outside [`CorsOrigins::layer`]: strips what tower-http adds for an
/// origin that is not allowed (it answers every preflight), and makes an
/// allowed preflight's answer 204 No Content.
pub async fn enforce_allowed_origins(
    State(origins): State<CorsOrigins>,
    request: Request,
    next: Next,
) -> Response {
    let allowed = request
        .headers()
        .get(header::ORIGIN)
        .is_some_and(|origin| origins.allows(origin));
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = next.run(request).await;
    if !allowed {
        let headers = response.headers_mut();
        let cors: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in cors {
            headers.remove(name);
        }
        if preflight {
            *response.status_mut() = StatusCode::FORBIDDEN;
        }
    } else if preflight && response.status() == StatusCode::OK {
        *response.status_mut() = StatusCode::NO_CONTENT;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_exact_and_say_what_is_wrong() {
        assert_eq!(CorsOrigins::parse("*").unwrap(), CorsOrigins::Any);
        assert_eq!(CorsOrigins::parse(" ").unwrap(), CorsOrigins::None);
        assert_eq!(
            CorsOrigins::parse("https://Dash.example.com, http://localhost:5173").unwrap(),
            CorsOrigins::List(vec![
                HeaderValue::from_static("https://dash.example.com"),
                HeaderValue::from_static("http://localhost:5173"),
            ])
        );
        for bad in [
            "https://dash.example.com/",
            "https://x.com/app",
            "dash.example.com",
            "ftp://x.com",
            "*, https://x.com",
        ] {
            assert!(CorsOrigins::parse(bad).is_err(), "{bad}");
        }
    }
}
