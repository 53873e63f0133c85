//! Adam over one flat parameter slice, with global-norm gradient clipping.
//!
//! Clipping matters for LSTMs: a single chunk crossing an incident can produce a gradient spike
//! that would otherwise undo many steps of training.

use crate::lstm::Real;

/// Bias-corrected Adam (Kingma & Ba) with clipping of the whole gradient's L2 norm.
#[derive(Debug, Clone)]
pub struct Adam {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    /// Gradients whose global L2 norm exceeds this are scaled down to it.
    pub clip_norm: f64,
    first_moment: Vec<f64>,
    second_moment: Vec<f64>,
    steps: i32,
}

impl Adam {
    pub fn new(learning_rate: f64, len: usize) -> Self {
        Adam {
            learning_rate,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            clip_norm: 1.0,
            first_moment: vec![0.0; len],
            second_moment: vec![0.0; len],
            steps: 0,
        }
    }

    /// Applies one update and returns the gradient norm before clipping.
    ///
    /// # Panics
    /// If `params`, `grads` and the optimiser differ in length (a programming error).
    pub fn step<T: Real>(&mut self, params: &mut [T], grads: &[T]) -> f64 {
        assert_eq!(
            params.len(),
            self.first_moment.len(),
            "parameter count changed"
        );
        assert_eq!(grads.len(), params.len(), "gradient length differs");
        let norm = grads
            .iter()
            .map(|g| g.to_f64() * g.to_f64())
            .sum::<f64>()
            .sqrt();
        let clip = if norm > self.clip_norm {
            self.clip_norm / norm
        } else {
            1.0
        };
        self.steps = self.steps.saturating_add(1);
        let correction1 = 1.0 - self.beta1.powi(self.steps);
        let correction2 = 1.0 - self.beta2.powi(self.steps);
        let step_size = self.learning_rate / correction1;
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.first_moment)
            .zip(&mut self.second_moment)
        {
            let g = g.to_f64() * clip;
            *m = self.beta1 * *m + (1.0 - self.beta1) * g;
            *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
            let update = step_size * *m / ((*v / correction2).sqrt() + self.epsilon);
            *p = T::from_f64(p.to_f64() - update);
        }
        norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimises_a_quadratic() {
        let mut x = vec![3.0f64, -2.0];
        let mut adam = Adam::new(0.1, 2);
        for _ in 0..500 {
            let grads = vec![2.0 * x[0], 20.0 * x[1]];
            adam.step(&mut x, &grads);
        }
        assert!(x[0].abs() < 1e-2 && x[1].abs() < 1e-2, "{x:?}");
    }

    #[test]
    fn first_step_moves_each_parameter_by_the_learning_rate() {
        // Bias correction makes the first step ±lr regardless of gradient scale; clipping only
        // changes the ratio m/sqrt(v), which is 1 on the first step.
        let mut x = vec![0.0f32, 0.0];
        let mut adam = Adam::new(0.01, 2);
        let norm = adam.step(&mut x, &[100.0, -0.5]);
        assert!((norm - 100.00125).abs() < 1e-3);
        assert!(
            (x[0] + 0.01).abs() < 1e-6 && (x[1] - 0.01).abs() < 1e-6,
            "{x:?}"
        );
    }
}
