//! Embeds the built-in training corpus: the project's own sources and docs (Rust, Python, Markdown),
//! one document per file, so `dsv3 train` runs with no download.

use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || name == "target" || name == "fixtures" || name == "bench-models" {
            continue;
        }
        if p.is_dir() {
            collect(&p, out);
        } else if matches!(p.extension().and_then(|x| x.to_str()), Some("rs" | "md" | "py" | "toml" | "sh")) {
            out.push(p);
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = vec![];
    for sub in ["crates", "scripts", "benches", "docs", "README.md"] {
        let p = root.join(sub);
        if p.is_file() {
            files.push(p);
        } else {
            collect(&p, &mut files);
        }
    }
    files.sort();
    // Documents are separated by ASCII record separators (never in the sources).
    let mut corpus = String::new();
    for f in &files {
        if let Ok(text) = std::fs::read_to_string(f) {
            corpus.push_str(&text.replace('\u{1e}', " "));
            corpus.push('\u{1e}');
        }
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("corpus.txt");
    std::fs::write(out, corpus).expect("write corpus");
}
