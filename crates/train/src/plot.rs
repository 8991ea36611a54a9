//! Plots of a run, written beside its checkpoint from `metrics.jsonl` (so a resumed run's plots
//! cover its whole history): loss curves, the expert-load heatmap over steps per MoE layer, and
//! MaxVio over steps. SVG by hand (no plotting dependency); PNG rendered from the same SVG.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

/// A line series: name, colour, points.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    /// Draw markers instead of a line (sparse series such as validation).
    pub markers: bool,
}

const W: f64 = 720.0;
const H: f64 = 400.0;
const PAD: (f64, f64, f64, f64) = (64.0, 24.0, 40.0, 48.0); // left, right, top, bottom

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= n as f64).unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = vec![];
    while t <= hi + 1e-9 * span {
        out.push(t);
        t += step;
    }
    out
}

/// A line chart with axes, ticks, a title and a legend.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad_y = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad_y, y1 + pad_y);
    let (l, r, t, b) = PAD;
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * (W - l - r);
    let sy = |y: f64| H - b - (y - y0) / (y1 - y0) * (H - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ =
        writeln!(s, "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>", W / 2.0, esc(title));
    for ty in nice_ticks(y0, y1, 6) {
        let y = sy(ty);
        let _ = writeln!(s, "<line x1=\"{l}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/>", W - r);
        let _ = writeln!(s, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", l - 6.0, y + 4.0, fmt_tick(ty));
    }
    for tx in nice_ticks(x0, x1, 8) {
        let x = sx(tx);
        let _ = writeln!(s, "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{t}\" y2=\"{}\" stroke=\"#e0e0e0\"/>", H - b);
        let _ = writeln!(s, "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>", H - b + 16.0, fmt_tick(tx));
    }
    let _ = writeln!(
        s,
        "<rect x=\"{l}\" y=\"{t}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>",
        W - l - r,
        H - t - b
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        (l + W - r) / 2.0,
        H - 10.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}</text>",
        (t + H - b) / 2.0,
        (t + H - b) / 2.0,
        esc(y_label)
    );
    for (i, se) in series.iter().enumerate() {
        let valid: Vec<&(f64, f64)> = se.points.iter().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
        if se.markers {
            for p in &valid {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{}\"/>",
                    sx(p.0),
                    sy(p.1),
                    se.color
                );
            }
        } else if !valid.is_empty() {
            let d: Vec<String> = valid.iter().map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1))).collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\" points=\"{}\"/>",
                se.color,
                d.join(" ")
            );
        }
        let ly = t + 16.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{}\"/>",
            W - r - 190.0,
            ly - 5.0,
            se.color
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{ly}\">{}</text>", W - r - 170.0, esc(&se.name));
    }
    s.push_str("</svg>\n");
    s
}

/// Expert load over steps, one band per MoE layer: colour = load / mean load (white 0, blue 1,
/// red ≥ 2).
pub fn load_heatmap(title: &str, loads: &[(u64, Vec<Vec<usize>>)]) -> String {
    // At most 100 columns: consecutive steps are summed into one.
    let per = loads.len().div_ceil(100).max(1);
    let merged: Vec<(u64, Vec<Vec<usize>>)> = loads
        .chunks(per)
        .map(|ch| {
            let mut acc = ch[0].1.clone();
            for (_, l) in &ch[1..] {
                for (a, b) in acc.iter_mut().zip(l) {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                }
            }
            (ch[0].0, acc)
        })
        .collect();
    let loads = &merged[..];
    let layers = loads.first().map_or(0, |(_, l)| l.len());
    let experts = loads.first().and_then(|(_, l)| l.first()).map_or(0, |e| e.len());
    let (l, r, t, b) = PAD;
    let band = if layers == 0 { 0.0 } else { (H - t - b) / layers as f64 };
    let cw = (W - l - r) / loads.len().max(1) as f64;
    let ch = band / experts.max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ =
        writeln!(s, "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>", W / 2.0, esc(title));
    for (i, (_, ls)) in loads.iter().enumerate() {
        for (li, c) in ls.iter().enumerate() {
            let mean = c.iter().sum::<usize>() as f64 / c.len().max(1) as f64;
            for (e, &n) in c.iter().enumerate() {
                let v = if mean > 0.0 { n as f64 / mean } else { 0.0 };
                let _ = writeln!(
                    s,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/>",
                    l + i as f64 * cw,
                    t + li as f64 * band + e as f64 * ch,
                    cw + 0.3,
                    ch + 0.3,
                    heat(v)
                );
            }
        }
    }
    for li in 0..layers {
        let y = t + li as f64 * band;
        let _ = writeln!(s, "<line x1=\"{l}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"black\"/>", W - r);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">MoE {}</text>",
            l - 6.0,
            y + band / 2.0 + 4.0,
            li + 1
        );
    }
    if let (Some(first), Some(last)) = (loads.first(), loads.last()) {
        let _ = writeln!(s, "<text x=\"{l}\" y=\"{}\">step {}</text>", H - b + 16.0, first.0);
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">step {}</text>", W - r, H - b + 16.0, last.0);
    }
    let _ = writeln!(
        s,
        "<rect x=\"{l}\" y=\"{t}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>",
        W - l - r,
        H - t - b
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">rows: experts of each MoE layer; colour: load ÷ mean (white 0, blue 1, red ≥ 2)</text>",
        (l + W - r) / 2.0,
        H - 10.0
    );
    s.push_str("</svg>\n");
    s
}

