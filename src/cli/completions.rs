//! `omnibox completions SHELL`, and the hidden `omnibox generate` that writes
//! completions/ and man/ from the clap definition (a test checks they are current).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::{Args, Command, CommandFactory};
use clap_complete::Shell;

use super::{Cli, Context, ExitStatus};

/// Print shell completions
///
/// Examples:
///   omnibox completions bash > /etc/bash_completion.d/omnibox
///   omnibox completions zsh > "${fpath[1]}/_omnibox"
///   omnibox completions fish > ~/.config/fish/completions/omnibox.fish
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell
    shell: Shell,
}

fn render(shell: Shell) -> Vec<u8> {
    // Into a buffer first: clap_complete panics on a broken pipe.
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "omnibox", &mut buf);
    buf
}

pub async fn run(args: CompletionsArgs, _ctx: &Context) -> Result<ExitStatus> {
    std::io::stdout().lock().write_all(&render(args.shell))?;
    Ok(ExitStatus::Success)
}

/// Writes completions/ and man/ under a directory
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Where to write completions/ and man/
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Success.
.TP
\fB1\fR
The command ran and the answer is no: \fBstatus \-\-check\fR crossed a threshold, \fBshow\fR found no such event, the operator declined a confirmation, \fBpublish \-\-once\fR found the broker not answering, or results could not be written.
.TP
\fB2\fR
Usage or input error, bad configuration, or the database cannot be reached; nothing was changed.
.TP
\fB3\fR
Partially done: some rows were changed concurrently by another worker or operator and were left alone; or events failed for good in a \fB\-\-once\fR run of \fBpublish\fR or \fBinbox process\fR (each logged at ERROR).
.TP
\fB4\fR
The message broker failed at run time (\fBinbox consume\fR from Kafka: reading, committing offsets, seeking); committed offsets stay, the rest is delivered again.
"#;

const ENVIRONMENT: &str = r#".SH ENVIRONMENT
.TP
\fBOMNIBOX_DATABASE_URL\fR
Database URL (\fB\-\-database\-url\fR); default sqlite://omnibox.db.
.TP
\fBOMNIBOX_DATABASE_SCHEMA\fR
PostgreSQL schema holding the tables (\fB\-\-schema\fR).
.TP
\fBOMNIBOX_CONFIG\fR
Configuration file (\fB\-\-config\fR); default ./omnibox.toml when present.
.TP
\fBOMNIBOX_FORMAT\fR
Output format, table or json (\fB\-\-format\fR).
.TP
\fBOMNIBOX_BROKER\fR
Broker URL of \fBpublish\fR (\fB\-\-broker\fR); default file:omnibox\-events.jsonl.
.TP
\fBOMNIBOX_LOG\fR, \fBRUST_LOG\fR
Log filter in tracing syntax.
.TP
\fBOMNIBOX_LOG_FORMAT\fR
Log format, text or json (\fB\-\-log\-format\fR).
.TP
\fBNO_COLOR\fR
Any value turns colour off.
"#;

fn man_page(cmd: Command, dir: &Path, name: &str) -> Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut buf)?;
    buf.extend_from_slice(EXIT_STATUS.as_bytes());
    buf.extend_from_slice(ENVIRONMENT.as_bytes());
    std::fs::write(dir.join(format!("{name}.1")), buf)?;
    Ok(())
}

fn pages(cmd: &Command, prefix: &str, dir: &Path) -> Result<()> {
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let name = format!("{prefix}-{}", sub.get_name());
        let page = sub
            .clone()
            .name(name.clone())
            .bin_name(name.replace('-', " "));
        man_page(page, dir, &name)?;
        pages(sub, &name, dir)?;
    }
    Ok(())
}

/// Writes every completion script and man page under `out`.
pub fn generate(out: &Path) -> Result<()> {
    let completions = out.join("completions");
    let man = out.join("man");
    std::fs::create_dir_all(&completions)
        .with_context(|| format!("cannot create {}", completions.display()))?;
    std::fs::create_dir_all(&man)?;
    for (shell, file) in [
        (Shell::Bash, "omnibox.bash"),
        (Shell::Zsh, "_omnibox"),
        (Shell::Fish, "omnibox.fish"),
        (Shell::Elvish, "omnibox.elv"),
        (Shell::PowerShell, "_omnibox.ps1"),
    ] {
        std::fs::write(completions.join(file), render(shell))?;
    }
    let mut cmd = Cli::command();
    cmd.build();
    man_page(cmd.clone(), &man, "omnibox")?;
    pages(&cmd, "omnibox", &man)?;
    Ok(())
}

pub async fn run_generate(args: GenerateArgs, _ctx: &Context) -> Result<ExitStatus> {
    generate(&args.out)?;
    Ok(ExitStatus::Success)
}
