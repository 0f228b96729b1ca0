//! Splitting a dataset among federated clients: IID and Dirichlet label skew, deterministic under a
//! seed, and per-client statistics.
//!
//! Both schemes return `n_clients` lists of example indices that together are a partition of
//! `0..n` (every index exactly once), each list sorted ascending and **non-empty** (so `n >=
//! n_clients` is required).
//!
//! **Randomness.** The generator is SplitMix64 (Steele, Lea & Flood 2014) implemented here, not
//! `rand`'s `StdRng`, whose algorithm may change between `rand` releases: a partition depends only
//! on `(labels, n_clients, alpha, seed)` and this file, so experiment configs stay reproducible.
//!
//! **IID.** A Fisher–Yates shuffle of `0..n`; client `c` takes positions `c*n/N .. (c+1)*n/N`
//! (sizes differ by at most one).
//!
//! **Dirichlet** (label skew as in Hsu, Qi & Brown 2019, "Measuring the effects of non-identical
//! data distribution for federated visual classification"). For each class `k` in ascending order:
//! shuffle its indices, draw client shares `p ~ Dir(alpha, ..., alpha)` over the `N` clients, round
//! `p * n_k` to integers by largest remainder (ties to the lower client index), and deal the
//! shuffled indices to clients `0..N` in order. Hsu et al. draw each *client's* class mix from
//! `Dir(alpha * prior)`; drawing each *class's* client shares instead (the form of most FL code,
//! e.g. Yurochkin et al. 2019) partitions the data exactly with no rebalancing, and behaves the same
//! at the extremes: `alpha → ∞` gives every client the global label proportions, `alpha → 0` gives
//! clients a single class. Small `alpha` can leave a client empty; then, for each empty client in
//! ascending order, the currently largest client (ties: lowest index) gives it the index it
//! received last. Gamma variates use Marsaglia & Tsang (2000) in log space, so tiny `alpha` does
//! not underflow.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A deterministic SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval (0, 1).
    pub fn open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift (bias below `n / 2^64`).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }

    fn normal(&mut self) -> f64 {
        // Box–Muller, one variate per pair of uniforms.
        let (u1, u2) = (self.open01(), self.open01());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `ln X` for `X ~ Gamma(shape, 1)`.
    fn ln_gamma_variate(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            // Gamma(a) = Gamma(a + 1) * U^(1/a).
            let u = self.open01();
            return self.ln_gamma_variate(shape + 1.0) + u.ln() / shape;
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = self.open01();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d.ln() + v.ln();
            }
        }
    }

    /// A draw from the symmetric Dirichlet distribution `Dir(alpha, ..., alpha)` of dimension `k`.
    pub fn dirichlet(&mut self, alpha: f64, k: usize) -> Vec<f64> {
        let logs: Vec<f64> = (0..k).map(|_| self.ln_gamma_variate(alpha)).collect();
        let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logs.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = w.iter().sum();
        w.into_iter().map(|x| x / sum).collect()
    }
}

/// How to split examples among clients (serialised as `{ scheme = "iid" }` or
/// `{ scheme = "dirichlet", alpha = 0.5 }`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "snake_case", deny_unknown_fields)]
pub enum PartitionScheme {
    Iid,
    /// Label skew: each class is spread over clients by Dirichlet(alpha) shares.
    Dirichlet {
        alpha: f64,
    },
    /// Quantity skew: client sizes follow Dirichlet(alpha) shares, labels stay IID.
    Quantity {
        alpha: f64,
    },
}

impl PartitionScheme {
    /// Splits `labels.len()` examples (IID ignores the label values).
    pub fn split(&self, labels: &[usize], n_clients: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
        match *self {
            PartitionScheme::Iid => iid(labels.len(), n_clients, seed),
            PartitionScheme::Dirichlet { alpha } => dirichlet(labels, n_clients, alpha, seed),
            PartitionScheme::Quantity { alpha } => quantity(labels.len(), n_clients, alpha, seed),
        }
    }
}

fn check_sizes(n: usize, n_clients: usize) -> Result<()> {
    if n_clients == 0 {
        return Err(Error::config("n_clients must be at least 1, found 0"));
    }
    if n < n_clients {
        return Err(Error::config(format!(
            "cannot give each of {n_clients} clients an example: expected at least {n_clients} examples, found {n}"
        )));
    }
    Ok(())
}

