//! The domain model: events, their status, the limits and validation rules of
//! docs/design.md, "Event lifecycle and rules", and timestamps.

mod event;
mod new_event;
mod state;
mod status;
pub(crate) use event::ClockDefault;
#[doc(hidden)]
pub mod input;
pub mod limits;
pub mod time;
pub mod validate;

pub use event::{Event, Headers, InboxEvent, InboxRoute, OutboxEvent, OutboxRoute, Payload, Route};
pub(crate) use event::{approx_json_len, headers_from_json};
pub use limits::Limits;
pub use new_event::{NewInboxEvent, NewOutboxEvent};
pub use state::{EventLock, EventState};
pub use status::{EventStatus, Table};
pub use time::Timestamp;
pub use validate::{UnlockReason, WorkerId};
