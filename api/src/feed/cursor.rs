//! Subscription and history cursors: opaque to clients, here `1:<event id>`
//! (the version, then the newest event already delivered).

/// Where a reader stands in the event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Every event up to this id has been delivered (or was not wanted).
    pub position: i64,
}

impl Cursor {
    /// A position in the log.
    pub fn at(position: i64) -> Self {
        Self { position }
    }

    /// The opaque text form.
    pub fn encode(self) -> String {
        format!("1:{}", self.position)
    }

    /// Parses the text form; `None` if it is not one of ours.
    pub fn decode(text: &str) -> Option<Self> {
        let position: i64 = text.strip_prefix("1:")?.parse().ok()?;
        (position >= 0).then(|| Self::at(position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        assert_eq!(
            Cursor::decode(&Cursor::at(42).encode()),
            Some(Cursor::at(42))
        );
        for junk in ["", "42", "2:42", "1:x", "1:-3", "1:1:2"] {
            assert_eq!(Cursor::decode(junk), None, "{junk}");
        }
    }
}