fn heat(v: f64) -> String {
    // 0 → white, 1 → blue, 2+ → red.
    let (r, g, b) = if v <= 1.0 {
        let a = v.clamp(0.0, 1.0);
        (255.0 * (1.0 - a) + 40.0 * a, 255.0 * (1.0 - a) + 90.0 * a, 255.0 * (1.0 - a) + 200.0 * a)
    } else {
        let a = (v - 1.0).clamp(0.0, 1.0);
        (40.0 + 200.0 * a, 90.0 * (1.0 - a) + 30.0 * a, 200.0 * (1.0 - a) + 30.0 * a)
    };
    format!("#{:02x}{:02x}{:02x}", r as u8, g as u8, b as u8)
}

fn fmt_tick(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.0e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Writes loss.svg, expert_load.svg and maxvio.svg (and their PNGs) into `dir` from its
/// metrics.jsonl.
pub fn write_run_plots(dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).context("metrics.jsonl")?;
    let logs: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let get = |v: &Value, k: &str| v[k].as_f64();
    let step = |v: &Value| v["step"].as_f64().unwrap_or(0.0);
    let series = |k: &str| logs.iter().filter_map(|v| get(v, k).map(|y| (step(v), y))).collect::<Vec<_>>();
    if logs.iter().any(|v| v.get("reward").is_some()) {
        return write_grpo_plots(dir, &series);
    }
    let mtp: Vec<(f64, f64)> = logs.iter().filter_map(|v| v["mtp_losses"][0].as_f64().map(|y| (step(v), y))).collect();
    let mut loss =
        vec![Series { name: "train LM loss".into(), color: "#1f77b4", points: series("lm_loss"), markers: false }];
    if !mtp.is_empty() {
        loss.push(Series { name: "train MTP loss (depth 1)".into(), color: "#ff7f0e", points: mtp, markers: false });
    }
    loss.push(Series {
        name: "validation LM loss".into(),
        color: "#d62728",
        points: series("val_loss"),
        markers: true,
    });
    save(dir, "loss", &line_chart("Loss", "step", "cross-entropy (nats)", &loss))?;
    let mv = vec![
        Series { name: "MaxVio per batch".into(), color: "#2ca02c", points: series("maxvio"), markers: false },
        Series {
            name: "global MaxVio (validation)".into(),
            color: "#9467bd",
            points: series("val_maxvio"),
            markers: true,
        },
    ];
    save(
        dir,
        "maxvio",
        &line_chart("MaxVio = max load / mean load − 1 (mean over MoE layers)", "step", "MaxVio", &mv),
    )?;
    let loads: Vec<(u64, Vec<Vec<usize>>)> = logs
        .iter()
        .filter_map(|v| {
            serde_json::from_value::<Vec<Vec<usize>>>(v["expert_load"].clone()).ok().map(|l| (step(v) as u64, l))
        })
        .filter(|(_, l)| !l.is_empty())
        .collect();
    if !loads.is_empty() {
        save(dir, "expert_load", &load_heatmap("Expert load per MoE layer over steps", &loads))?;
    }
    Ok(())
}

