//! The `mapped-ram` command-line tool; see `mapped-ram --help`.

fn main() {
    std::process::exit(mapped_ram_linux::cli::main());
}
