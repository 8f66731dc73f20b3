//! Dispatch of inbox events to handlers by `(source, event_type,
//! schema_version)` (the reference's `EventRouter` and the schema registry of
//! `BaseEventSchema`).
//!
//! Resolution for an event of version `v`:
//! 1. a handler registered for a version that is a prefix of `v` (by
//!    components: `1.2` covers `1.2.7`), the longest prefix winning, so an
//!    exact version beats its minor, which beats its major;
//! 2. otherwise a chain of registered payload migrations from `v` to the
//!    version of some handler (shortest chain, found breadth-first); the
//!    handler gets the migrated payload and version;
//! 3. otherwise a handler registered without a version;
//! 4. otherwise a counted failure that names what is missing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use serde_json::Value;

use crate::domain::Retry;
use crate::error::Error;
use crate::inbox::handler::HandlerFuture;
use crate::inbox::{Handler, HandlerContext};
use crate::model::{InboxEvent, Payload};
use crate::pipeline::Outcome;

/// A registered [`Handler`], type-erased to the one shape `dispatch` calls:
/// its future boxed by [`Handler::handle_boxed`] (a `tx_handler`'s future,
/// boxed already, is not boxed twice).
trait ErasedHandler: Send + Sync {
    /// Runs the handler on `event`.
    fn call<'a>(
        &'a self,
        event: &'a InboxEvent,
        cx: &'a mut HandlerContext<'_>,
    ) -> HandlerFuture<'a>;
}

impl<H: Handler> ErasedHandler for H {
    fn call<'a>(
        &'a self,
        event: &'a InboxEvent,
        cx: &'a mut HandlerContext<'_>,
    ) -> HandlerFuture<'a> {
        self.handle_boxed(event, cx)
    }
}

/// A payload migration from one version to the next; `Err` carries the reason.
type Migration = Arc<dyn Fn(Payload) -> Result<Payload, String> + Send + Sync>;
/// Maps a source (topic) to the form routes are registered and looked up under.
type Normalizer = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// True when `prefix` is a component-wise prefix of `version` (`1.2` of `1.2.3`).
pub fn version_covers(prefix: &str, version: &str) -> bool {
    let p: Vec<&str> = prefix.split('.').collect();
    let v: Vec<&str> = version.split('.').collect();
    p.len() <= v.len() && p.iter().zip(&v).all(|(a, b)| a == b)
}

/// Deserializes a payload into the registered Rust type, boxed as `Any`; `Err`
/// carries serde's message.
type Decoder = Arc<dyn Fn(&Payload) -> Result<Box<dyn std::any::Any + Send>, String> + Send + Sync>;

/// A Rust type registered for a version of an event type.
#[derive(Clone)]
struct Registered {
    type_id: std::any::TypeId,
    type_name: &'static str,
    decode: Decoder,
}

/// Versions, migrations and payload types of event payloads.
#[derive(Default, Clone)]
pub struct SchemaRegistry {
    versions: HashMap<String, Vec<String>>,
    migrations: HashMap<String, HashMap<String, Vec<(String, Migration)>>>,
    types: HashMap<(String, String), Registered>,
}

impl SchemaRegistry {
    /// Registers a schema version (or version prefix such as `1` or `1.2`).
    pub fn register(&mut self, event_type: &str, version: &str) -> &mut Self {
        self.versions
            .entry(event_type.to_string())
            .or_default()
            .push(version.to_string());
        self
    }

