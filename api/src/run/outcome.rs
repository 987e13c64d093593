//! What to mark once the job has ended: completed with the counts of its
//! result file, or failed with why (its exit code or signal, a result
//! file that cannot be used), the tail of its standard error and the
//! errors it reported, within what one `failSync` records.

use std::io::Read;
use std::path::Path;

use entity::SyncError;
use serde_json::{Map, Value};

use crate::graphql::validate::{MAX_ERRORS, MAX_ERRORS_BYTES};

use super::api::{Counts, Transition};
use super::job::{Exit, JobEnd, signal_name};
use super::{KILL_GRACE, RESULT_VAR};

/// Largest result file read.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Longest message of one recorded error; longer ones are cut.
const MAX_MESSAGE_BYTES: usize = 4 * 1024;
/// Room kept for the note that says errors were left out.
const NOTE_BYTES: usize = 512;

const FIELDS: [&str; 4] = [
    "recordsSynced",
    "recordsCreated",
    "recordsUpdated",
    "errors",
];
const ERROR_FIELDS: [&str; 5] = ["code", "message", "recordId", "timestamp", "details"];

/// What the job wrote in its result file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Its counts; zero where it gave none.
    pub counts: Counts,
    /// The errors to record if it fails.
    pub errors: Vec<SyncError>,
}

/// The result file at `path`: none if the job wrote none, or what is
/// wrong with it.
pub fn read(path: &Path) -> Result<Option<Report>, String> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_file() => {}
        // Opening a FIFO would wait for a writer.
        Ok(_) => return Err("it is not a regular file".into()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("cannot read it: {error}")),
    }
    let file = std::fs::File::open(path).map_err(|error| format!("cannot read it: {error}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| format!("cannot read it: {error}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "it is larger than {} MiB",
            MAX_FILE_BYTES / 1024 / 1024
        ));
    }
    let text = String::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_owned())?;
    parse(&text).map(Some)
}

/// Reads a result file's text.
pub fn parse(text: &str) -> Result<Report, String> {
    let value: Value = serde_json::from_str(text).map_err(|error| {
        format!("it is not JSON ({error}); write an object such as {{\"recordsSynced\": 10, \"recordsCreated\": 2, \"recordsUpdated\": 3}}")
    })?;
    let Value::Object(object) = value else {
        return Err(format!(
            "it holds {}, not a JSON object such as {{\"recordsSynced\": 10, \"recordsCreated\": 2, \"recordsUpdated\": 3}}",
            kind(&value)
        ));
    };
    if let Some(key) = object.keys().find(|key| !FIELDS.contains(&key.as_str())) {
        return Err(format!(
            "unknown field {:?}: the fields are recordsSynced, recordsCreated, recordsUpdated and errors",
            clip(key, 100)
        ));
    }
    let counts = Counts {
        synced: count(&object, "recordsSynced")?,
        created: count(&object, "recordsCreated")?,
        updated: count(&object, "recordsUpdated")?,
    };
    if i64::from(counts.created) + i64::from(counts.updated) > i64::from(counts.synced) {
        return Err(format!(
            "recordsCreated + recordsUpdated ({} + {}) exceeds recordsSynced ({}), which counts every record processed",
            counts.created, counts.updated, counts.synced
        ));
    }
    let errors = match object.get("errors") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| error(index, item))
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(format!(
                "errors holds {}, not an array of {{\"code\": ..., \"message\": ...}} objects",
                kind(other)
            ));
        }
    };
    Ok(Report { counts, errors })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn count(object: &Map<String, Value>, name: &str) -> Result<i32, String> {
    match object.get(name) {
        None | Some(Value::Null) => Ok(0),
        Some(value) => value
            .as_i64()
            .and_then(|number| i32::try_from(number).ok())
            .filter(|number| *number >= 0)
            .ok_or_else(|| {
                format!(
                    "{name} must be a whole number from 0 to {}, not {}",
                    i32::MAX,
                    clip(&value.to_string(), 40)
                )
            }),
    }
}

