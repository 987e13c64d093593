//! Subscription and history cursors. Opaque to clients; here they are
//! `1:<event id>` or, for positions inside a snapshot subscription,
//! `1:<event id>:<newest>:<xmin>:<xmax>:<running xids joined by '-'>`.

use crate::db::events::Snapshot;

/// Where a reader stands in the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Every event up to this id has been delivered (or was not wanted).
    pub position: i64,
    /// For positions reached from a SNAPSHOT: events up to `newest` whose
    /// writer the snapshot saw are already reflected in it.
    pub snapshot: Option<(i64, Snapshot)>,
}

impl Cursor {
    /// A position in the log.
    pub fn at(position: i64) -> Self {
        Self {
            position,
            snapshot: None,
        }
    }

    /// Whether the event (`id`, written by `xid`) is already reflected in
    /// this cursor's snapshot, so must not be delivered again.
    pub fn covers(&self, id: i64, xid: i64) -> bool {
        id <= self.position
            || self
                .snapshot
                .as_ref()
                .is_some_and(|(newest, snapshot)| id <= *newest && snapshot.sees(xid))
    }

    /// This cursor moved to `id`; the snapshot is dropped once past it.
    pub fn advance(&mut self, id: i64) {
        self.position = self.position.max(id);
        if self
            .snapshot
            .as_ref()
            .is_some_and(|(newest, _)| self.position >= *newest)
        {
            self.snapshot = None;
        }
    }

    /// The opaque text form.
    pub fn encode(&self) -> String {
        match &self.snapshot {
            None => format!("1:{}", self.position),
            Some((newest, snapshot)) => {
                let running: Vec<String> = snapshot.running.iter().map(i64::to_string).collect();
                format!(
                    "1:{}:{}:{}:{}:{}",
                    self.position,
                    newest,
                    snapshot.xmin,
                    snapshot.xmax,
                    running.join("-")
                )
            }
        }
    }

    /// Parses the text form; `None` if it is not one of ours.
    pub fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        if parts.next()? != "1" {
            return None;
        }
        let position: i64 = parts.next()?.parse().ok()?;
        let Some(newest) = parts.next() else {
            return (position >= 0).then(|| Self::at(position));
        };
        let newest: i64 = newest.parse().ok()?;
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let running = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split('-')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        if parts.next().is_some() || position < 0 {
            return None;
        }
        Some(Self {
            position,
            snapshot: Some((
                newest,
                Snapshot {
                    xmin,
                    xmax,
                    running,
                },
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let plain = Cursor::at(42);
        assert_eq!(Cursor::decode(&plain.encode()), Some(plain));
        let snap = Cursor {
            position: 7,
            snapshot: Some((
                9,
                Snapshot {
                    xmin: 100,
                    xmax: 105,
                    running: vec![101, 103],
                },
            )),
        };
        assert_eq!(snap.encode(), "1:7:9:100:105:101-103");
        assert_eq!(Cursor::decode(&snap.encode()), Some(snap));
        for junk in ["", "42", "2:42", "1:x", "1:-3", "1:1:2:3", "1:1:2:3:4:5:6"] {
            assert_eq!(Cursor::decode(junk), None, "{junk}");
        }
    }

    #[test]
    fn a_snapshot_covers_what_it_saw() {
        let mut cursor = Cursor::decode("1:7:9:100:105:101-103").unwrap();
        assert!(cursor.covers(7, 999));
        assert!(cursor.covers(8, 99));
        assert!(cursor.covers(9, 102));
        assert!(!cursor.covers(8, 101), "101 was running at the snapshot");
        assert!(
            !cursor.covers(10, 99),
            "beyond the newest event of the snapshot"
        );
        cursor.advance(9);
        assert_eq!(cursor, Cursor::at(9));
    }
}
