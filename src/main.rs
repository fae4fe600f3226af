//! The `uthin` command line (see `uthin --help` and `uthin::cli`).

use std::process::ExitCode;

fn main() -> ExitCode {
    uthin::cli::main()
}
