//! Objects whose fields are plain values already in memory, resolved in one
//! pass over the selection set.
//!
//! async-graphql resolves every field of an object through a boxed future
//! of its own, joined per object: for the dashboard query (7 rows of 20
//! fields) that machinery was a seventh of the server's CPU (README,
//! Performance). A `SyncState` row and its errors need no I/O, so here
//! their selection set is walked once and each value computed directly.
//! Whatever the walk does not know (a field that reads the database, a
//! custom directive) hands the whole object back to async-graphql's own
//! resolution: the two paths give the same response (a test compares
//! them), only the cost differs.

use std::collections::HashMap;

use async_graphql::indexmap::IndexMap;
use async_graphql::indexmap::map::Entry;
use async_graphql::parser::types::{Field, FragmentDefinition, Selection, SelectionSet};
use async_graphql::{ContextSelectionSet, Name, Positioned, Value};

/// An object that can compute its fields without async-graphql's resolvers.
pub trait PlainObject {
    /// Its GraphQL type name, for `__typename` and fragment conditions.
    const TYPE_NAME: &'static str;

    /// The value of `field` as its resolver would give it, or `None` when
    /// it needs the resolver (the whole object is then resolved that way).
    fn plain_value(&self, field: &Positioned<Field>, walk: &Walk<'_>) -> Option<Value>;
}

/// One pass over selection sets of a request.
pub struct Walk<'a> {
    fragments: &'a HashMap<Name, Positioned<FragmentDefinition>>,
}

impl<'a> Walk<'a> {
    /// A walk for the request of `ctx`. The schema installs no extension
    /// (`graphql::builder`); one that must see every field resolved would
    /// need this walk left out.
    pub fn new(ctx: &ContextSelectionSet<'a>) -> Self {
        Self {
            fragments: &ctx.query_env.fragments,
        }
    }

    /// `object` with the fields `selection_set` selects, as async-graphql
    /// shapes it (null when nothing is selected), or `None` when a field
    /// needs its resolver.
    pub fn object<T: PlainObject>(
        &self,
        object: &T,
        selection_set: &SelectionSet,
    ) -> Option<Value> {
        let mut fields = IndexMap::with_capacity(selection_set.items.len());
        self.collect(object, selection_set, &mut fields)?;
        Some(if fields.is_empty() {
            Value::Null
        } else {
            Value::Object(fields)
        })
    }

    fn collect<T: PlainObject>(
        &self,
        object: &T,
        selection_set: &SelectionSet,
        into: &mut IndexMap<Name, Value>,
    ) -> Option<()> {
        // @skip and @include were applied (and removed) before execution;
        // any directive left is a custom one, for the resolvers to run.
        for selection in &selection_set.items {
            match &selection.node {
                Selection::Field(field) => {
                    if !field.node.directives.is_empty() {
                        return None;
                    }
                    let value = if field.node.name.node == "__typename" {
                        Value::String(T::TYPE_NAME.to_owned())
                    } else {
                        object.plain_value(field, self)?
                    };
                    merge(into, field.node.response_key().node.clone(), value);
                }
                Selection::FragmentSpread(spread) => {
                    let fragment = self.fragments.get(&spread.node.fragment_name.node)?;
                    if fragment.node.type_condition.node.on.node == T::TYPE_NAME {
                        self.collect(object, &fragment.node.selection_set.node, into)?;
                    }
                }
                Selection::InlineFragment(fragment) => {
                    let applies = fragment
                        .node
                        .type_condition
                        .as_ref()
                        .is_none_or(|condition| condition.node.on.node == T::TYPE_NAME);
                    if applies {
                        self.collect(object, &fragment.node.selection_set.node, into)?;
                    }
                }
            }
        }
        Some(())
    }
}

/// Adds a field's value as async-graphql does when a response key is
/// selected more than once: objects (and lists of objects) merge, anything
/// else keeps the first value.
fn merge(into: &mut IndexMap<Name, Value>, key: Name, value: Value) {
    let previous = match into.entry(key) {
        Entry::Vacant(entry) => {
            entry.insert(value);
            return;
        }
        Entry::Occupied(entry) => entry.into_mut(),
    };
    match (previous, value) {
        (Value::Object(previous), Value::Object(object)) => merge_objects(previous, object),
        (Value::List(previous), Value::List(list)) => {
            for (previous, value) in previous.iter_mut().zip(list) {
                if let (Value::Object(previous), Value::Object(object)) = (previous, value) {
                    merge_objects(previous, object);
                }
            }
        }
        _ => {}
    }
}

fn merge_objects(into: &mut IndexMap<Name, Value>, object: IndexMap<Name, Value>) {
    for (key, value) in object {
        merge(into, key, value);
    }
}
