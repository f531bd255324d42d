//! Shared build-script logic: compile `.proto` files with the pure-Rust
//! `protox` compiler (no system `protoc`), write the encoded descriptor set
//! (with source info and custom options) and generate prost + tonic code.
//!
//! Included by `libs/proto/build.rs` and `libs/testproto/build.rs`.

use std::path::{Path, PathBuf};

/// Every `.proto` file under `dir`, sorted for reproducible output.
pub fn proto_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "proto") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

/// Compiles `files` (found under `includes`), writes `<OUT_DIR>/<descriptor_name>`
/// and the generated Rust modules (entry point `<OUT_DIR>/<include_file>`).
pub fn generate(
    includes: &[PathBuf],
    files: &[PathBuf],
    descriptor_name: &str,
    include_file: &str,
    extern_paths: &[(&str, &str)],
) {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    for dir in includes {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    let mut compiler = protox::Compiler::new(includes).expect("protox include paths");
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(files).unwrap_or_else(|e| panic!("proto compilation failed: {e:?}"));

    // The encoded set keeps custom options (our `socle.api.v1.*` method
    // options) that a round-trip through `prost_types` would drop.
    std::fs::write(out_dir.join(descriptor_name), compiler.encode_file_descriptor_set()).expect("write descriptor set");

    // Every file goes in (prost needs the whole message graph); types under
    // an extern path (well-known types → prost-types, `extern_paths`) are
    // referenced, not generated.
    let fds = compiler.file_descriptor_set();
    // Type names give every message `prost::Name`, so that services can
    // attach them as error details (`socle_errors::Error::with_detail`).
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    let mut builder =
        tonic_prost_build::configure().generate_default_stubs(true).include_file(include_file).out_dir(&out_dir);
    for (proto, rust) in extern_paths {
        builder = builder.extern_path(*proto, *rust);
    }
    builder.compile_fds_with_config(fds, config).expect("code generation");
}