fn error(index: usize, item: &Value) -> Result<SyncError, String> {
    let Value::Object(fields) = item else {
        return Err(format!(
            "errors[{index}] holds {}, not an object with a code and a message",
            kind(item)
        ));
    };
    if let Some(key) = fields
        .keys()
        .find(|key| !ERROR_FIELDS.contains(&key.as_str()))
    {
        return Err(format!(
            "errors[{index}] has an unknown field {:?}: an error has a code and a message, and may have a recordId, a timestamp and details",
            clip(key, 100)
        ));
    }
    let present = |name: &str| fields.get(name).filter(|value| !value.is_null());
    let code = present("code")
        .and_then(Value::as_str)
        .filter(|code| !code.trim().is_empty())
        .ok_or_else(|| format!("errors[{index}].code must be a string, not empty"))?;
    let message = present("message")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("errors[{index}].message must be a string"))?;
    let record_id = match present("recordId") {
        None => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => return Err(format!("errors[{index}].recordId must be a string")),
    };
    let timestamp = match present("timestamp") {
        None => None,
        Some(value) => Some(
            value
                .as_str()
                .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
                .ok_or_else(|| {
                    format!(
                        "errors[{index}].timestamp must be a date and time in RFC 3339, e.g. 2026-03-02T09:05:12Z"
                    )
                })?,
        ),
    };
    Ok(SyncError {
        code: code.to_owned(),
        message: clip(message, MAX_MESSAGE_BYTES),
        record_id,
        timestamp,
        details: present("details").cloned(),
    })
}

/// At most `max` bytes of `text`, cut at a character and marked "…" if cut.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The transition that records the job's end: completed with its counts
/// when it exited 0 on its own with a usable (or no) result file, else
/// failed.
pub fn transition(end: &JobEnd, report: &Result<Option<Report>, String>) -> Transition {
    let exited_zero = matches!(end.exit, Exit::Code(0)) && end.stopped_by.is_none();
    if exited_zero && let Ok(report) = report {
        return Transition::Complete(
            report
                .as_ref()
                .map(|report| report.counts)
                .unwrap_or_default(),
        );
    }
    let mut errors = Errors::default();
    if let Some(cause) = cause(end) {
        errors.push(cause);
    }
    if let Err(problem) = report {
        errors.push(SyncError {
            code: "INVALID_RESULT_FILE".into(),
            message: clip(
                &format!("the result file ({RESULT_VAR}) is invalid: {problem}"),
                MAX_MESSAGE_BYTES,
            ),
            ..SyncError::default()
        });
    }
    if !end.stderr_tail.is_empty() {
        errors.push(SyncError {
            code: "STDERR".into(),
            message: end.stderr_tail.clone(),
            ..SyncError::default()
        });
    }
    if let Ok(Some(report)) = report {
        for error in &report.errors {
            errors.push(error.clone());
        }
    }
    Transition::Fail(errors.finish())
}

/// Why the run failed, when the job did not simply exit 0.
fn cause(end: &JobEnd) -> Option<SyncError> {
    let (code, message) = match (&end.exit, end.stopped_by) {
        (exit, Some(signal)) => {
            let name = signal_name(signal.as_raw());
            let then = if end.killed {
                format!(
                    "did not stop within {} s and was killed (SIGKILL)",
                    KILL_GRACE.as_secs()
                )
            } else {
                match exit {
                    Exit::Killed(number) if *number == signal.as_raw() => "was killed by it".into(),
                    _ => end.ended(),
                }
            };
            (
                format!("SIGNAL_{name}"),
                format!(
                    "vantage-sync run received {name} and passed it on to the job, which then {then}"
                ),
            )
        }
        (Exit::Code(0), None) => return None,
        (Exit::Code(code), None) => (format!("EXIT_{code}"), end.describe()),
        (Exit::Killed(number), None) => {
            let name = signal_name(*number);
            let code = match name.strip_prefix("SIG") {
                Some(_) => format!("SIGNAL_{name}"),
                None => format!("SIGNAL_{number}"),
            };
            (code, end.describe())
        }
        (Exit::NotStarted { .. }, None) => ("CANNOT_START".into(), end.describe()),
    };
    Some(SyncError {
        code,
        message,
        ..SyncError::default()
    })
}

