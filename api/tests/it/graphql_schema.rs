//! The GraphQL schema as committed: `schema.graphql` is what the code
//! generates, so schema tooling and reviewers see every change.

/// The committed schema.graphql is what the code generates.
#[test]
fn committed_schema_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema.graphql");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == vantage_sync::graphql::sdl(),
        "schema.graphql is out of date: run `cargo run -p vantage-sync -- schema > schema.graphql`"
    );
}
