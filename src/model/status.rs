//! An event's status and the table it lives in.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};

/// Lifecycle status of an event (docs/design.md, "Event lifecycle and rules").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Waiting to be processed (possibly locked by a worker, possibly scheduled later).
    Pending,
    /// Processed or published.
    Completed,
    /// Gave up after `max_attempts` counted failures (dead letter).
    Failed,
}

impl EventStatus {
    /// All statuses, in lifecycle order.
    pub const ALL: [EventStatus; 3] = [
        EventStatus::Pending,
        EventStatus::Completed,
        EventStatus::Failed,
    ];

    /// The stored name: `pending`, `completed` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Pending => "pending",
            EventStatus::Completed => "completed",
            EventStatus::Failed => "failed",
        }
    }
}

impl fmt::Display for EventStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "pending" => Ok(EventStatus::Pending),
            "completed" => Ok(EventStatus::Completed),
            "failed" => Ok(EventStatus::Failed),
            _ => Err(Error::validation(
                "status",
                format!("unknown status {s:?}; expected pending, completed or failed"),
            )),
        }
    }
}

/// Which of the two tables an event lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// `outbox_events`: events this service publishes.
    Outbox,
    /// `inbox_events`: events this service consumed.
    Inbox,
}

impl Table {
    /// Both tables.
    pub const ALL: [Table; 2] = [Table::Outbox, Table::Inbox];

    /// `outbox` or `inbox`.
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Outbox => "outbox",
            Table::Inbox => "inbox",
        }
    }

    /// The SQL table: `outbox_events` or `inbox_events`.
    pub fn sql_name(self) -> &'static str {
        match self {
            Table::Outbox => "outbox_events",
            Table::Inbox => "inbox_events",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Table {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "outbox" | "outbox_events" => Ok(Table::Outbox),
            "inbox" | "inbox_events" => Ok(Table::Inbox),
            _ => Err(Error::validation(
                "table",
                format!("unknown table {s:?}; expected outbox or inbox"),
            )),
        }
    }
}