    /// Registers `version` (a version or prefix) of `event_type` with the
    /// Rust type its payload deserializes to (the reference's schema
    /// classes); see [`payload_of`](Self::payload_of).
    pub fn register_type<T>(&mut self, event_type: &str, version: &str) -> &mut Self
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        self.register(event_type, version);
        let decode: Decoder = Arc::new(|payload: &Payload| {
            serde_json::from_value::<T>(Value::Object(payload.clone()))
                .map(|t| Box::new(t) as Box<dyn std::any::Any + Send>)
                .map_err(|e| e.to_string())
        });
        self.types.insert(
            (event_type.to_string(), version.to_string()),
            Registered {
                type_id: std::any::TypeId::of::<T>(),
                type_name: std::any::type_name::<T>(),
                decode,
            },
        );
        self
    }

    /// The payload type registered for `event`'s version (the longest registered prefix
    /// that covers it) with that prefix; a validation error when the event has no
    /// schema version or no registered type covers it.
    fn registered(&self, event: &InboxEvent) -> crate::error::Result<(&str, &Registered)> {
        let version = event.schema_version().ok_or_else(|| {
            crate::error::Error::validation("schema_version", "the event has no schema version")
        })?;
        self.versions
            .get(event.event_type())
            .into_iter()
            .flatten()
            .filter(|p| version_covers(p, version))
            .filter_map(|p| {
                self.types
                    .get(&(event.event_type().to_string(), p.clone()))
                    .map(|r| (p.as_str(), r))
            })
            .max_by_key(|(p, _)| p.split('.').count())
            .ok_or_else(|| {
                crate::error::Error::validation(
                    "schema_version",
                    format!(
                        "no payload type is registered for {} version {version}",
                        event.event_type()
                    ),
                )
            })
    }

    /// The payload of `event` as the type registered for its schema
    /// version (the longest registered prefix that covers it), boxed: the
    /// reference's `get_payload_as(schema_cls=None)`. Downcast it, or use
    /// [`payload_as_registered`](Self::payload_as_registered).
    pub fn payload_of(
        &self,
        event: &InboxEvent,
    ) -> crate::error::Result<Box<dyn std::any::Any + Send>> {
        let (prefix, r) = self.registered(event)?;
        (r.decode)(event.payload()).map_err(|e| {
            crate::error::Error::validation(
                "payload",
                format!("does not match {} (version {prefix}): {e}", r.type_name),
            )
        })
    }

    /// The payload of `event` as `T`, which must be the type registered for
    /// the event's version: a mismatch is an error naming the registered
    /// type, not a best-effort parse.
    pub fn payload_as_registered<T: 'static>(&self, event: &InboxEvent) -> crate::error::Result<T> {
        let (prefix, r) = self.registered(event)?;
        if r.type_id != std::any::TypeId::of::<T>() {
            return Err(crate::error::Error::validation(
                "payload",
                format!(
                    "{} version {prefix} is registered as {}, not {}",
                    event.event_type(),
                    r.type_name,
                    std::any::type_name::<T>()
                ),
            ));
        }
        let boxed = self.payload_of(event)?;
        boxed.downcast::<T>().map(|b| *b).map_err(|_| {
            crate::error::Error::validation("payload", "the registered decoder made another type")
        })
    }

    /// The registered version that covers `version` best (longest prefix).
    pub fn resolve(&self, event_type: &str, version: &str) -> Option<&str> {
        self.versions
            .get(event_type)?
            .iter()
            .filter(|p| version_covers(p, version))
            .max_by_key(|p| p.split('.').count())
            .map(String::as_str)
    }

    /// Registers a migration of `event_type` payloads from one version to another.
    pub fn migration(
        &mut self,
        event_type: &str,
        from: &str,
        to: &str,
        f: impl Fn(Payload) -> Result<Payload, String> + Send + Sync + 'static,
    ) -> &mut Self {
        self.migrations
            .entry(event_type.to_string())
            .or_default()
            .entry(from.to_string())
            .or_default()
            .push((to.to_string(), Arc::new(f)));
        self
    }

    /// The shortest chain of migrations from `from` to any of `targets`
    /// (breadth-first), as the versions visited after `from`.
    fn path(
        &self,
        event_type: &str,
        from: &str,
        targets: &[&str],
    ) -> Option<Vec<(String, Migration)>> {
        let graph = self.migrations.get(event_type)?;
        let mut queue = VecDeque::from([(from.to_string(), Vec::<(String, Migration)>::new())]);
        let mut seen = HashSet::from([from.to_string()]);
        while let Some((at, path)) = queue.pop_front() {
            if !path.is_empty() && targets.contains(&at.as_str()) {
                return Some(path);
            }
            for (next, f) in graph.get(&at).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    let mut p = path.clone();
                    p.push((next.clone(), f.clone()));
                    queue.push_back((next.clone(), p));
                }
            }
        }
        None
    }

    /// Migrates a payload from `from` to `to` through registered migrations.
    pub fn migrate(
        &self,
        event_type: &str,
        payload: Payload,
        from: &str,
        to: &str,
    ) -> Result<Payload, String> {
        if from == to {
            return Ok(payload);
        }
        let path = self
            .path(event_type, from, &[to])
            .ok_or_else(|| format!("no migration of {event_type} from {from} to {to}"))?;
        path.iter().try_fold(payload, |p, (_, f)| f(p))
    }
}

