//! The `uthin` command line.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    eprintln!(
        "uthin: `{}` is not yet available in this build",
        args.join(" ")
    );
    ExitCode::from(1)
}