/// IID split of `0..n` into `n_clients` near-equal parts.
pub fn iid(n: usize, n_clients: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    check_sizes(n, n_clients)?;
    let mut rng = SplitMix64::new(seed);
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    Ok((0..n_clients)
        .map(|c| {
            let mut part = idx[c * n / n_clients..(c + 1) * n / n_clients].to_vec();
            part.sort_unstable();
            part
        })
        .collect())
}

/// Counts proportional to `p` summing to `total`, by largest remainder (ties to lower index).
fn apportion(p: &[f64], total: usize) -> Vec<usize> {
    let raw: Vec<f64> = p.iter().map(|x| x * total as f64).collect();
    let mut counts: Vec<usize> = raw.iter().map(|x| x.floor() as usize).collect();
    let assigned: usize = counts.iter().sum();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| (raw[b] - raw[b].floor()).total_cmp(&(raw[a] - raw[a].floor())).then(a.cmp(&b)));
    for &i in order.iter().take(total.saturating_sub(assigned)) {
        counts[i] += 1;
    }
    counts
}

/// Dirichlet label-skew split (see the module docs) of examples with the given labels.
pub fn dirichlet(labels: &[usize], n_clients: usize, alpha: f64, seed: u64) -> Result<Vec<Vec<usize>>> {
    check_sizes(labels.len(), n_clients)?;
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::config(format!("Dirichlet alpha must be positive and finite, found {alpha}")));
    }
    let mut rng = SplitMix64::new(seed);
    let n_classes = labels.iter().max().map_or(0, |m| m + 1);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); n_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l].push(i);
    }
    // Per client, indices in the order they were dealt (the fix-up moves the last one).
    let mut parts: Vec<Vec<usize>> = vec![Vec::new(); n_clients];
    for mut members in by_class.into_iter().filter(|m| !m.is_empty()) {
        rng.shuffle(&mut members);
        let shares = rng.dirichlet(alpha, n_clients);
        let counts = apportion(&shares, members.len());
        let mut start = 0;
        for (c, &k) in counts.iter().enumerate() {
            parts[c].extend_from_slice(&members[start..start + k]);
            start += k;
        }
    }
    for c in 0..n_clients {
        if parts[c].is_empty() {
            let donor = (0..n_clients)
                .max_by(|&a, &b| parts[a].len().cmp(&parts[b].len()).then(b.cmp(&a)))
                .expect("n_clients >= 1");
            let moved = parts[donor].pop().expect("the largest client has at least 2 examples when one is empty");
            parts[c].push(moved);
        }
    }
    for p in &mut parts {
        p.sort_unstable();
    }
    Ok(parts)
}

/// Quantity-skew split of `0..n`: client sizes are Dirichlet(alpha) shares of `n` (every client
/// gets at least one example: each starts with one and the shares apportion the rest), the
/// examples themselves are dealt at random. Small alpha = very unequal sizes.
pub fn quantity(n: usize, n_clients: usize, alpha: f64, seed: u64) -> Result<Vec<Vec<usize>>> {
    check_sizes(n, n_clients)?;
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::config(format!("quantity-skew alpha must be positive and finite, found {alpha}")));
    }
    let mut rng = SplitMix64::new(seed);
    let mut idx: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut idx);
    let shares = rng.dirichlet(alpha, n_clients);
    let extra = apportion(&shares, n - n_clients);
    let mut start = 0;
    Ok(extra
        .iter()
        .map(|&k| {
            let mut part = idx[start..start + k + 1].to_vec();
            start += k + 1;
            part.sort_unstable();
            part
        })
        .collect())
}

/// One task per client: client `c` works on task `c % n_tasks` (so every task has a client when
/// `n_clients >= n_tasks`), and the clients sharing a task split its `task_sizes[t]` examples IID.
/// Returns `(task_idx, example indices within that task)` per client.
pub fn one_task_per_client(task_sizes: &[usize], n_clients: usize, seed: u64) -> Result<Vec<(usize, Vec<usize>)>> {
    if task_sizes.is_empty() {
        return Err(Error::config("expected at least one task, found none"));
    }
    if n_clients < task_sizes.len() {
        return Err(Error::config(format!(
            "one task per client needs at least one client per task: expected >= {} clients, found {n_clients}",
            task_sizes.len()
        )));
    }
    let mut out: Vec<(usize, Vec<usize>)> = (0..n_clients).map(|c| (c % task_sizes.len(), Vec::new())).collect();
    for (t, &size) in task_sizes.iter().enumerate() {
        let clients: Vec<usize> = (0..n_clients).filter(|c| c % task_sizes.len() == t).collect();
        let parts = iid(size, clients.len(), seed ^ (t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))?;
        for (c, part) in clients.into_iter().zip(parts) {
            out[c].1 = part;
        }
    }
    Ok(out)
}