/// One handler under a `(source, event_type)` key, for one version prefix
/// (`None`: any version).
struct RouteEntry {
    version: Option<String>,
    handler: Box<dyn ErasedHandler>,
}

/// Routes inbox events to handlers. It is itself a [`Handler`], so it can be
/// used wherever one is expected (`inbox process`, the consumer).
/// `examples/router_versions.rs` routes by schema version with a migration.
#[derive(Default)]
pub struct EventRouter {
    routes: HashMap<(String, String), Vec<RouteEntry>>,
    registry: SchemaRegistry,
    normalize: Option<Normalizer>,
}

impl EventRouter {
    /// An empty router.
    pub fn new() -> Self {
        EventRouter::default()
    }

    /// A router that maps every source (topic) through `normalize` before
    /// registering or dispatching (the reference's `normalize_topic`), e.g.
    /// to strip an environment prefix: `|t| t.trim_start_matches("prod.").into()`.
    /// `*` is never normalized.
    pub fn with_topic_normalizer(
        normalize: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> Self {
        EventRouter {
            normalize: Some(Arc::new(normalize)),
            ..EventRouter::default()
        }
    }

    /// `topic` as routes compare it.
    pub fn normalize_topic(&self, topic: &str) -> String {
        match &self.normalize {
            Some(f) if topic != "*" => f(topic),
            _ => topic.to_string(),
        }
    }

    /// The schema registry (versions, payload types).
    pub fn registry(&self) -> &SchemaRegistry {
        &self.registry
    }

    /// The schema registry (for migrations and payload types).
    pub fn registry_mut(&mut self) -> &mut SchemaRegistry {
        &mut self.registry
    }

    /// Routes events of `source` (`*` for any) and `event_type`, of
    /// `version` (a version prefix, or `None` for any version), to any
    /// [`Handler`]: a closure of the event (returning an [`Outcome`], `()`
    /// or a `Result`), a [`tx_handler`](crate::inbox::tx_handler) closure
    /// that also takes the [`HandlerContext`] (writes in the inbox's
    /// transaction, dependencies), or a struct implementing the trait (the
    /// reference's `register_class` / `register_instance`). A second handler
    /// for the same `(source, event_type, version)` is an error
    /// ([`Error::HandlerAlreadyRegistered`]), not a silent override.
    pub fn on<H: Handler>(
        &mut self,
        source: &str,
        event_type: &str,
        version: Option<&str>,
        handler: H,
    ) -> Result<&mut Self, Error> {
        let source = self.normalize_topic(source);
        let entries = self
            .routes
            .entry((source.clone(), event_type.to_string()))
            .or_default();
        if entries.iter().any(|e| e.version.as_deref() == version) {
            return Err(Error::HandlerAlreadyRegistered {
                topic: source,
                event_type: event_type.to_string(),
                version: version.map(str::to_string),
            });
        }
        entries.push(RouteEntry {
            version: version.map(str::to_string),
            handler: Box::new(handler),
        });
        Ok(self)
    }

    /// The sources (topics) handlers are registered for, sorted (`*` among
    /// them when a handler takes any source).
    pub fn topics(&self) -> Vec<String> {
        let mut t: Vec<String> = self.routes.keys().map(|(s, _)| s.clone()).collect();
        t.sort();
        t.dedup();
        t
    }

    /// The event types handled for `topic` (its own and those of `*`), sorted.
    pub fn event_types_for_topic(&self, topic: &str) -> Vec<String> {
        let topic = self.normalize_topic(topic);
        let mut t: Vec<String> = self
            .routes
            .keys()
            .filter(|(s, _)| *s == topic || s == "*")
            .map(|(_, e)| e.clone())
            .collect();
        t.sort();
        t.dedup();
        t
    }

    /// The routes for `(source, event_type)` followed by those of `("*", event_type)`;
    /// `source` must be normalized already.
    fn entries(&self, source: &str, event_type: &str) -> Vec<&RouteEntry> {
        let mut out: Vec<&RouteEntry> = Vec::new();
        for s in [source, "*"] {
            if let Some(v) = self.routes.get(&(s.to_string(), event_type.to_string())) {
                out.extend(v.iter());
            }
        }
        out
    }

    /// Dispatches one event (see the module documentation for the order).
    pub async fn dispatch(&self, event: &InboxEvent, cx: &mut HandlerContext<'_>) -> Outcome {
        let source = self.normalize_topic(event.source());
        let entries = self.entries(&source, event.event_type());
        let version = event.schema_version();
        if let Some(v) = version {
            let exact = entries
                .iter()
                .filter(|e| e.version.as_deref().is_some_and(|p| version_covers(p, v)))
                .max_by_key(|e| e.version.as_deref().map_or(0, |p| p.split('.').count()));
            if let Some(e) = exact {
                return e.handler.call(event, cx).await;
            }
            let targets: Vec<&str> = entries
                .iter()
                .filter_map(|e| e.version.as_deref())
                .collect();
            if let Some(path) = self.registry.path(event.event_type(), v, &targets) {
                let target = path.last().map(|(t, _)| t.clone()).unwrap_or_default();
                let migrated = path
                    .iter()
                    .try_fold(event.payload().clone(), |p, (_, f)| f(p));
                return match migrated {
                    Ok(payload) => {
                        let mut e = event.clone();
                        e.payload = payload;
                        e.schema_version = Some(target.clone());
                        let entry = entries
                            .iter()
                            .find(|x| x.version.as_deref() == Some(target.as_str()))
                            .expect("the target has a handler");
                        entry.handler.call(&e, cx).await
                    }
                    Err(why) => Outcome::Failed {
                        error: format!(
                            "migrating {} from {v} to {target} failed: {why}",
                            event.event_type()
                        ),
                        retry: Retry::Counted(None),
                    },
                };
            }
        }
        if let Some(e) = entries.iter().find(|e| e.version.is_none()) {
            return e.handler.call(event, cx).await;
        }
        let known: Vec<String> = entries.iter().filter_map(|e| e.version.clone()).collect();
        Outcome::Failed {
            error: format!(
                "no handler for source {:?}, event type {:?}, schema version {}{}",
                event.source(),
                event.event_type(),
                version.map_or("(none)".to_string(), |v| format!("{v:?}")),
                if known.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (handlers exist for versions {known:?}, and no migration leads there)"
                    )
                }
            ),
            retry: Retry::Counted(None),
        }
    }
}

impl Handler for EventRouter {
    /// Dispatches the event to its route, as `EventRouter::dispatch`.
    async fn handle(&self, event: &InboxEvent, cx: &mut HandlerContext<'_>) -> Outcome {
        self.dispatch(event, cx).await
    }
}

impl InboxEvent {
    /// The payload as a typed value.
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> crate::error::Result<T> {
        serde_json::from_value(Value::Object(self.payload.clone())).map_err(|e| {
            crate::error::Error::validation(
                "payload",
                format!("does not match the expected type: {e}"),
            )
        })
    }
}

#[cfg(test)]
mod tests;
