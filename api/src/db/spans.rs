//! Trace spans of database work, by OpenTelemetry's conventions for
//! database clients: one per request transaction, one per statement in it.
//!
//! A statement is named by a summary of its text (`SELECT
//! vantage_sync_state`): its operation and the table it is mainly about,
//! taken from keywords and identifiers only. Literals, parameters and the
//! claims in a transaction's BEGIN never reach a span.
//!
//! The spans are DEBUG, so with traces off (and the default log filter)
//! they are never made, and no statement is summarised.

use tracing::Span;

/// The span of a request transaction, a child of the current span (the
/// GraphQL operation's, in a request).
pub(crate) fn transaction(access: &'static str) -> Span {
    tracing::debug_span!(
        "db.transaction",
        otel.name = "transaction",
        otel.kind = "client",
        db.system.name = "postgresql",
        vantage_sync.db.access = access,
    )
}

/// The W3C `traceparent` of `span`, when it is recorded and sampled: what
/// a write transaction leaves with the changes it logs, so that their
/// webhook deliveries link to it.
pub(crate) fn traceparent(span: &Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    let ids = context.span().span_context().clone();
    (ids.is_valid() && ids.is_sampled()).then(|| {
        format!(
            "00-{}-{}-{:02x}",
            ids.trace_id(),
            ids.span_id(),
            ids.trace_flags().to_u8()
        )
    })
}

/// The span of one statement of the transaction whose span is `parent`.
pub(crate) fn statement(parent: &Span, sql: &str) -> Span {
    if parent.is_disabled() {
        return Span::none();
    }
    let summary = Summary::of(sql);
    let name = summary.to_string();
    let span = tracing::debug_span!(
        parent: parent,
        "db.statement",
        otel.name = name.as_str(),
        otel.kind = "client",
        db.system.name = "postgresql",
        db.operation.name = summary.operation,
        db.collection.name = tracing::field::Empty,
        db.query.summary = name.as_str(),
    );
    if let Some(table) = &summary.table {
        span.record("db.collection.name", table.as_str());
    }
    span
}

/// The span of a statement that is not in the SQL text it sends, e.g. the
/// transaction's BEGIN (which carries the caller's claims) or COMMIT.
pub(crate) fn fixed_statement(parent: &Span, operation: &'static str) -> Span {
    tracing::debug_span!(
        parent: parent,
        "db.statement",
        otel.name = operation,
        otel.kind = "client",
        db.system.name = "postgresql",
        db.operation.name = operation,
        db.query.summary = operation,
    )
}

/// Operations a summary may name; any other first word is `OTHER`.
const OPERATIONS: [&str; 14] = [
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "WITH",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT",
    "RELEASE",
    "SET",
    "LOCK",
    "CALL",
    "VALUES",
];

/// A statement's operation and main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Summary {
    /// One of [`OPERATIONS`], or `OTHER`.
    pub operation: &'static str,
    /// The table (or set-returning function) read or written, unquoted,
    /// when one could be told.
    pub table: Option<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.table {
            Some(table) => write!(f, "{} {table}", self.operation),
            None => f.write_str(self.operation),
        }
    }
}

/// A token of SQL text that a summary may use.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A keyword or identifier, as written (unquoted).
    Word(String),
    Open,
    Close,
    Dot,
    /// Anything else: punctuation, a literal, a parameter, a number.
    Other,
}

/// The tokens of `sql`, string literals, comments and parameters reduced
/// to [`Token::Other`] without their text.
fn tokens(sql: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '-' if chars.peek() == Some(&'-') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
            }
            '\'' => {
                // A literal ('' inside is two literals in a row: same result).
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                }
                tokens.push(Token::Other);
            }
            '"' => {
                let mut name = String::new();
                for c in chars.by_ref() {
                    if c == '"' {
                        break;
                    }
                    name.push(c);
                }
                tokens.push(Token::Word(name));
            }
            '(' => tokens.push(Token::Open),
            ')' => tokens.push(Token::Close),
            '.' => tokens.push(Token::Dot),
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut word = String::from(c);
                while let Some(&next) = chars.peek() {
                    if next.is_ascii_alphanumeric() || next == '_' || next == '$' {
                        word.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push(Token::Word(word));
            }
            _ => {
                // Numbers, $1 and the like: their text is skipped.
                while chars
                    .peek()
                    .is_some_and(|next| next.is_ascii_alphanumeric() || *next == '_')
                {
                    chars.next();
                }
                tokens.push(Token::Other);
            }
        }
    }
    tokens
}

