//! `wnodes-image`: the image service binary (see the library docs for the modules).

fn main() -> std::process::ExitCode {
    wnodes_runtime::main::<wnodes_image::Image>()
}
