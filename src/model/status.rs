//! An event's status and the table it lives in.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};

/// `Display` as `as_str`, and `FromStr` from any of `names` (trimmed, in
/// any case); anything else is a validation error of `field` saying what
/// is `expected`.
macro_rules! named {
    (
        $ty:ident,
        $field:literal,
        $expected:literal,
        [$($name:literal => $value:ident),+ $(,)?] $(,)?
    ) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                let name = s.trim();
                $(
                    if name.eq_ignore_ascii_case($name) {
                        return Ok($ty::$value);
                    }
                )+
                Err(Error::validation(
                    $field,
                    format!(concat!("unknown ", $field, " {:?}; expected ", $expected), s),
                ))
            }
        }
    };
}

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

named!(
    EventStatus,
    "status",
    "pending, completed or failed",
    ["pending" => Pending, "completed" => Completed, "failed" => Failed],
);

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

named!(
    Table,
    "table",
    "outbox or inbox",
    [
        "outbox" => Outbox,
        "outbox_events" => Outbox,
        "inbox" => Inbox,
        "inbox_events" => Inbox,
    ],
);
