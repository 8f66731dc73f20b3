//! Compile-time checks: the futures a service spawns are `Send`, for every
//! source, sink, handler and store omnibox ships, so `tokio::spawn` takes
//! them. The functions are never called: compiling them is the test.

#![allow(dead_code)]

use omnibox::inbox::handler::{AnyHandler, HandlerStep};
use omnibox::inbox::{AnySource, FileSource, Handler, InboxConsumer, KafkaSource};
use omnibox::pipeline::{Processor, RunOptions, Sleep, run};
use omnibox::relay::{AnySink, PublishHandler};
use omnibox::store::{AnyTable, AnyWakeup};
use omnibox::{InboxRoute, OutboxRoute};
use tokio::sync::watch;

fn is_send<T: Send>(_: &T) {}

fn shutdown() -> watch::Receiver<bool> {
    watch::channel(false).1
}

fn consumer_over_a_file(c: &mut InboxConsumer<FileSource, AnyHandler>) {
    is_send(&c.run(true, shutdown()));
}

/// Any handler a service writes (a closure, a `tx_handler`, a router).
fn consumer_with_a_service_handler<H: Handler>(c: &mut InboxConsumer<FileSource, H>) {
    is_send(&c.run(true, shutdown()));
}

fn consumer_over_kafka(c: &mut InboxConsumer<KafkaSource, AnyHandler>) {
    is_send(&c.run(true, shutdown()));
}

fn consumer_over_any_source(c: &mut InboxConsumer<AnySource, AnyHandler>) {
    is_send(&c.run(true, shutdown()));
}

fn relay(
    p: &Processor<OutboxRoute, AnyTable<OutboxRoute>, PublishHandler<AnySink>>,
    w: &mut AnyWakeup,
) {
    is_send(&run(p, &RunOptions::default(), shutdown(), w, |_| {}));
    is_send(&p.process_batch());
}

fn inbox_processor(
    p: &Processor<InboxRoute, AnyTable<InboxRoute>, HandlerStep<AnyHandler>>,
    w: &mut Sleep,
) {
    is_send(&run(p, &RunOptions::default(), shutdown(), w, |_| {}));
}

#[test]
fn futures_a_service_spawns_are_send() {
    // The functions above compile only if their futures are Send.
}
