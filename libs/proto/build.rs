#[path = "codegen.rs"]
mod codegen;

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = codegen::proto_files(&root);
    codegen::generate(&[root], &files, "socle_descriptor.bin", "socle.rs", &[]);
}
