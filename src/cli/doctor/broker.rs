//! The broker check: reachable, and the topics of pending rows exist.

use std::time::Duration;

use omnibox::store::AnyStore;

use super::DoctorArgs;
use crate::cli::Context;
use omnibox::ops::diagnostics::Check;

/// The broker answers and holds the topics of pending rows.
pub(super) async fn broker_check(
    store: Option<&AnyStore>,
    args: &DoctorArgs,
    ctx: &Context,
) -> Check {
    let Some(url) = args.broker.clone().or_else(|| ctx.settings.broker.clone()) else {
        return Check::ok(
            "broker",
            "none configured (publish's default is the local file sink)",
        );
    };
    let Some(brokers) = url.strip_prefix("kafka://").map(str::to_string) else {
        return Check::ok(
            "broker",
            format!("{} (no server to reach)", omnibox::redact::url(&url)),
        );
    };
    // The topics of pending rows, when the database can tell them: the
    // broker is checked either way.
    let topics = match store {
        Some(s) => Some(s.pending_topics(1000).await),
        None => None,
    };
    let (topics, topics_known) = match topics {
        Some(Ok(t)) => (t, true),
        _ => (Vec::new(), false),
    };
    let mut properties = ctx.settings.kafka_properties.clone();
    match args.kafka_security.properties() {
        Ok(p) => properties.extend(p),
        Err(e) => {
            return Check::fail(
                "broker",
                e.0,
                "fix the --kafka-tls-* / --kafka-sasl-* flags",
            );
        }
    }
    properties.extend(args.properties.iter().cloned());
    let shown = omnibox::redact::url(&url);
    let metadata =
        tokio::task::spawn_blocking(move || -> std::result::Result<Vec<String>, String> {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let mut config = rdkafka::ClientConfig::new();
            config.set("bootstrap.servers", &brokers);
            for (k, v) in &properties {
                config.set(k, v);
            }
            let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
            let md = consumer
                .fetch_metadata(None, Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            Ok(md.topics().iter().map(|t| t.name().to_string()).collect())
        })
        .await;
    match metadata {
        Ok(Ok(present)) => {
            let missing: Vec<&String> = topics.iter().filter(|t| !present.contains(t)).collect();
            if !topics_known {
                Check::ok(
                    "broker",
                    format!(
                        "{shown} answers (the topics of pending rows were not checked: the outbox could not be read)"
                    ),
                )
            } else if missing.is_empty() {
                Check::ok(
                    "broker",
                    format!(
                        "{shown} answers; the {} topic(s) of pending rows exist",
                        topics.len()
                    ),
                )
            } else {
                Check::fail(
                    "broker",
                    format!(
                        "{shown} answers, but topic(s) of pending rows are missing: {}",
                        crate::cli::output::join(&missing, ", ")
                    ),
                    "create the topics (the relay backs off on them, then fails their rows after --topic-unavailable-limit)",
                )
            }
        }
        Ok(Err(e)) => Check::fail(
            "broker",
            format!("{shown} does not answer: {}", omnibox::redact::text(&e)),
            "check the address, the network and -X security settings",
        ),
        Err(e) => Check::error("broker", &e),
    }
}
