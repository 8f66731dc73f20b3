//! What every changing command shares: --dry-run, --yes, --actor, and the
//! confirmation (dialoguer on a terminal; without one, --yes is required).

use std::io::IsTerminal;

use anyhow::Result;
use clap::Args;

use super::UsageError;

/// --dry-run / --yes / --actor.
#[derive(Debug, Args, Clone)]
pub struct SafetyArgs {
    /// Show what would change, change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation (needed without a terminal, e.g. in cron)
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Who is acting, for the audit trail [default: the OS user]
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
}

impl SafetyArgs {
    /// Who acts: `--actor`, else the user behind `sudo` (`alice via sudo`),
    /// else the OS user.
    pub fn actor(&self) -> String {
        let sudo = std::env::var("SUDO_USER")
            .ok()
            .filter(|u| !u.is_empty() && u != "root")
            .map(|u| format!("{u} via sudo"));
        self.actor
            .clone()
            .or(sudo)
            .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
            .or_else(|| std::env::var("LOGNAME").ok().filter(|u| !u.is_empty()))
            .or_else(os_user)
            .unwrap_or_else(|| "unknown".to_string())
    }

    /// Asks before `what`; Ok(false) when the operator says no.
    pub fn confirm(&self, what: &str) -> Result<bool> {
        if self.yes {
            return Ok(true);
        }
        if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
            return Err(UsageError(format!(
                "refusing to {what} without --yes: there is no terminal to confirm on; add --yes (as a cron line would), or --dry-run to see what would change"
            ))
            .into());
        }
        Ok(dialoguer::Confirm::new()
            .with_prompt(format!("{what}?"))
            .default(false)
            .interact()?)
    }
}

/// The name of the process's user when $USER and $LOGNAME are unset (cron
/// jobs, containers): the real uid from /proc, looked up in /etc/passwd;
/// `uid:N` when there is no entry.
fn os_user() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)? == uid).then(|| name.to_string())
        })
        .or(Some(format!("uid:{uid}")))
}