/// An identifier fit to name a table in a span: lower-case letters,
/// digits and underscores, as every name of this schema is.
fn identifier(word: &str) -> Option<&str> {
    let fits = !word.is_empty()
        && word.len() <= 63
        && word
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !word.starts_with(|c: char| c.is_ascii_digit());
    fits.then_some(word)
}

impl Summary {
    /// The summary of `sql`.
    pub(crate) fn of(sql: &str) -> Self {
        let tokens = tokens(sql);
        // (token, depth) at the statement's top level only.
        let mut depth = 0_usize;
        let mut top = Vec::new();
        for (index, token) in tokens.iter().enumerate() {
            match token {
                Token::Open => depth += 1,
                Token::Close => depth = depth.saturating_sub(1),
                _ if depth == 0 => top.push(index),
                _ => {}
            }
        }
        let word_at = |index: usize| match tokens.get(index) {
            Some(Token::Word(word)) => Some(word.as_str()),
            _ => None,
        };
        let keyword = |index: usize, keyword: &str| {
            word_at(index).is_some_and(|word| word.eq_ignore_ascii_case(keyword))
        };
        let Some(first) = top.first().and_then(|&index| word_at(index)) else {
            return Self {
                operation: "OTHER",
                table: None,
            };
        };
        let mut operation = OPERATIONS
            .iter()
            .find(|operation| first.eq_ignore_ascii_case(operation))
            .copied()
            .unwrap_or("OTHER");
        // A WITH query is named by its main statement, after its CTEs.
        if operation == "WITH" {
            operation = top
                .iter()
                .skip(1)
                .filter_map(|&index| word_at(index))
                .find_map(|word| {
                    ["SELECT", "INSERT", "UPDATE", "DELETE"]
                        .into_iter()
                        .find(|operation| word.eq_ignore_ascii_case(operation))
                })
                .unwrap_or("WITH");
        }
        let anchor = match operation {
            "SELECT" | "DELETE" => "FROM",
            "INSERT" => "INTO",
            "UPDATE" => "UPDATE",
            _ => {
                return Self {
                    operation,
                    table: None,
                };
            }
        };
        let table = top
            .iter()
            .position(|&index| keyword(index, anchor))
            .and_then(|at| {
                let name = *top.get(at + 1)?;
                // schema.table: the table.
                let name = match (tokens.get(name + 1), tokens.get(name + 2)) {
                    (Some(Token::Dot), Some(Token::Word(_))) => name + 2,
                    _ => name,
                };
                identifier(word_at(name)?).map(str::to_owned)
            });
        Self { operation, table }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(sql: &str) -> String {
        Summary::of(sql).to_string()
    }

    #[test]
    fn statements_are_named_by_operation_and_table() {
        assert_eq!(
            summary(
                r#"SELECT "vantage_sync_state"."resource" FROM "vantage_sync_state" WHERE "resource" = $1"#
            ),
            "SELECT vantage_sync_state"
        );
        assert_eq!(
            summary("select * from public.vantage_sync_events where id > $1"),
            "SELECT vantage_sync_events"
        );
        assert_eq!(
            summary(r#"INSERT INTO "idempotency_keys" ("key") VALUES ($1)"#),
            "INSERT idempotency_keys"
        );
        assert_eq!(
            summary("UPDATE webhooks SET x = 'secret' WHERE id = 1"),
            "UPDATE webhooks"
        );
        assert_eq!(
            summary("SELECT * FROM vantage_sync_start($1, $2)"),
            "SELECT vantage_sync_start"
        );
        assert_eq!(summary("SAVEPOINT request_step"), "SAVEPOINT");
        assert_eq!(summary("VACUUM"), "OTHER");
        assert_eq!(summary(""), "OTHER");
    }

    #[test]
    fn subqueries_and_ctes_give_way_to_the_main_statement() {
        assert_eq!(
            summary("SELECT (SELECT 1 FROM a) AS x FROM main_table"),
            "SELECT main_table"
        );
        assert_eq!(
            summary("-- a comment FROM nowhere\nWITH s AS (SELECT 1 FROM t) SELECT * FROM s"),
            "SELECT s"
        );
    }

    #[test]
    fn literals_never_name_a_table() {
        assert_eq!(summary("SELECT 1 FROM 'vantage'"), "SELECT");
        assert_eq!(summary("SELECT 1 FROM \"Marker Name\""), "SELECT");
        assert_eq!(summary("SELECT 'from x' AS y"), "SELECT");
    }
}
