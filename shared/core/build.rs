//! Lists every shipped connector declaration (`connectors/*/connector.yaml` at the workspace
//! root) so the crate embeds them with `include_str!`.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../connectors");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut entries: Vec<(String, PathBuf)> = Vec::new();
    if let Ok(dirs) = std::fs::read_dir(&root) {
        for d in dirs.flatten() {
            let file = d.path().join("connector.yaml");
            println!("cargo:rerun-if-changed={}", d.path().display());
            if file.is_file() {
                println!("cargo:rerun-if-changed={}", file.display());
                let name = format!(
                    "connectors/{}/connector.yaml",
                    d.file_name().to_string_lossy()
                );
                entries.push((name, file.canonicalize().unwrap()));
            }
        }
    }
    entries.sort();
    let mut out = String::from("pub const SHIPPED: &[(&str, &str)] = &[\n");
    for (name, path) in entries {
        out.push_str(&format!(
            "    ({name:?}, include_str!({:?})),\n",
            path.display().to_string()
        ));
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("shipped_connectors.rs");
    std::fs::write(dest, out).unwrap();
}
