//! Node-limited routing: the model's group-limited router, with one expert group per node, never
//! sends a token to more than `topk_group` nodes (what bounds DeepSeek-V3's inter-node traffic).

use dsv3_dist::dispatch::{nodes_per_token, ranks_per_token};
use dsv3_model::init::{preset, write_random_checkpoint, StoreDtype};
use dsv3_model::model::Ffn;
use dsv3_model::DeepseekV3;

#[test]
fn group_limited_routing_reaches_at_most_topk_group_nodes() {
    let dir = std::env::temp_dir().join(format!("dsv3-nodes-{}", std::process::id()));
    let cfg = preset("tiny").unwrap(); // 16 experts in 4 groups, 2 groups kept, top-4
    write_random_checkpoint(&dir, &cfg, StoreDtype::F32, 9).unwrap();
    let model = DeepseekV3::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let (d, t) = (model.config.hidden_size, 200);
    let (groups, kept, k, e) = (
        model.config.n_group,
        model.config.topk_group,
        model.config.num_experts_per_tok,
        model.config.n_routed_experts,
    );
    let x: Vec<f32> = (0..t * d).map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 2.0).collect();
    let mut checked = 0;
    for layer in &model.layers {
        let Ffn::Moe(moe) = &layer.mlp else { continue };
        let r = moe.gate.route(&moe.gate.scores(&model.exec(), &x, t));
        let reach = nodes_per_token(&r.experts, k, e, groups);
        assert!(reach.iter().all(|&n| n <= kept), "a token reached more than {kept} nodes: {:?}", reach.iter().max());
        assert!(reach.contains(&kept), "the limit is reached, not just respected");
        // And the dispatch agrees: per token, ranks (one per node here) = nodes reached.
        let sent = ranks_per_token(&r.experts, k, e, groups);
        for (ti, &n) in reach.iter().enumerate() {
            assert_eq!(sent[ti].len(), n);
        }
        checked += 1;
    }
    assert!(checked > 0);
}