/// Statistics of one client's share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientStats {
    pub client_idx: usize,
    pub n_examples: usize,
    /// Examples per class, index = label.
    pub label_hist: Vec<usize>,
    /// Shannon entropy of the client's label distribution, in bits (0 = one class;
    /// `log2(n_classes)` = uniform).
    pub label_entropy_bits: f64,
    /// Tokens in the client's examples, when the caller counted them (see
    /// [`with_token_counts`]); 0 otherwise.
    #[serde(default)]
    pub n_tokens: usize,
}

/// Fills `n_tokens` of each client from per-example token counts.
pub fn with_token_counts(
    mut stats: Vec<ClientStats>,
    parts: &[Vec<usize>],
    tokens_per_example: &[usize],
) -> Result<Vec<ClientStats>> {
    for (s, part) in stats.iter_mut().zip(parts) {
        s.n_tokens = part
            .iter()
            .map(|&i| {
                tokens_per_example.get(i).copied().ok_or_else(|| {
                    Error::config(format!(
                        "client {} holds example {i}, expected < {} token counts",
                        s.client_idx,
                        tokens_per_example.len()
                    ))
                })
            })
            .sum::<Result<usize>>()?;
    }
    Ok(stats)
}

/// Shannon entropy in bits of a histogram (0 for an empty one).
pub fn entropy_bits(hist: &[usize]) -> f64 {
    let total: usize = hist.iter().sum();
    if total == 0 {
        return 0.0;
    }
    // `0.0 - x` rather than `-x`: a single class gives +0, not -0.
    0.0 - hist
        .iter()
        .filter(|&&h| h > 0)
        .map(|&h| {
            let p = h as f64 / total as f64;
            p * p.log2()
        })
        .sum::<f64>()
}

/// Per-client statistics of a partition. `n_classes` is at least `max(label) + 1`.
pub fn partition_stats(parts: &[Vec<usize>], labels: &[usize], n_classes: usize) -> Result<Vec<ClientStats>> {
    let n_classes = n_classes.max(labels.iter().max().map_or(0, |m| m + 1));
    parts
        .iter()
        .enumerate()
        .map(|(client_idx, part)| {
            let mut label_hist = vec![0; n_classes];
            for &i in part {
                let l = labels.get(i).ok_or_else(|| {
                    Error::config(format!(
                        "client {client_idx} holds example {i}, expected < {} examples",
                        labels.len()
                    ))
                })?;
                label_hist[*l] += 1;
            }
            Ok(ClientStats {
                client_idx,
                n_examples: part.len(),
                label_entropy_bits: entropy_bits(&label_hist),
                label_hist,
                n_tokens: 0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // Reference values of SplitMix64 seeded with 0 (Vigna's splitmix64.c).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(r.next_u64(), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn apportion_sums_and_breaks_ties_low() {
        assert_eq!(apportion(&[0.5, 0.5], 3), vec![2, 1]);
        assert_eq!(apportion(&[0.2, 0.3, 0.5], 10), vec![2, 3, 5]);
        assert_eq!(apportion(&[1.0, 0.0], 0), vec![0, 0]);
    }

    #[test]
    fn dirichlet_draws_have_the_right_mean() {
        let mut r = SplitMix64::new(7);
        let k = 4;
        let mut mean = vec![0.0; k];
        for _ in 0..4000 {
            for (m, x) in mean.iter_mut().zip(r.dirichlet(0.3, k)) {
                *m += x / 4000.0;
            }
        }
        for m in mean {
            assert!((m - 0.25).abs() < 0.02, "{m}");
        }
        let tiny = r.dirichlet(1e-3, 3);
        assert!((tiny.iter().sum::<f64>() - 1.0).abs() < 1e-12 && tiny.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn entropy_of_known_histograms() {
        assert_eq!(entropy_bits(&[5, 0]), 0.0);
        assert!((entropy_bits(&[3, 3]) - 1.0).abs() < 1e-12);
        assert!((entropy_bits(&[1, 1, 1, 1]) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn bad_arguments_are_clear_errors() {
        assert!(iid(3, 4, 0).unwrap_err().to_string().contains("expected at least 4 examples, found 3"));
        assert!(iid(3, 0, 0).unwrap_err().to_string().contains("n_clients must be at least 1"));
        assert!(dirichlet(&[0, 1, 0], 2, 0.0, 0).unwrap_err().to_string().contains("alpha must be positive"));
    }
}
