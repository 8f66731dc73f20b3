//! Output helpers: table or JSON on stdout, durations for humans.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use comfy_table::{ContentArrangement, Table, presets};
use serde::{Deserialize, Serialize};

pub use omnibox::time::human_duration;

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Human-readable tables.
    Table,
    /// One JSON document per command, with a stable, documented shape.
    Json,
}

/// `items` one after the other, `sep` between them.
pub fn join<T: std::fmt::Display>(items: impl IntoIterator<Item = T>, sep: &str) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    items.join(sep)
}

/// A table in the house style.
pub fn table<I, S>(header: I) -> Table
where
    I: IntoIterator<Item = S>,
    S: Into<comfy_table::Cell>,
{
    let mut t = Table::new();
    t.load_style(presets::UTF8_FULL_CONDENSED.with_rounded_corners())
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    t
}

/// A one-row table in the house style: each column's header and value.
pub fn row_table(columns: Vec<(&str, String)>) -> Table {
    let mut t = table(columns.iter().map(|(header, _)| *header));
    t.add_row(columns.into_iter().map(|(_, value)| value));
    t
}

/// `--quiet`: what a command reports is held back, and dropped when it
/// succeeds (nothing on stdout or stderr, as cron wants it); a command that
/// fails releases it before its error, so the failure comes with its report.
static QUIET: AtomicBool = AtomicBool::new(false);
/// What `--quiet` held back: (stderr?, bytes).
static HELD: Mutex<Vec<(bool, Vec<u8>)>> = Mutex::new(Vec::new());

/// The most `--quiet` holds back.
const HELD_MAX: usize = 1 << 20;

/// Holds back every report and notice from now on (`--quiet`).
pub fn hold() {
    QUIET.store(true, Ordering::SeqCst);
}

/// True under `--quiet`.
pub fn quiet() -> bool {
    QUIET.load(Ordering::SeqCst)
}

/// The command failed: writes what `--quiet` held back, in order.
pub fn release() {
    QUIET.store(false, Ordering::SeqCst);
    let held = match HELD.lock() {
        Ok(mut h) => std::mem::take(&mut *h),
        Err(_) => return,
    };
    for (stderr, bytes) in held {
        let _ = write(stderr, &bytes);
    }
    let _ = std::io::stdout().flush();
}

fn write(stderr: bool, bytes: &[u8]) -> std::io::Result<()> {
    if quiet() {
        if let Ok(mut h) = HELD.lock() {
            // Bounded (a watch under --quiet): the first MiB is kept.
            let held: usize = h.iter().map(|(_, b)| b.len()).sum();
            if held + bytes.len() <= HELD_MAX {
                h.push((stderr, bytes.to_vec()));
            }
        }
        return Ok(());
    }
    if stderr {
        std::io::stderr().lock().write_all(bytes)
    } else {
        std::io::stdout().lock().write_all(bytes)
    }
}

/// A notice for the operator on stderr (`omnibox: nothing changed`), held
/// back by `--quiet`. Errors do not go here: they are always printed.
pub fn note(text: std::fmt::Arguments<'_>) {
    let _ = write(true, format!("{text}\n").as_bytes());
}

/// `eprintln!` for notices: see [`note`].
macro_rules! notice {
    ($($arg:tt)*) => {
        $crate::cli::output::note(format_args!($($arg)*))
    };
}
pub(crate) use notice;

/// Writes a line to stdout.
pub fn line(text: impl std::fmt::Display) -> Result<()> {
    write(false, format!("{text}\n").as_bytes())?;
    Ok(())
}

/// Writes a value as pretty JSON to stdout.
pub fn json<T: Serialize>(value: &T) -> Result<()> {
    // Serialise first: a write error then surfaces as an io::Error (a
    // broken pipe exits 0), not wrapped in serde_json's error.
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write(false, text.as_bytes())?;
    Ok(())
}

/// Where a report goes: stdout, unless stdout carries the command's data
/// (`publish --broker stdout`), then stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// stdout (the usual place for data).
    Stdout,
    /// stderr (stdout is taken).
    Stderr,
}

impl Report {
    /// Writes a line.
    pub fn line(self, text: impl std::fmt::Display) -> Result<()> {
        match self {
            Report::Stdout => line(text),
            Report::Stderr => {
                write(true, format!("{text}\n").as_bytes())?;
                Ok(())
            }
        }
    }

    /// Writes a value as pretty JSON.
    pub fn json<T: Serialize>(self, value: &T) -> Result<()> {
        match self {
            Report::Stdout => json(value),
            Report::Stderr => {
                let mut text = serde_json::to_string_pretty(value)?;
                text.push('\n');
                write(true, text.as_bytes())?;
                Ok(())
            }
        }
    }
}

/// Shortens text to `max` characters with an ellipsis.
pub fn ellipsize(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ellipsis() {
        assert_eq!(ellipsize("short", 10), "short");
        assert_eq!(ellipsize("a\nb", 10), "a b");
        assert_eq!(ellipsize("abcdefghijk", 5), "abcd…");
    }
}