/// A GRPO run's plots: reward (and accuracy, format), KL to the reference, response length.
fn write_grpo_plots(dir: &Path, series: &dyn Fn(&str) -> Vec<(f64, f64)>) -> Result<()> {
    let line = |name: &str, color, key: &str| Series { name: name.into(), color, points: series(key), markers: false };
    let mut reward = vec![line("mean reward", "#1f77b4", "reward"), line("format", "#2ca02c", "format")];
    let accuracy = line("accuracy", "#d62728", "accuracy");
    if !accuracy.points.is_empty() {
        reward.push(accuracy);
    }
    let eval = Series { markers: true, ..line("greedy evaluation accuracy", "#9467bd", "eval_accuracy") };
    if !eval.points.is_empty() {
        reward.push(eval);
    }
    save(dir, "reward", &line_chart("GRPO reward per step", "step", "reward / share", &reward))?;
    let kl = [line("KL(π‖π_ref) per token", "#9467bd", "kl")];
    save(dir, "kl", &line_chart("KL to the reference", "step", "nats per token", &kl))?;
    let len = [line("mean completion length", "#ff7f0e", "response_length")];
    save(dir, "response_length", &line_chart("Response length", "step", "tokens", &len))
}

fn save(dir: &Path, name: &str, svg: &str) -> Result<()> {
    std::fs::write(dir.join(format!("{name}.svg")), svg)?;
    crate::raster::svg_to_png(svg, &dir.join(format!("{name}.png")))
}

/// Per-run summary rows and comparison charts of several runs (same steps), into `out`:
/// compare_lm_loss, compare_val_loss, compare_maxvio (SVG + PNG). Returns a Markdown table.
pub fn write_compare_plots(runs: &[std::path::PathBuf], out: &Path) -> Result<String> {
    const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
    std::fs::create_dir_all(out)?;
    let mut lm = vec![];
    let mut val = vec![];
    let mut mv = vec![];
    let mut table = String::from(
        "| run | train LM loss (last 20 steps) | validation loss | global MaxVio (validation) | MaxVio per batch (last 50 steps) | MTP top-1 (validation) |\n|---|---|---|---|---|---|\n",
    );
    for (i, run) in runs.iter().enumerate() {
        let name = run.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let text = std::fs::read_to_string(run.join("metrics.jsonl"))
            .with_context(|| format!("{}: metrics.jsonl", run.display()))?;
        let logs: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let pts = |k: &str| logs.iter().filter_map(|v| Some((v["step"].as_f64()?, v[k].as_f64()?))).collect::<Vec<_>>();
        let color = COLORS[i % COLORS.len()];
        lm.push(Series { name: name.clone(), color, points: smooth(&pts("lm_loss"), 10), markers: false });
        val.push(Series { name: name.clone(), color, points: pts("val_loss"), markers: false });
        mv.push(Series { name: name.clone(), color, points: smooth(&pts("maxvio"), 10), markers: false });
        let tail = |k: &str, n: usize| {
            let v = pts(k);
            let s = &v[v.len().saturating_sub(n)..];
            s.iter().map(|p| p.1).sum::<f64>() / s.len().max(1) as f64
        };
        let last = |k: &str| pts(k).last().map_or("–".to_string(), |p| format!("{:.3}", p.1));
        let _ = writeln!(
            table,
            "| {name} | {:.3} | {} | {} | {:.3} | {} |",
            tail("lm_loss", 20),
            last("val_loss"),
            last("val_maxvio"),
            tail("maxvio", 50),
            pts("val_mtp_top1").last().map_or("–".to_string(), |p| format!("{:.1}%", 100.0 * p.1))
        );
    }
    save(
        out,
        "compare_lm_loss",
        &line_chart("Train LM loss (moving average of 10 steps)", "step", "cross-entropy (nats)", &lm),
    )?;
    save(out, "compare_val_loss", &line_chart("Validation LM loss", "step", "cross-entropy (nats)", &val))?;
    save(
        out,
        "compare_maxvio",
        &line_chart("MaxVio per batch (moving average of 10 steps, mean over MoE layers)", "step", "MaxVio", &mv),
    )?;
    Ok(table)
}

fn smooth(p: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    (0..p.len())
        .map(|i| {
            let lo = i.saturating_sub(w - 1);
            let s = &p[lo..=i];
            (p[i].0, s.iter().map(|x| x.1).sum::<f64>() / s.len() as f64)
        })
        .collect()
}