/// A failure's errors, kept within what one `failSync` records: the first
/// that fit, and a note saying how many more were left out.
#[derive(Default)]
struct Errors {
    kept: Vec<SyncError>,
    /// Their size as a JSON array.
    bytes: usize,
    left_out: usize,
}

impl Errors {
    fn push(&mut self, error: SyncError) {
        let size = serde_json::to_vec(&error).map_or(usize::MAX, |json| json.len());
        // The array's brackets, and a comma before each but the first.
        let grown = self
            .bytes
            .max(2)
            .saturating_add(size)
            .saturating_add(usize::from(!self.kept.is_empty()));
        let fits = self.left_out == 0
            && self.kept.len() < MAX_ERRORS - 1
            && grown <= MAX_ERRORS_BYTES - NOTE_BYTES;
        if fits {
            self.kept.push(error);
            self.bytes = grown;
        } else {
            self.left_out += 1;
        }
    }

    fn finish(mut self) -> Vec<SyncError> {
        if self.left_out > 0 {
            self.kept.push(SyncError {
                code: "ERRORS_TRUNCATED".into(),
                message: format!(
                    "{} more errors were left out: a failed sync records at most {MAX_ERRORS} errors and {} KiB of them as JSON",
                    self.left_out,
                    MAX_ERRORS_BYTES / 1024
                ),
                ..SyncError::default()
            });
        }
        self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graphql::validate;

    fn end(exit: Exit, stderr_tail: &str) -> JobEnd {
        JobEnd {
            exit,
            stopped_by: None,
            killed: false,
            stderr_tail: stderr_tail.into(),
        }
    }

    fn counts(synced: i32, created: i32, updated: i32) -> Counts {
        Counts {
            synced,
            created,
            updated,
        }
    }

    #[test]
    fn a_result_file_gives_counts_and_errors() {
        let report = parse(
            r#"{"recordsSynced": 10, "recordsCreated": 2, "recordsUpdated": 3,
                "errors": [{"code": "HTTP_503", "message": "down", "recordId": "f-1",
                            "timestamp": "2026-03-02T09:05:12Z", "details": {"try": 2}}]}"#,
        )
        .unwrap();
        assert_eq!(report.counts, counts(10, 2, 3));
        assert_eq!(report.errors[0].code, "HTTP_503");
        assert_eq!(report.errors[0].record_id.as_deref(), Some("f-1"));
        assert!(report.errors[0].timestamp.is_some());
        assert_eq!(parse("{}").unwrap(), Report::default());
        assert_eq!(
            parse(r#"{"recordsSynced": 4}"#).unwrap().counts,
            counts(4, 0, 0)
        );
    }

    #[test]
    fn a_result_path_that_is_not_a_file_is_invalid() {
        let dir = std::env::temp_dir().join(format!("vantage-sync-outcome-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read(&dir.join("missing")), Ok(None));
        assert!(read(&dir).unwrap_err().contains("not a regular file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn what_is_wrong_with_a_result_file_is_said() {
        for (text, says) in [
            ("", "not JSON"),
            ("done", "not JSON"),
            ("[1]", "an array, not a JSON object"),
            (
                r#"{"recordsSynced": -1}"#,
                "recordsSynced must be a whole number from 0",
            ),
            (
                r#"{"recordsSynced": 1.5}"#,
                "recordsSynced must be a whole number",
            ),
            (
                r#"{"recordsSynced": "10"}"#,
                "recordsSynced must be a whole number",
            ),
            (
                r#"{"recordsSynced": 3000000000}"#,
                "recordsSynced must be a whole number",
            ),
            (
                r#"{"recordsSynced": 4, "recordsCreated": 3, "recordsUpdated": 2}"#,
                "recordsCreated + recordsUpdated (3 + 2) exceeds recordsSynced (4)",
            ),
            (r#"{"recordSynced": 4}"#, "unknown field \"recordSynced\""),
            (r#"{"errors": "bad"}"#, "errors holds a string"),
            (
                r#"{"errors": [{"message": "m"}]}"#,
                "errors[0].code must be a string",
            ),
            (
                r#"{"errors": [{"code": " ", "message": "m"}]}"#,
                "errors[0].code must be a string, not empty",
            ),
            (
                r#"{"errors": [{"code": "X"}]}"#,
                "errors[0].message must be a string",
            ),
            (
                r#"{"errors": [{"code": "X", "message": "m", "when": 1}]}"#,
                "unknown field \"when\"",
            ),
            (
                r#"{"errors": [{"code": "X", "message": "m", "timestamp": "now"}]}"#,
                "RFC 3339",
            ),
        ] {
            let problem = parse(text).unwrap_err();
            assert!(problem.contains(says), "{text}: {problem}");
        }
    }

    #[test]
    fn a_job_that_exits_0_completes_with_its_counts() {
        let report = Ok(Some(Report {
            counts: counts(5, 1, 1),
            errors: vec![],
        }));
        assert_eq!(
            transition(&end(Exit::Code(0), "warning"), &report),
            Transition::Complete(counts(5, 1, 1))
        );
        assert_eq!(
            transition(&end(Exit::Code(0), ""), &Ok(None)),
            Transition::Complete(Counts::default())
        );
    }

    #[test]
    fn a_failure_says_why_first() {
        let Transition::Fail(errors) = transition(&end(Exit::Code(3), "boom\nbang"), &Ok(None))
        else {
            panic!("not a failure");
        };
        let codes: Vec<&str> = errors.iter().map(|error| error.code.as_str()).collect();
        assert_eq!(codes, ["EXIT_3", "STDERR"]);
        assert_eq!(errors[0].message, "the job exited with code 3");
        assert_eq!(errors[1].message, "boom\nbang");

        let Transition::Fail(errors) =
            transition(&end(Exit::Code(0), ""), &Err("it is not JSON".into()))
        else {
            panic!("not a failure");
        };
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].code, "INVALID_RESULT_FILE");
        assert!(errors[0].message.contains("VANTAGE_SYNC_RESULT"));

        let Transition::Fail(errors) = transition(&end(Exit::Killed(9), ""), &Ok(None)) else {
            panic!("not a failure");
        };
        assert_eq!(errors[0].code, "SIGNAL_SIGKILL");

        let mut stopped = end(Exit::Code(0), "");
        stopped.stopped_by = Some(rustix::process::Signal::TERM);
        let Transition::Fail(errors) = transition(&stopped, &Ok(None)) else {
            panic!("a job told to stop fails");
        };
        assert_eq!(errors[0].code, "SIGNAL_SIGTERM");
        assert!(errors[0].message.contains("exited with code 0"));
    }

    #[test]
    fn too_many_errors_are_cut_to_what_the_server_records() {
        let many = |count: usize, size: usize| Report {
            counts: Counts::default(),
            errors: (0..count)
                .map(|index| SyncError {
                    code: format!("E{index}"),
                    message: "m".repeat(size),
                    ..SyncError::default()
                })
                .collect(),
        };
        for (count, size) in [(5_000, 1), (900, 1_000), (100, 4_000)] {
            let Transition::Fail(errors) =
                transition(&end(Exit::Code(1), "tail"), &Ok(Some(many(count, size))))
            else {
                panic!("not a failure");
            };
            let last = errors.last().unwrap();
            assert_eq!(last.code, "ERRORS_TRUNCATED", "{count} x {size}");
            assert!(validate::errors(errors.clone()).is_ok(), "{count} x {size}");
            assert_eq!(errors[0].code, "EXIT_1");
            assert_eq!(errors[1].code, "STDERR");
        }
        let Transition::Fail(errors) = transition(&end(Exit::Code(1), ""), &Ok(Some(many(10, 10))))
        else {
            panic!("not a failure");
        };
        assert_eq!(errors.len(), 11);
    }
}
