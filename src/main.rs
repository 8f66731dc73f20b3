//! `omnibox`: the operations CLI of the omnibox engine.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
