//! `omnibox inbox`: consume broker messages into the inbox, and process them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use omnibox::inbox::{AnyHandler, ExecHandler, WebhookHandler};

use super::{Context, ExitStatus};

mod consume;
mod process;

/// Consume messages into the inbox, and process inbox rows with a handler
#[derive(Debug, Args)]
pub struct InboxArgs {
    #[command(subcommand)]
    command: InboxCommand,
}

#[derive(Debug, Subcommand)]
enum InboxCommand {
    Consume(Box<consume::ConsumeArgs>),
    Process(Box<process::ProcessArgs>),
}

pub async fn run(args: InboxArgs, ctx: &Context) -> Result<ExitStatus> {
    match args.command {
        InboxCommand::Consume(a) => consume::run(*a, ctx).await,
        InboxCommand::Process(a) => process::run(*a, ctx).await,
    }
}

/// The handler flags shared by `consume` and `process`.
#[derive(Debug, Args, Clone)]
pub struct HandlerArgs {
    /// Run this command per event (via sh -c): the event as JSON on stdin,
    /// OMNIBOX_* variables; exit 0 completed, 3 skipped, 75 retry later, other failed
    #[arg(long, value_name = "CMD", conflicts_with = "webhook")]
    pub exec: Option<String>,
    /// POST each event as JSON to this URL: 2xx completed, 409 skipped,
    /// 429/502/503/504 retry later (Retry-After honoured), other failed
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// Longest run of one handler call (a timeout is a failed attempt)
    #[arg(long, allow_hyphen_values = true, default_value = "30s", value_parser = super::args::duration, value_name = "DURATION")]
    pub timeout: Duration,
}

impl HandlerArgs {
    pub fn handler(&self) -> Result<Option<Arc<AnyHandler>>> {
        Ok(match (&self.exec, &self.webhook) {
            (Some(cmd), _) => Some(Arc::new(AnyHandler::Exec(ExecHandler::new(
                cmd.clone(),
                self.timeout,
            )))),
            (None, Some(url)) => Some(Arc::new(AnyHandler::Webhook(WebhookHandler::new(
                url.clone(),
                self.timeout,
            )?))),
            (None, None) => None,
        })
    }
}
