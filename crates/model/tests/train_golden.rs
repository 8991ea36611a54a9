//! One training step against PyTorch autograd on the same weights and batch
//! (`scripts/make_train_fixtures.py`): the loss terms and the gradient of every parameter.

use dsv3_model::grad::model::LossWeights;
use dsv3_model::grad::moe::Balance;
use dsv3_model::grad::Grads;
use dsv3_model::weights::Checkpoint;
use dsv3_model::DeepseekV3;
use std::path::PathBuf;

#[test]
fn one_step_matches_pytorch_autograd() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train_step");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let tokens: Vec<u32> = r["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let (seqs, t) = (r["seqs"].as_u64().unwrap() as usize, r["t"].as_u64().unwrap() as usize);
    let f = |k: &str| r[k].as_f64().unwrap();
    let w = LossWeights {
        mtp_lambda: f("mtp_lambda") as f32,
        balance: Balance { seq_alpha: f("seq_alpha") as f32, batch_alpha: f("aux_alpha") as f32 },
    };
    let mut model = DeepseekV3::load(&dir).unwrap();
    let mut g = Grads::default();
    let rep = model.train_step(&tokens, seqs, t, w, Some(&mut g)).unwrap();
    let close = |a: f64, b: f64, what: &str| {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what}: dsv3 {a} vs PyTorch {b}")
    };
    close(rep.lm_loss, f("lm_loss"), "LM loss");
    close(rep.mtp_losses[0], f("mtp_loss"), "MTP loss");
    close(rep.balance_loss, f("balance_loss"), "balance losses");
    close(rep.loss, f("loss"), "total loss");

    let want = Checkpoint::open_files(&[dir.join("grads.safetensors")]).unwrap();
    let mut compared = 0;
    for p in model.params_mut() {
        let shape = want.shape(&p.name).map(|s| s.to_vec());
        // PyTorch gives no gradient to an expert no token reached; nor does dsv3.
        let Some(shape) = shape else {
            assert!(g.get(&p.name).is_none_or(|x| x.iter().all(|&v| v == 0.0)), "{}: PyTorch has no gradient", p.name);
            continue;
        };
        let expect = want.f32s(&p.name, &shape).unwrap();
        let zeros = vec![0f32; expect.len()];
        let got = g.get(&p.name).unwrap_or(&zeros);
        let scale = expect.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(&expect).enumerate() {
            assert!((a - b).abs() <= 1e-5 + 2e-4 * scale, "{}[{i}]: dsv3 {a} vs PyTorch {b} (max |g| {scale})", p.name);
        }
        compared += 1;
    }
    assert!(compared > 40, "{compared} tensors compared");
}
