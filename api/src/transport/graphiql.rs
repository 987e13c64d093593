//! GraphiQL at `/graphiql`, from assets compiled into the binary (fetched
//! from the npm registry by `scripts/vendor-graphiql.sh`, licences in
//! `graphiql/LICENSES.txt`): it works where no CDN can be reached.

use axum::Router;
use axum::routing::get;

use super::embedded;

/// GraphiQL's scripts set inline styles; everything else is this origin's.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; font-src 'self' data:; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The page's assets: path, body, content type.
const ASSETS: [(&str, &[u8], &str); 6] = [
    (
        "/graphiql/start.js",
        include_bytes!("graphiql/start.js"),
        JAVASCRIPT,
    ),
    (
        "/graphiql/page.css",
        include_bytes!("graphiql/page.css"),
        CSS,
    ),
    (
        "/graphiql/graphiql.min.js",
        include_bytes!("graphiql/graphiql.min.js"),
        JAVASCRIPT,
    ),
    (
        "/graphiql/graphiql.min.css",
        include_bytes!("graphiql/graphiql.min.css"),
        CSS,
    ),
    (
        "/graphiql/react.production.min.js",
        include_bytes!("graphiql/react.production.min.js"),
        JAVASCRIPT,
    ),
    (
        "/graphiql/react-dom.production.min.js",
        include_bytes!("graphiql/react-dom.production.min.js"),
        JAVASCRIPT,
    ),
];

/// The page and its assets (which change only with the binary, so they may
/// be cached for a day).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let page = || async {
        embedded(
            include_bytes!("graphiql/graphiql.html"),
            "text/html; charset=utf-8",
            CONTENT_SECURITY_POLICY,
            "no-cache",
        )
    };
    ASSETS.into_iter().fold(
        Router::new().route("/graphiql", get(page)),
        |router, (path, body, content_type)| {
            router.route(
                path,
                get(move || async move {
                    embedded(
                        body,
                        content_type,
                        CONTENT_SECURITY_POLICY,
                        "public, max-age=86400",
                    )
                }),
            )
        },
    )
}
