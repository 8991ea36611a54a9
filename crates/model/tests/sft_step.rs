//! The label-masked training step (supervised fine-tuning, issue 19) against what it must equal:
//! an all-true mask is `train_step` bit for bit; the masked LM loss is the mean negative
//! log-likelihood of the learned labels under the inference forward (a separate code path).

use dsv3_model::grad::model::LossWeights;
use dsv3_model::grad::moe::Balance;
use dsv3_model::grad::Grads;
use dsv3_model::init::{preset, write_random_checkpoint, StoreDtype};
use dsv3_model::sampling::log_prob;
use dsv3_model::DeepseekV3;
use rand::{Rng, SeedableRng};

fn model() -> DeepseekV3 {
    let dir = std::env::temp_dir().join(format!("dsv3-sft-step-{}", std::process::id()));
    let mut cfg = preset("tiny").unwrap();
    cfg["vocab_size"] = serde_json::json!(97);
    write_random_checkpoint(&dir, &cfg, StoreDtype::F32, 4).unwrap();
    let m = DeepseekV3::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    m
}

#[test]
fn the_masked_step_is_the_plain_step_under_an_all_true_mask_and_scores_only_learned_labels() {
    let mut model = model();
    let (seqs, t) = (2, 12);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let tokens: Vec<u32> = (0..seqs * (t + 1)).map(|_| rng.gen_range(0..97)).collect();
    let w = LossWeights { mtp_lambda: 0.3, balance: Balance { seq_alpha: 0.05, batch_alpha: 0.05 } };
    let (mut g1, mut g2) = (Grads::default(), Grads::default());
    let plain = model.train_step(&tokens, seqs, t, w, Some(&mut g1)).unwrap();
    let all = vec![true; seqs * t];
    let masked = model.train_step_masked(&tokens, seqs, t, w, Some(&all), Some(&mut g2)).unwrap();
    assert_eq!(plain.loss.to_bits(), masked.loss.to_bits());
    let names: Vec<String> = model.params_mut().into_iter().map(|p| p.name).collect();
    for name in names {
        assert_eq!(g1.get(&name), g2.get(&name), "{name}");
    }

    // Learned labels: positions 4..9 of the first sequence, 1..3 of the second.
    let learn: Vec<bool> =
        (0..seqs * t).map(|r| if r < t { (4..9).contains(&r) } else { (1..3).contains(&(r - t)) }).collect();
    let rep = model.train_step_masked(&tokens, seqs, t, w, Some(&learn), None).unwrap();
    let v = model.config.vocab_size;
    let mut nll = vec![];
    for b in 0..seqs {
        let seq = &tokens[b * (t + 1)..(b + 1) * (t + 1)];
        let mut cache = model.new_cache();
        let h = model.forward(&seq[..t], &mut cache).unwrap();
        let logits = model.logits(&h, t);
        for i in (0..t).filter(|&i| learn[b * t + i]) {
            nll.push(-log_prob(&logits[i * v..(i + 1) * v], seq[i + 1] as usize) as f64);
        }
    }
    let want = nll.iter().sum::<f64>() / nll.len() as f64;
    assert!((rep.lm_loss - want).abs() < 1e-4, "masked LM loss {} vs forward's {want}", rep.lm_loss);
    assert!((rep.lm_loss - plain.lm_loss).abs() > 1e-3, "the mask changed nothing");
    // A mask of the wrong length is an error, not a panic.
    assert!(model.train_step_masked(&tokens, seqs, t, w, Some(&learn[1..]), None).is_err());
}
