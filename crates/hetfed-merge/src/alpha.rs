//! Aggregation weights `α_i` of the proposal's rule
//!
//! ```text
//! W ← W + η · Σ_i α_i·P(τ_i) / Σ_i α_i
//! ```
//!
//! Each client gets three factors in `[0, 1]`, each relative to the round's best client:
//!
//! * quality `Q_i = max(g_i / max_j g_j, min_quality)`, where `g_i` is the gain the server
//!   measured on its own data (`server_gain`) or, failing that, the client's reported validation
//!   gain (`val_gain`, loss before − after). Used when at least one gain is positive; when gains
//!   are reported but none is positive every reporting client gets `min_quality`; when no client
//!   reports a gain every client gets 1. A client without a gain, in a round where others have
//!   one, gets the mean factor of those that have one (unknown is neither rewarded nor punished).
//! * size `S_i = n_i / max_j n_j` (1 for all when every `n_i` is 0);
//! * entropy `E_i = clamp(H_i / log2(C_i), min_quality, 1)`, the label entropy in bits normalised
//!   by its maximum over `C_i` classes; 1 when the entropy or a class count of at least 2 is
//!   unknown.
//!
//! and `α_i ∝ Q_i^q · S_i^s · E_i^e` with the exponents `q, s, e` of [`AlphaConfig`], normalised so
//! `Σ_i α_i = 1`. The product is taken in log space (a factor with exponent 0 drops out even when
//! it is 0), so large exponents neither underflow nor overflow. `q = s = e = 0` is the uniform
//! mean; `q = e = 0, s = 1` is FedAvg's example weighting.

use std::collections::BTreeMap;

use hetfed_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Exponents of the three factors, and the floor that keeps a poor client in the sum.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AlphaConfig {
    /// Exponent on the quality (gain) factor; 0 ignores it.
    pub quality: f64,
    /// Exponent on the size factor `n_i / max_j n_j`; 0 ignores it.
    pub size: f64,
    /// Exponent on the normalised label entropy; 0 ignores it.
    pub entropy: f64,
    /// Floor of the quality and entropy factors, in `(0, 1]`, so a client with zero or negative
    /// gain (or a single label) still counts a little.
    pub min_quality: f64,
}

impl Default for AlphaConfig {
    fn default() -> Self {
        Self { quality: 1.0, size: 1.0, entropy: 1.0, min_quality: 0.05 }
    }
}

impl AlphaConfig {
    /// Every exponent 0: all clients weigh the same.
    pub fn uniform() -> Self {
        Self { quality: 0.0, size: 0.0, entropy: 0.0, ..Self::default() }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        for (k, v) in [("quality", self.quality), ("size", self.size), ("entropy", self.entropy)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("alpha.{k}: expected a finite exponent >= 0, found {v}"));
            }
        }
        if !(self.min_quality > 0.0 && self.min_quality <= 1.0) {
            return Err(format!("alpha.min_quality: expected a number in (0, 1], found {}", self.min_quality));
        }
        Ok(())
    }
}

/// What the server knows about one client's update in a round.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientSignals {
    /// Training examples behind the update.
    pub n_examples: u64,
    /// Shannon entropy of the client's label distribution, in bits.
    pub label_entropy_bits: Option<f64>,
    /// Number of classes the entropy is measured over.
    pub n_classes: Option<usize>,
    /// Client-reported validation loss before − after local training.
    pub val_gain: Option<f64>,
    /// Server-measured gain on its own data; overrides `val_gain` when present.
    pub server_gain: Option<f64>,
}

/// A client's three factors (before exponents) and its normalised weight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AlphaParts {
    pub quality: f64,
    pub size: f64,
    pub entropy: f64,
    /// Normalised weight: the alphas of a round sum to 1.
    pub alpha: f64,
}

