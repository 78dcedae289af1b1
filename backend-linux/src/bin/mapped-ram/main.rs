//! The `mapped-ram` command-line tool: a thin layer over the `mapped-ram-linux` library's
//! `save`, `restore`, `inspect`, `verify` and `update`, and its store (`s3://BUCKET/KEY`:
//! the same commands, and `put` / `get` between a store and a local file); see
//! `mapped-ram --help`.
//!
//! Exit status: 0 on success; 1 on failure, with one line `error: …` on stderr (and, with
//! `--json`, `{"ok": false, "error": …}` on stdout); 2 on a usage error (a flag missing, unknown
//! or out of its range, a malformed store address, a flag that does not apply to a file or to
//! a store); 128 + the signal number after SIGINT (130) or SIGTERM (143), which cancel a
//! running save or restore: a save then removes its temporary file (a store save the objects
//! it uploaded) and leaves the previous snapshot as it was (see [`signals`]).

mod args;
mod demo;
mod files;
mod inspect;
mod output;
mod restore;
mod save;
mod signals;
mod store;
mod transfer;
mod verify;

use clap::Parser;

use args::{Cli, Command};
use output::finish;
use signals::Interrupts;

fn main() {
    std::process::exit(run());
}

/// Parses the arguments, runs the command and returns the exit status.
fn run() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let json = cli.json;
    let result = Interrupts::install().and_then(|sig| match cli.command {
        Command::Save(a) => save::cmd_save(a, json, &sig),
        Command::Restore(a) => restore::cmd_restore(a, json, &sig),
        Command::Inspect(a) => inspect::cmd_inspect(a, json),
        Command::Verify(a) => verify::cmd_verify(a, json),
        Command::Put(a) => transfer::cmd_put(a, json, &sig),
        Command::Get(a) => transfer::cmd_get(a, json, &sig),
        Command::Demo(a) => demo::cmd_demo(a, json, &sig),
    });
    finish(result, json)
}
