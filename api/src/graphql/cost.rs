//! What a request may cost the database, known before it runs:
//! each root field that reads weighs its reads, and a request over
//! `MAX_DB_READS_PER_REQUEST` is refused before any database work. Every
//! field as written counts, so the weight is an upper bound: identical root
//! fields of a query (same name and arguments, under aliases) are then read
//! only once (`OperationContext::read_once`).

use async_graphql::parser::types::{
    ExecutableDocument, OperationDefinition, Selection, SelectionSet,
};

/// Database reads of a root field, at most.
fn field_reads(name: &str) -> usize {
    match name {
        "__schema" | "__type" | "__typename" => 0,
        // The pruning point and a page; failure streaks and the states;
        // firing and resolved alerts (`firing: null`); the webhook and its
        // log, or its ping.
        "syncHistory" | "repeatedFailures" | "alerts" | "webhookDeliveries" | "testWebhook" => 2,
        _ => 1,
    }
}

/// The database reads `operation` makes at most: each root field's weight,
/// plus one if any selection asks for `consecutiveFailures` (read once per
/// request).
pub fn database_reads(document: &ExecutableDocument, operation: &OperationDefinition) -> usize {
    let mut roots = Vec::new();
    root_fields(document, &operation.selection_set.node, &mut roots, 0);
    let mut reads: usize = roots.iter().map(|name| field_reads(name)).sum();
    if asks_for(
        document,
        &operation.selection_set.node,
        "consecutiveFailures",
        0,
    ) {
        reads += 1;
    }
    reads
}

/// The root fields' names, through fragments.
fn root_fields(
    document: &ExecutableDocument,
    set: &SelectionSet,
    out: &mut Vec<String>,
    depth: usize,
) {
    // Deeper than any valid document nests fragments at its root; a cycle
    // (refused later by validation) stops here.
    if depth > 32 {
        return;
    }
    for selection in &set.items {
        match &selection.node {
            Selection::Field(field) => out.push(field.node.name.node.to_string()),
            Selection::FragmentSpread(spread) => {
                if let Some(fragment) = document.fragments.get(&spread.node.fragment_name.node) {
                    root_fields(document, &fragment.node.selection_set.node, out, depth + 1);
                }
            }
            Selection::InlineFragment(inline) => {
                root_fields(document, &inline.node.selection_set.node, out, depth + 1);
            }
        }
    }
}

/// Whether any selection under `set` names `wanted`.
fn asks_for(document: &ExecutableDocument, set: &SelectionSet, wanted: &str, depth: usize) -> bool {
    if depth > 64 {
        return false;
    }
    set.items.iter().any(|selection| match &selection.node {
        Selection::Field(field) => {
            field.node.name.node == wanted
                || asks_for(document, &field.node.selection_set.node, wanted, depth + 1)
        }
        Selection::FragmentSpread(spread) => document
            .fragments
            .get(&spread.node.fragment_name.node)
            .is_some_and(|fragment| {
                asks_for(
                    document,
                    &fragment.node.selection_set.node,
                    wanted,
                    depth + 1,
                )
            }),
        Selection::InlineFragment(inline) => {
            asks_for(document, &inline.node.selection_set.node, wanted, depth + 1)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(query: &str) -> usize {
        let document = async_graphql::parser::parse_query(query).unwrap();
        let operation = document.operations.iter().next().unwrap().1;
        database_reads(&document, &operation.node)
    }

    #[test]
    fn root_fields_weigh_their_reads_as_written() {
        assert_eq!(reads("{ __typename __schema { types { name } } }"), 0);
        assert_eq!(reads("{ syncStates { resource } }"), 1);
        // An upper bound: the second is then read from the first.
        assert_eq!(
            reads("{ a: syncStates { resource } b: syncStates { health } }"),
            2
        );
        assert_eq!(
            reads(
                "{ a: syncState(resource: \"x\") { resource } b: syncState(resource: \"y\") { resource } }"
            ),
            2
        );
        assert_eq!(
            reads("{ syncStates { consecutiveFailures } failedSyncs { resource } }"),
            3
        );
        assert_eq!(
            reads("{ syncHistory { edges { cursor } } repeatedFailures { resource } }"),
            4
        );
        assert_eq!(
            reads(
                "{ alerts { resource } webhookDeliveries(webhookId: \"x\") { edges { cursor } } webhooks { id } }"
            ),
            5
        );
        assert_eq!(
            reads(
                "{ ...F ... on Query { syncStats { failed } } } fragment F on Query { syncStates { ...G } } fragment G on SyncState { consecutiveFailures }"
            ),
            3
        );
        assert_eq!(
            reads(
                "mutation { a: startSync(resource: \"x\") { resource } b: startSync(resource: \"x\") { resource } }"
            ),
            2
        );
        // A fragment cycle (refused later by validation) ends.
        assert_eq!(reads("{ ...A } fragment A on Query { ...A }"), 0);
    }
}