/// The weights of a round's clients (see the module docs for the formula). The result does not
/// depend on the order of `clients`; ids must be unique and the list non-empty.
pub fn compute_alphas(cfg: &AlphaConfig, clients: &[(String, ClientSignals)]) -> Result<BTreeMap<String, AlphaParts>> {
    cfg.validate().map_err(Error::msg)?;
    if clients.is_empty() {
        return Err(Error::msg("computing aggregation weights: expected at least one client, found none"));
    }
    // Sorting by id makes every sum below independent of the caller's order.
    let mut sorted: BTreeMap<&str, &ClientSignals> = BTreeMap::new();
    for (id, s) in clients {
        if sorted.insert(id.as_str(), s).is_some() {
            return Err(Error::msg(format!("client {id}: expected one set of signals per round, found two")));
        }
        validate_signals(id, s)?;
    }
    let minq = cfg.min_quality;

    let gains: BTreeMap<&str, f64> =
        sorted.iter().filter_map(|(id, s)| s.server_gain.or(s.val_gain).map(|g| (*id, g))).collect();
    let max_gain = gains.values().copied().fold(f64::NEG_INFINITY, f64::max);
    let reported: BTreeMap<&str, f64> =
        gains.iter().map(|(id, g)| (*id, if max_gain > 0.0 { (g / max_gain).max(minq) } else { minq })).collect();
    let default_q = if reported.is_empty() { 1.0 } else { reported.values().sum::<f64>() / reported.len() as f64 };

    let max_n = sorted.values().map(|s| s.n_examples).max().unwrap_or(0);

    let mut parts = BTreeMap::new();
    let mut logs = Vec::with_capacity(sorted.len());
    for (id, s) in &sorted {
        let quality = reported.get(id).copied().unwrap_or(default_q);
        let size = if max_n == 0 { 1.0 } else { s.n_examples as f64 / max_n as f64 };
        let entropy = match (s.label_entropy_bits, s.n_classes) {
            (Some(h), Some(c)) if c >= 2 => (h / (c as f64).log2()).clamp(minq, 1.0),
            _ => 1.0,
        };
        let term = |exp: f64, f: f64| if exp == 0.0 { 0.0 } else { exp * f.ln() };
        let log_alpha = term(cfg.quality, quality) + term(cfg.size, size) + term(cfg.entropy, entropy);
        logs.push(log_alpha);
        parts.insert(id.to_string(), AlphaParts { quality, size, entropy, alpha: 0.0 });
    }
    let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !top.is_finite() {
        return Err(Error::msg(format!(
            "computing aggregation weights: expected at least one client with a positive weight, found none (largest log-weight {top})"
        )));
    }
    let exps: Vec<f64> = logs.iter().map(|l| (l - top).exp()).collect();
    let total: f64 = exps.iter().sum();
    for (p, e) in parts.values_mut().zip(exps) {
        p.alpha = e / total;
    }
    Ok(parts)
}

