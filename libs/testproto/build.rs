#[path = "../proto/codegen.rs"]
mod codegen;

fn main() {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let own = here.join("proto");
    let shared = here.join("../../proto");
    let files = codegen::proto_files(&own);
    codegen::generate(
        &[own, shared],
        &files,
        "example_descriptor.bin",
        "example.rs",
        &[(".socle.api", "::socle_proto::socle::api")],
    );
}
