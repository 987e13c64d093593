//! Objects whose fields are plain values already in memory, resolved in one
//! pass over the selection set.
//!
//! async-graphql resolves every field of an object through a boxed future
//! of its own, joined per object, and for the dashboard query (every row,
//! every field) that machinery costs more than the values. A `SyncState`
//! row and its errors need no I/O, so here their selection set is walked
//! once and each value computed directly (`docs/adr/0002`).
//! Whatever the walk does not know (a field that reads the database, a
//! custom directive) hands the whole object back to async-graphql's own
//! resolution. Both paths come from one field list ([`in_memory_object!`]),
//! so they compute the same values; a test compares the walk's handling
//! of aliases, merges and fragments with async-graphql's.

use std::collections::HashMap;

use async_graphql::indexmap::IndexMap;
use async_graphql::indexmap::map::Entry;
use async_graphql::parser::types::{Field, FragmentDefinition, Selection, SelectionSet};
use async_graphql::{ContextSelectionSet, Name, Positioned, Value};

/// An object that can compute its fields without async-graphql's resolvers.
pub trait InMemoryObject {
    /// Its GraphQL type name, for `__typename` and fragment conditions.
    const TYPE_NAME: &'static str;

    /// The value of `field` as its resolver would give it, or `None` when
    /// it needs the resolver (the whole object is then resolved that way).
    fn in_memory_value(&self, field: &Positioned<Field>, walk: &Walk<'_>) -> Option<Value>;
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
    pub fn object<T: InMemoryObject>(
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

    fn collect<T: InMemoryObject>(
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
                        object.in_memory_value(field, self)?
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

/// A field's value as the in-memory walk sends it: what async-graphql's own
/// resolution of the same type would give.
pub trait InMemoryValue {
    /// The value of `field`, or `None` when it needs the resolvers.
    fn in_memory_value(self, field: &Positioned<Field>, walk: &Walk<'_>) -> Option<Value>;
}

macro_rules! in_memory_scalars {
    ($($ty:ty),*) => {$(
        impl InMemoryValue for $ty {
            fn in_memory_value(self, _: &Positioned<Field>, _: &Walk<'_>) -> Option<Value> {
                Some(async_graphql::ScalarType::to_value(&self))
            }
        }
    )*};
}
in_memory_scalars!(i32, f64, chrono::DateTime<chrono::Utc>);

impl InMemoryValue for &str {
    fn in_memory_value(self, _: &Positioned<Field>, _: &Walk<'_>) -> Option<Value> {
        Some(Value::String(self.to_owned()))
    }
}

impl<T: serde::Serialize> InMemoryValue for async_graphql::Json<T> {
    fn in_memory_value(self, _: &Positioned<Field>, _: &Walk<'_>) -> Option<Value> {
        Some(async_graphql::to_value(self).unwrap_or_default())
    }
}

impl<T: InMemoryValue> InMemoryValue for Option<T> {
    fn in_memory_value(self, field: &Positioned<Field>, walk: &Walk<'_>) -> Option<Value> {
        match self {
            Some(value) => value.in_memory_value(field, walk),
            None => Some(Value::Null),
        }
    }
}

impl<T: InMemoryValue> InMemoryValue for Vec<T> {
    fn in_memory_value(self, field: &Positioned<Field>, walk: &Walk<'_>) -> Option<Value> {
        self.into_iter()
            .map(|item| item.in_memory_value(field, walk))
            .collect::<Option<_>>()
            .map(Value::List)
    }
}

/// An enum's value, as async-graphql writes it.
macro_rules! in_memory_enums {
    ($($ty:ty),*) => {$(
        impl $crate::graphql::in_memory::InMemoryValue for $ty {
            fn in_memory_value(
                self,
                _: &async_graphql::Positioned<async_graphql::parser::types::Field>,
                _: &$crate::graphql::in_memory::Walk<'_>,
            ) -> Option<async_graphql::Value> {
                Some(async_graphql::resolver_utils::enum_value(self))
            }
        }
    )*};
}
pub(crate) use in_memory_enums;

/// An object whose fields are computed from what is in memory, each field
/// written once: the list makes both the derived `#[Object]` resolvers
/// (which give the schema its type, and resolve the object when the walk
/// cannot) and the walk's table of values. Resolvers that need more (the
/// database, the context) go in the trailing `resolvers { ... }` block; the
/// walk hands an object that selects one of them back to async-graphql.
macro_rules! in_memory_object {
    (
        $(#[$meta:meta])*
        impl $type:ty as $name:literal $(where lifetime $lt:lifetime)? {
            $(
                $(#[doc = $doc:literal])*
                $field:literal => fn $method:ident(&$this:ident) -> $ty:ty $body:block
            )*
        }
        resolvers { $($resolvers:tt)* }
    ) => {
        $(#[$meta])*
        #[async_graphql::Object(name = $name)]
        impl $(<$lt>)? $type {
            $(
                $(#[doc = $doc])*
                #[graphql(name = $field)]
                #[allow(unused_braces)]
                async fn $method(&self) -> $ty {
                    let $this = self;
                    $body
                }
            )*
            $($resolvers)*
        }

        impl $(<$lt>)? $crate::graphql::in_memory::InMemoryValue for $type {
            fn in_memory_value(
                self,
                field: &async_graphql::Positioned<async_graphql::parser::types::Field>,
                walk: &$crate::graphql::in_memory::Walk<'_>,
            ) -> Option<async_graphql::Value> {
                walk.object(&self, &field.node.selection_set.node)
            }
        }

        impl $(<$lt>)? $crate::graphql::in_memory::InMemoryObject for $type {
            const TYPE_NAME: &'static str = $name;

            #[allow(unused_braces)]
            fn in_memory_value(
                &self,
                field: &async_graphql::Positioned<async_graphql::parser::types::Field>,
                walk: &$crate::graphql::in_memory::Walk<'_>,
            ) -> Option<async_graphql::Value> {
                match field.node.name.node.as_str() {
                    $(
                        $field => {
                            let $this = self;
                            let value: $ty = $body;
                            $crate::graphql::in_memory::InMemoryValue::in_memory_value(value, field, walk)
                        }
                    )*
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use in_memory_object;
