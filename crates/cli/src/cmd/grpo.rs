//! `dsv3 grpo`: reinforcement learning with GRPO on a verifiable task (the library's
//! `dsv3_train::grpo`), a progress line per step (or JSON with `--json`), then a sample.

use anyhow::Result;
use dsv3_train::grpo::{GrpoArgs, GrpoLog};
use std::io::Write;

/// Reinforcement learning with GRPO: sampled groups, rule rewards, a KL-penalized clipped objective.
#[derive(clap::Args, Clone)]
pub struct Grpo {
    #[command(flatten)]
    pub args: GrpoArgs,
    /// One JSON object per step on stdout.
    #[arg(long)]
    pub json: bool,
}

fn progress(l: &GrpoLog) {
    let acc = l.accuracy.map(|a| format!(" accuracy {:.0}%", 100.0 * a)).unwrap_or_default();
    if let Some(r) = l.eval_reward {
        let a = l.eval_accuracy.map(|a| format!(", accuracy {:.1}%", 100.0 * a)).unwrap_or_default();
        eprintln!("  evaluation after step {}: greedy mean reward {r:.3}{a}", l.step);
    }
    eprintln!(
        "step {}/{} reward {:.3}{acc} format {:.0}% KL {:.4} length {:.1} clipped {:.1}% ({:.1} samples/s, {:.0}% sampling)",
        l.step,
        l.steps,
        l.reward,
        100.0 * l.format,
        l.kl,
        l.response_length,
        100.0 * l.clip_fraction,
        l.samples_per_second,
        100.0 * l.generation_seconds / (l.generation_seconds + l.update_seconds).max(1e-9)
    );
    std::io::stderr().flush().ok();
}

pub fn run(c: &Grpo) -> Result<()> {
    let json = c.json;
    let s = dsv3_train::grpo::run(&c.args, |l| match json {
        true => println!("{}", serde_json::to_string(l).unwrap_or_default()),
        false => progress(l),
    })?;
    if json {
        println!("{}", serde_json::json!({ "summary": s }));
        return Ok(());
    }
    let show = |e: Option<(f64, Option<f64>)>| match e {
        Some((r, a)) => format!("{r:.3}{}", a.map(|a| format!(" ({:.1}% correct)", 100.0 * a)).unwrap_or_default()),
        None => "-".into(),
    };
    eprintln!("greedy evaluation: mean reward {} before → {} after", show(s.eval_before), show(s.eval_after));
    eprintln!(
        "GRPO {} steps: mean reward {:.3} → {:.3}; {:.1} samples/s, {:.0}% of the time sampling → {}",
        s.steps,
        s.first_reward,
        s.final_reward,
        s.samples_per_second,
        100.0 * s.generation_share,
        s.out.display()
    );
    if c.args.prompts.is_none() {
        crate::cmd::demo::sample_chat(&s.out, None, "What is 23+45?")?;
    }
    Ok(())
}
