//! SVG → PNG for the run plots (resvg; text uses the system's fonts when it has some).

use anyhow::{Context, Result};
use std::path::Path;

pub fn svg_to_png(svg: &str, path: &Path) -> Result<()> {
    let mut opt = resvg::usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    // fontdb maps `sans-serif` to Arial by default; use whatever sans face the system has.
    let sans = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .find(|n| n.contains("Sans") && !n.contains("Mono"))
        .or_else(|| db.faces().next().and_then(|f| f.families.first().map(|(n, _)| n.clone())));
    if let Some(name) = sans {
        db.set_sans_serif_family(name);
    }
    let tree = resvg::usvg::Tree::from_str(svg, &opt).context("parsing the plot SVG")?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).context("plot size")?;
    resvg::render(&tree, resvg::tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let png = pixmap.encode_png().context("encoding PNG")?;
    std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
}
