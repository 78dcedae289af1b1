//! `kvm-vmm`: boot a tiny guest under KVM and live-save it (`save`), or restore one in this new
//! process and run it on (`resume`). See the crate docs of `mapped_ram_kvm_vmm`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mapped_ram_kvm_vmm::{default_dump, resume, save, Converge, Mode, ResumeArgs, SaveArgs};

#[derive(Parser)]
#[command(
    name = "kvm-vmm",
    about = "A minimal KVM VMM snapshotting its guest with mapped-ram"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Copy,
    Lazy,
}

/// When a live save stops the guest.
#[derive(clap::Args)]
struct ConvergeArgs {
    /// Most live passes after the first (full) one.
    #[arg(long, default_value_t = 8)]
    passes: usize,
    /// Stop the guest once its dirty log holds at most this many pages.
    #[arg(long, default_value_t = 1024)]
    target_dirty_pages: u64,
}

impl ConvergeArgs {
    fn get(&self) -> Converge {
        Converge {
            max_passes: self.passes,
            target_pages: self.target_dirty_pages,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the guest, let it run, live-save it to PATH, write the stopped guest's memory to the dump.
    Save {
        path: PathBuf,
        /// Guest RAM in MiB (at most 4076: RAM ends below the APIC window at 0xFEC00000).
        #[arg(long, default_value_t = 128)]
        mib: u64,
        /// Milliseconds the guest runs before the save starts.
        #[arg(long, default_value_t = 200)]
        warmup_ms: u64,
        #[command(flatten)]
        converge: ConvergeArgs,
        /// Dump file (default PATH.dump).
        #[arg(long)]
        dump: Option<PathBuf>,
        /// Leave RAM zero before boot (default: bytes 8.. of every page are 0xA5, so all of
        /// RAM holds data).
        #[arg(long)]
        no_prefill: bool,
    },
    /// Restore the guest saved at PATH, compare it with the dump, run it on, check it carried on.
    Resume {
        path: PathBuf,
        #[arg(long, value_enum)]
        mode: ModeArg,
        /// Dump file (default PATH.dump).
        #[arg(long)]
        dump: Option<PathBuf>,
        /// Milliseconds the guest runs after the resume.
        #[arg(long, default_value_t = 300)]
        run_ms: u64,
        /// Live-save the running restored guest to PATH again (and rewrite the dump).
        #[arg(long)]
        resnapshot: bool,
        #[command(flatten)]
        converge: ConvergeArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Save {
            path,
            mib,
            warmup_ms,
            converge,
            dump,
            no_prefill,
        } => {
            let dump = dump.unwrap_or_else(|| default_dump(&path));
            save(
                &path,
                &SaveArgs {
                    mib,
                    warmup_ms,
                    converge: converge.get(),
                    dump,
                    prefill: !no_prefill,
                },
            )
        }
        Cmd::Resume {
            path,
            mode,
            dump,
            run_ms,
            resnapshot,
            converge,
        } => {
            let dump = dump.unwrap_or_else(|| default_dump(&path));
            let mode = match mode {
                ModeArg::Copy => Mode::Copy,
                ModeArg::Lazy => Mode::Lazy,
            };
            resume(
                &path,
                &ResumeArgs {
                    mode,
                    dump,
                    run_ms,
                    resnapshot,
                    converge: converge.get(),
                },
            )
        }
    };
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
