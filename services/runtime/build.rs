// Re-embed the migrations when a file is added to migrations/.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