fn validate_signals(id: &str, s: &ClientSignals) -> Result<()> {
    for (k, v) in [("val_gain", s.val_gain), ("server_gain", s.server_gain)] {
        if let Some(g) = v {
            if !g.is_finite() {
                return Err(Error::msg(format!("client {id}: expected a finite {k}, found {g}")));
            }
        }
    }
    if let Some(h) = s.label_entropy_bits {
        if !(h >= 0.0 && h.is_finite()) {
            return Err(Error::msg(format!("client {id}: expected a label entropy >= 0 bits, found {h}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signals() -> impl Strategy<Value = ClientSignals> {
        (
            0u64..5000,
            proptest::option::of(0.0f64..5.0),
            proptest::option::of(0usize..20),
            proptest::option::of(-1.0f64..1.0),
            proptest::option::of(-1.0f64..1.0),
        )
            .prop_map(|(n_examples, label_entropy_bits, n_classes, val_gain, server_gain)| ClientSignals {
                n_examples,
                label_entropy_bits,
                n_classes,
                val_gain,
                server_gain,
            })
    }

    fn config() -> impl Strategy<Value = AlphaConfig> {
        (0.0f64..3.0, 0.0f64..3.0, 0.0f64..3.0, 0.001f64..1.0)
            .prop_map(|(quality, size, entropy, min_quality)| AlphaConfig { quality, size, entropy, min_quality })
    }

    fn named(v: Vec<ClientSignals>) -> Vec<(String, ClientSignals)> {
        v.into_iter().enumerate().map(|(i, s)| (format!("client-{i:02}"), s)).collect()
    }

    proptest! {
        #[test]
        fn alphas_sum_to_one_and_ignore_order(
            cfg in config(),
            (clients, shuffled) in proptest::collection::vec(signals(), 1..8)
                .prop_map(named)
                .prop_flat_map(|c| (Just(c.clone()), Just(c).prop_shuffle())),
        ) {
            let a = compute_alphas(&cfg, &clients).unwrap();
            let b = compute_alphas(&cfg, &shuffled).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.len(), clients.len());
            let sum: f64 = a.values().map(|p| p.alpha).sum();
            prop_assert!((sum - 1.0).abs() < 1e-9, "sum {}", sum);
            for p in a.values() {
                prop_assert!(p.alpha >= 0.0 && p.alpha.is_finite());
                for f in [p.quality, p.size, p.entropy] {
                    prop_assert!((0.0..=1.0).contains(&f));
                }
            }
        }

        #[test]
        fn identical_signals_get_equal_alphas(cfg in config(), s in signals(), n in 1usize..8) {
            let clients = named(vec![s; n]);
            let a = compute_alphas(&cfg, &clients).unwrap();
            for p in a.values() {
                prop_assert!((p.alpha - 1.0 / n as f64).abs() < 1e-12, "{} vs {}", p.alpha, 1.0 / n as f64);
            }
        }

        #[test]
        fn zero_size_exponent_ignores_n_examples(
            cfg in config(),
            clients in proptest::collection::vec(signals(), 1..8),
            other_n in proptest::collection::vec(0u64..100_000, 8),
        ) {
            let cfg = AlphaConfig { size: 0.0, ..cfg };
            let a = compute_alphas(&cfg, &named(clients.clone())).unwrap();
            let changed: Vec<ClientSignals> = clients
                .into_iter()
                .zip(other_n)
                .map(|(s, n)| ClientSignals { n_examples: n, ..s })
                .collect();
            let b = compute_alphas(&cfg, &named(changed)).unwrap();
            for (pa, pb) in a.values().zip(b.values()) {
                prop_assert!((pa.alpha - pb.alpha).abs() < 1e-12);
            }
        }
    }

    fn sig(n: u64, gain: Option<f64>) -> ClientSignals {
        ClientSignals { n_examples: n, val_gain: gain, ..Default::default() }
    }

    #[test]
    fn factors_follow_the_formula() {
        let cfg = AlphaConfig::default();
        let clients = vec![
            (
                "a".to_string(),
                ClientSignals { label_entropy_bits: Some(1.0), n_classes: Some(4), ..sig(100, Some(0.5)) },
            ),
            ("b".to_string(), sig(50, Some(-0.2))),
            ("c".to_string(), ClientSignals { server_gain: Some(0.25), ..sig(200, Some(9.0)) }),
            ("d".to_string(), sig(200, None)),
        ];
        let a = compute_alphas(&cfg, &clients).unwrap();
        assert_eq!((a["a"].quality, a["a"].size, a["a"].entropy), (1.0, 0.5, 0.5));
        assert_eq!((a["b"].quality, a["b"].size, a["b"].entropy), (0.05, 0.25, 1.0));
        // server_gain overrides val_gain.
        assert_eq!((a["c"].quality, a["c"].size), (0.5, 1.0));
        // No gain: the mean factor of the reporting clients.
        assert!((a["d"].quality - (1.0 + 0.05 + 0.5) / 3.0).abs() < 1e-12);
        let raw = [1.0 * 0.5 * 0.5, 0.05 * 0.25, 0.5, a["d"].quality];
        let total: f64 = raw.iter().sum();
        for (k, r) in ["a", "b", "c", "d"].iter().zip(raw) {
            assert!((a[*k].alpha - r / total).abs() < 1e-12, "{k}");
        }
    }

    #[test]
    fn uniform_and_fedavg_weights() {
        let clients = vec![("a".to_string(), sig(30, Some(1.0))), ("b".to_string(), sig(10, Some(0.1)))];
        let u = compute_alphas(&AlphaConfig::uniform(), &clients).unwrap();
        assert!((u["a"].alpha - 0.5).abs() < 1e-12);
        let fedavg = AlphaConfig { quality: 0.0, entropy: 0.0, ..AlphaConfig::default() };
        let f = compute_alphas(&fedavg, &clients).unwrap();
        assert!((f["a"].alpha - 0.75).abs() < 1e-12);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let cfg = AlphaConfig::default();
        assert!(compute_alphas(&cfg, &[]).is_err());
        let dup = vec![("a".to_string(), sig(1, None)), ("a".to_string(), sig(2, None))];
        assert!(compute_alphas(&cfg, &dup).is_err());
        let nan = vec![("a".to_string(), sig(1, Some(f64::NAN)))];
        assert!(compute_alphas(&cfg, &nan).is_err());
        let bad = AlphaConfig { size: f64::NAN, ..AlphaConfig::default() };
        assert!(compute_alphas(&bad, &[("a".to_string(), sig(1, None))]).is_err());
        assert!(AlphaConfig { min_quality: 0.0, ..AlphaConfig::default() }.validate().is_err());
        let huge = AlphaConfig { quality: 1e6, size: 1e6, entropy: 1e6, min_quality: 1e-300 };
        let a =
            compute_alphas(&huge, &[("a".to_string(), sig(1, Some(1.0))), ("b".to_string(), sig(1000, Some(0.001)))])
                .unwrap();
        assert!((a.values().map(|p| p.alpha).sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn config_parses_with_defaults() {
        let c: AlphaConfig = serde_json_like();
        assert_eq!(c, AlphaConfig { size: 0.0, ..AlphaConfig::default() });
    }

    // serde_json is not a dependency: check `serde(default)` through a tiny hand-made deserializer.
    fn serde_json_like() -> AlphaConfig {
        use serde::de::value::{Error as DeError, MapDeserializer};
        let map = MapDeserializer::<_, DeError>::new(vec![("size", 0.0f64)].into_iter());
        AlphaConfig::deserialize(map).unwrap()
    }
}
