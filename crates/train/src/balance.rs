//! Auxiliary-loss-free load balancing (spec §4, parallel §5): after each optimizer step every MoE
//! layer's routing bias moves by `γ·sign(mean load − load)` over the step's actual selections
//! (Megatron's rule; `zero_mean` subtracts the mean of the update, as torchtitan does). And the
//! report's balance measure, MaxVio = max load / mean load − 1.

use dsv3_model::DeepseekV3;

/// Applies one bias update per MoE layer from `load` (`(layer, tokens per expert)`).
pub fn update_biases(model: &mut DeepseekV3, load: &[(usize, Vec<usize>)], gamma: f32, zero_mean: bool) {
    if gamma == 0.0 {
        return;
    }
    for (layer, bias) in model.routing_biases_mut() {
        let Some((_, c)) = load.iter().find(|(l, _)| *l == layer) else { continue };
        let mean = c.iter().sum::<usize>() as f32 / c.len().max(1) as f32;
        let mut delta: Vec<f32> = c
            .iter()
            .map(|&ci| {
                let diff = mean - ci as f32;
                gamma
                    * if diff > 0.0 {
                        1.0
                    } else if diff < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }
            })
            .collect();
        if zero_mean {
            let m = delta.iter().sum::<f32>() / delta.len().max(1) as f32;
            delta.iter_mut().for_each(|d| *d -= m);
        }
        bias.iter_mut().zip(&delta).for_each(|(b, d)| *b += d);
    }
}

/// `max_i load_i / mean load − 1` (0 when perfectly balanced).
pub fn max_vio(load: &[usize]) -> f64 {
    let total: usize = load.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let mean = total as f64 / load.len() as f64;
    *load.iter().max().unwrap_or(&0) as f64 / mean - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_vio_by_hand() {
        assert_eq!(max_vio(&[2, 2, 2, 2]), 0.0);
        assert!((max_vio(&[4, 2, 1, 1]) - 1.0).abs() < 1e-12);
        assert_eq!(max_vio(&[0, 0]), 0.0);
    }
}
