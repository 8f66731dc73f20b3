//! The domain model: events, their status, the limits and validation rules of
//! docs/design.md, "Event lifecycle and rules", and timestamps.

mod event;
pub(crate) use event::ClockDefault;
#[doc(hidden)]
pub mod input;
pub mod limits;
pub mod time;
pub mod validate;

pub(crate) use event::approx_json_len;
pub use event::{
    Event, EventStatus, Headers, InboxEvent, InboxRoute, NewInboxEvent, NewOutboxEvent,
    OutboxEvent, OutboxRoute, Payload, Route, Table,
};
pub use limits::Limits;
pub use time::Timestamp;
pub use validate::{UnlockReason, WorkerId};
