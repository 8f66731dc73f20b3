use clap::Parser;

/// Splits a shell line into words: single and double quotes, `\` escapes;
/// stops at an unquoted `#` comment, `|`, `>`, `<`, `&&`, `;` or `&`.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut has = false;
    let mut chars = line.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                has = true;
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    has = true;
                }
            }
            (None, c) if c.is_whitespace() => {
                if has || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            (None, '#') if cur.is_empty() && !has => break,
            (None, '|' | '>' | '<' | ';' | '&') => break,
            (None, c) => cur.push(c),
        }
    }
    if has || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The `omnibox ...` commands of a markdown text's `sh` blocks, with
/// `\`-continued lines joined, `$(...)` and env assignments before the
/// command left out.
fn commands(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut pending: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("```") {
            in_sh = matches!(
                t.trim_start_matches('`'),
                "sh" | "bash" | "shell" | "console" | "crontab"
            );
            continue;
        }
        if !in_sh {
            // Inline code spans that are a whole command.
            for (i, span) in line.split('`').enumerate() {
                if i % 2 == 1 && span.starts_with("omnibox ") {
                    // `[--flag]`: optional syntax, not an argument.
                    let w = words(span)
                        .into_iter()
                        .filter(|w| !(w.starts_with('[') && w.ends_with(']')))
                        .collect();
                    out.push((n + 1, w));
                }
            }
            continue;
        }
        let (start, mut joined) = pending.take().unwrap_or((n + 1, String::new()));
        joined.push_str(t.trim_start_matches("$ "));
        if let Some(stripped) = joined.strip_suffix('\\') {
            pending = Some((start, format!("{stripped} ")));
            continue;
        }
        let mut w = words(&joined);
        // Leading VAR=value assignments and `sudo`, `exec`, `timeout N`.
        while let Some(first) = w.first() {
            let assign = first.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
            });
            if assign || first == "sudo" || first == "exec" {
                w.remove(0);
            } else {
                break;
            }
        }
        // From the word that runs omnibox (after a crontab line's
        // schedule, or a path such as target/release/omnibox).
        if let Some(i) = w
            .iter()
            .position(|c| c == "omnibox" || c.ends_with("/omnibox"))
            && !joined.contains("$(")
        {
            let mut w = w.split_off(i);
            w[0] = "omnibox".into();
            out.push((start, w));
        }
    }
    out
}

#[test]
fn words_split_like_a_shell() {
    assert_eq!(
        words(r#"omnibox list --since "2 h" 'a b' x\ y # comment"#),
        ["omnibox", "list", "--since", "2 h", "a b", "x y"]
    );
    assert_eq!(words("omnibox status | jq ."), ["omnibox", "status"]);
    assert_eq!(
        words(r#"omnibox x --header "k=\"v\"""#),
        ["omnibox", "x", "--header", r#"k="v""#]
    );
}

#[test]
fn every_documented_command_parses() {
    let docs = [
        ("README.md", include_str!("../../README.md")),
        ("docs/cli.md", include_str!("../../docs/cli.md")),
        ("docs/semantics.md", include_str!("../../docs/semantics.md")),
        (
            "docs/operations.md",
            include_str!("../../docs/operations.md"),
        ),
        (
            "docs/production.md",
            include_str!("../../docs/production.md"),
        ),
        ("docs/library.md", include_str!("../../docs/library.md")),
        ("docs/wal-relay.md", include_str!("../../docs/wal-relay.md")),
        (
            "docs/partitioning.md",
            include_str!("../../docs/partitioning.md"),
        ),
        ("docs/design.md", include_str!("../../docs/design.md")),
        ("CONTRIBUTING.md", include_str!("../../CONTRIBUTING.md")),
        ("CHANGELOG.md", include_str!("../../CHANGELOG.md")),
        ("bench/RESULTS.md", include_str!("../../bench/RESULTS.md")),
    ];
    let mut failures = Vec::new();
    let mut count = 0;
    for (name, text) in docs {
        for (line, args) in commands(text) {
            count += 1;
            if let Err(e) = super::Cli::try_parse_from(&args) {
                use clap::error::ErrorKind::*;
                if matches!(e.kind(), DisplayHelp | DisplayVersion) {
                    continue;
                }
                // A placeholder (`omnibox show ID`, `--batch B`) stands
                // for a value; prose may name a command without its
                // required arguments (`omnibox unlock`, `omnibox inbox`).
                let text = e.to_string();
                let placeholder = args.iter().any(|a| {
                    !a.starts_with('-')
                        && a.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                        && text.contains(&format!("'{a}'"))
                });
                let partial = matches!(
                    e.kind(),
                    MissingRequiredArgument | DisplayHelpOnMissingArgumentOrSubcommand
                ) || text.contains("a value is required");
                if placeholder || partial {
                    continue;
                }
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                failures.push(format!("{name}:{line}: {}: {first}", args.join(" ")));
            }
        }
    }
    // The examples of every command's --help (and so its man page).
    fn help_texts(cmd: &clap::Command, out: &mut Vec<(String, String)>) {
        let about = cmd
            .get_long_about()
            .or(cmd.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default();
        let after = cmd
            .get_after_long_help()
            .or(cmd.get_after_help())
            .map(|a| a.to_string())
            .unwrap_or_default();
        out.push((cmd.get_name().to_string(), format!("{about}\n{after}")));
        for sub in cmd.get_subcommands() {
            help_texts(sub, out);
        }
    }
    let mut helps = Vec::new();
    help_texts(&<super::Cli as clap::CommandFactory>::command(), &mut helps);
    let mut from_help = 0;
    for (name, text) in &helps {
        for (n, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if !t.starts_with("omnibox ") {
                continue;
            }
            from_help += 1;
            let args = words(t);
            if let Err(e) = super::Cli::try_parse_from(&args) {
                use clap::error::ErrorKind::*;
                if !matches!(e.kind(), DisplayHelp | DisplayVersion) {
                    let first = e.to_string().lines().next().unwrap_or_default().to_string();
                    failures.push(format!(
                        "--help of {name}, line {}: {}: {first}",
                        n + 1,
                        args.join(" ")
                    ));
                }
            }
        }
    }
    count += from_help;
    assert!(from_help > 30, "only {from_help} help examples found");
    assert!(
        count > 50,
        "only {count} commands found: is the parser right?"
    );
    assert!(
        failures.is_empty(),
        "{} of {count} documented commands do not parse:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
