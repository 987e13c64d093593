//! GraphiQL at `/graphiql`, from assets compiled into the binary (fetched
//! from the npm registry by `scripts/vendor-graphiql.sh`, licences in
//! `graphiql/LICENSES.txt`): it works where no CDN can be reached.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// GraphiQL's scripts set inline styles; everything else is this origin's.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; font-src 'self' data:; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page and its assets.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let asset = |body: &'static [u8], content_type: &'static str| {
        get(move || async move { serve(body, content_type, "public, max-age=86400") })
    };
    Router::new()
        .route(
            "/graphiql",
            get(|| async {
                serve(
                    include_bytes!("graphiql/graphiql.html"),
                    "text/html; charset=utf-8",
                    "no-cache",
                )
            }),
        )
        .route(
            "/graphiql/start.js",
            asset(include_bytes!("graphiql/start.js"), JAVASCRIPT),
        )
        .route(
            "/graphiql/page.css",
            asset(include_bytes!("graphiql/page.css"), CSS),
        )
        .route(
            "/graphiql/graphiql.min.js",
            asset(include_bytes!("graphiql/graphiql.min.js"), JAVASCRIPT),
        )
        .route(
            "/graphiql/graphiql.min.css",
            asset(include_bytes!("graphiql/graphiql.min.css"), CSS),
        )
        .route(
            "/graphiql/react.production.min.js",
            asset(
                include_bytes!("graphiql/react.production.min.js"),
                JAVASCRIPT,
            ),
        )
        .route(
            "/graphiql/react-dom.production.min.js",
            asset(
                include_bytes!("graphiql/react-dom.production.min.js"),
                JAVASCRIPT,
            ),
        )
}

const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

fn serve(body: &'static [u8], content_type: &'static str, cache: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    response
}
