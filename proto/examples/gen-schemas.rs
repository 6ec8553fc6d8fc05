//! Rewrites `proto/schema/` from the Rust types: `cargo run -p taskbus-proto --example gen-schemas`.
fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema");
    for (name, schema) in taskbus_proto::schema::all() {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("has parent"))?;
        std::fs::write(&path, taskbus_proto::schema::render(&schema))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
