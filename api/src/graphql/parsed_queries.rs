//! Parsed GraphQL documents by query text.
//!
//! Dashboards send the same few queries over and over, and parsing one
//! costs more than reading its rows. Validation still runs on every
//! request, against that request's variables.

use std::collections::HashMap;
use std::sync::Mutex;

use async_graphql::parser::types::ExecutableDocument;

/// Longest query text worth keeping; longer ones are parsed every time.
const MAX_QUERY_BYTES: usize = 16 * 1024;

/// A bounded map from query text to its parsed document.
#[derive(Debug)]
pub struct ParsedQueryCache {
    entries: Mutex<HashMap<String, ExecutableDocument>>,
    capacity: usize,
}

impl ParsedQueryCache {
    /// Keeps at most `capacity` documents (none when 0).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::with_capacity(capacity.min(1024))),
            capacity,
        }
    }

    /// Gives `request` its parsed document: from the cache, or parsed now
    /// and kept. A query that does not parse is left for execution to
    /// report.
    pub fn prepare(&self, request: &mut async_graphql::Request) {
        if self.capacity == 0 || request.query.len() > MAX_QUERY_BYTES {
            return;
        }
        let cached = self.lock().get(&request.query).cloned();
        if let Some(document) = cached {
            request.set_parsed_query(document);
            return;
        }
        let Ok(document) = request.parsed_query() else {
            return;
        };
        let document = document.clone();
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            // Evicting an arbitrary entry keeps a flood of one-off queries
            // from costing more than the parse they would pay anyway.
            if let Some(victim) = entries.keys().next().cloned() {
                entries.remove(&victim);
            }
        }
        entries.insert(request.query.clone(), document);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ExecutableDocument>> {
        // The map is always consistent between statements; a panic while
        // holding the lock cannot leave it half-written.
        self.entries
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl ParsedQueryCache {
        fn len(&self) -> usize {
            self.lock().len()
        }
    }

    #[test]
    fn reuses_documents_and_stays_bounded() {
        let cache = ParsedQueryCache::new(2);
        let mut first = async_graphql::Request::new("{ syncStates { resource } }");
        cache.prepare(&mut first);
        assert_eq!(cache.len(), 1);
        let mut again = async_graphql::Request::new("{ syncStates { resource } }");
        cache.prepare(&mut again);
        assert_eq!(cache.len(), 1);
        for query in ["{ a }", "{ b }", "{ c }"] {
            cache.prepare(&mut async_graphql::Request::new(query));
        }
        assert_eq!(cache.len(), 2);
        cache.prepare(&mut async_graphql::Request::new("{ not closed"));
        assert_eq!(cache.len(), 2);
        let long = format!("{{ {} }}", "a ".repeat(MAX_QUERY_BYTES));
        let empty = ParsedQueryCache::new(4);
        empty.prepare(&mut async_graphql::Request::new(long));
        assert_eq!(empty.len(), 0);
    }
}
