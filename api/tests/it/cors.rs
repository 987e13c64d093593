//! Browsers on other origins: an allowed origin's preflight and responses
//! carry CORS headers; any other origin, and every origin by default,
//! gets none.

use reqwest::{Method, StatusCode};
use serde_json::json;
use vantage_sync::cors::CorsOrigins;
use vantage_sync_testkit::{TestApp, TestDb};

const DASHBOARD: &str = "https://dash.example.com";

async fn app_allowing(origins: &str) -> TestApp {
    let origins = CorsOrigins::parse(origins).unwrap();
    TestApp::spawn_with(TestDb::migrated().await, |config| config.cors = origins).await
}

async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.client
        .request(Method::OPTIONS, app.url("/graphql"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap()
}

async fn post_from(app: &TestApp, origin: &str) -> reqwest::Response {
    app.client
        .post(app.url("/graphql"))
        .header("origin", origin)
        .header(
            "authorization",
            format!("Bearer {}", app.token("authenticated")),
        )
        .json(&json!({"query": "{ syncState(resource: \"funds\") { resource } }"}))
        .send()
        .await
        .unwrap()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap())
}

fn cors_headers(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .keys()
        .map(|name| name.as_str().to_owned())
        .filter(|name| name.starts_with("access-control-"))
        .collect()
}

#[tokio::test]
async fn an_allowed_origin_gets_a_204_preflight_and_cors_headers() {
    let app = app_allowing("https://other.example.org, https://dash.example.com").await;
    let answer = preflight(&app, DASHBOARD).await;
    assert_eq!(answer.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        header(&answer, "access-control-allow-origin"),
        Some(DASHBOARD)
    );
    assert_eq!(
        header(&answer, "access-control-allow-methods"),
        Some("GET,POST")
    );
    assert_eq!(
        header(&answer, "access-control-allow-headers"),
        Some("authorization,content-type,accept,last-event-id")
    );
    assert_eq!(header(&answer, "access-control-max-age"), Some("3600"));
    assert!(header(&answer, "vary").unwrap().contains("origin"));
    assert_eq!(header(&answer, "access-control-allow-credentials"), None);

    let response = post_from(&app, DASHBOARD).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        Some(DASHBOARD)
    );
    assert!(header(&response, "vary").unwrap().contains("origin"));
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap(),
        json!({"data": {"syncState": {"resource": "funds"}}})
    );
}

#[tokio::test]
async fn another_origin_gets_no_cors_headers() {
    let app = app_allowing(DASHBOARD).await;
    for origin in [
        "https://evil.example",
        "https://dash.example.com.evil.example",
        "null",
    ] {
        let answer = preflight(&app, origin).await;
        assert_eq!(answer.status(), StatusCode::FORBIDDEN, "{origin}");
        assert_eq!(cors_headers(&answer), Vec::<String>::new(), "{origin}");
        // The server still answers (the browser withholds it from the page).
        let response = post_from(&app, origin).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(cors_headers(&response), Vec::<String>::new(), "{origin}");
    }
}

#[tokio::test]
async fn by_default_no_origin_is_allowed_and_a_star_allows_all() {
    let app = TestApp::spawn().await;
    let answer = preflight(&app, DASHBOARD).await;
    assert_eq!(answer.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(cors_headers(&answer), Vec::<String>::new());
    assert_eq!(
        cors_headers(&post_from(&app, DASHBOARD).await),
        Vec::<String>::new()
    );

    let app = app_allowing("*").await;
    let answer = preflight(&app, "http://localhost:5173").await;
    assert_eq!(answer.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&answer, "access-control-allow-origin"), Some("*"));
    let response = post_from(&app, "http://localhost:5173").await;
    assert_eq!(header(&response, "access-control-allow-origin"), Some("*"));
    assert_eq!(header(&response, "access-control-allow-credentials"), None);
}
