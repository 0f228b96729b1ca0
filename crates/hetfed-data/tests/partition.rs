//! Properties of the client partitions, and a Dirichlet split of the real Ethos labels.

mod common;

use hetfed_data::partition::{dirichlet, entropy_bits, iid, partition_stats};
use hetfed_data::{PartitionScheme, Split};
use proptest::prelude::*;

/// Every index of `0..n` exactly once, every client non-empty and sorted.
fn assert_partition(parts: &[Vec<usize>], n: usize, n_clients: usize) {
    assert_eq!(parts.len(), n_clients);
    let mut seen = vec![false; n];
    for p in parts {
        assert!(!p.is_empty(), "an empty client");
        assert!(p.windows(2).all(|w| w[0] < w[1]), "not sorted");
        for &i in p {
            assert!(i < n && !seen[i], "index {i} out of range or repeated");
            seen[i] = true;
        }
    }
    assert!(seen.iter().all(|&s| s), "an index is missing");
}

/// `(labels, n_clients)` with `n_clients <= labels.len()`.
fn labels_and_clients() -> impl Strategy<Value = (Vec<usize>, usize)> {
    (1usize..6, 1usize..300).prop_flat_map(|(n_classes, n)| (prop::collection::vec(0..n_classes, n), 1..=n.min(20)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn iid_is_a_balanced_partition_and_deterministic(n_clients in 1usize..30, extra in 0usize..500, seed in any::<u64>()) {
        let n = n_clients + extra;
        let parts = iid(n, n_clients, seed).unwrap();
        assert_partition(&parts, n, n_clients);
        let (lo, hi) = (parts.iter().map(Vec::len).min().unwrap(), parts.iter().map(Vec::len).max().unwrap());
        prop_assert!(hi - lo <= 1);
        prop_assert_eq!(iid(n, n_clients, seed).unwrap(), parts);
    }

    #[test]
    fn dirichlet_is_a_partition_and_deterministic(
        (labels, n_clients) in labels_and_clients(),
        log_alpha in -5.0f64..5.0,
        seed in any::<u64>(),
    ) {
        let alpha = 10f64.powf(log_alpha);
        let parts = dirichlet(&labels, n_clients, alpha, seed).unwrap();
        assert_partition(&parts, labels.len(), n_clients);
        prop_assert_eq!(&dirichlet(&labels, n_clients, alpha, seed).unwrap(), &parts);
        let scheme = PartitionScheme::Dirichlet { alpha };
        prop_assert_eq!(&scheme.split(&labels, n_clients, seed).unwrap(), &parts);
        let stats = partition_stats(&parts, &labels, 0).unwrap();
        prop_assert_eq!(stats.iter().map(|s| s.n_examples).sum::<usize>(), labels.len());
        for s in &stats {
            prop_assert_eq!(s.label_hist.iter().sum::<usize>(), s.n_examples);
            prop_assert!((entropy_bits(&s.label_hist) - s.label_entropy_bits).abs() < 1e-12);
        }
    }

    #[test]
    fn dirichlet_with_large_alpha_approaches_iid_label_proportions(
        n_classes in 2usize..5,
        n_clients in 2usize..8,
        n in 1000usize..2000,
        seed in any::<u64>(),
    ) {
        let labels: Vec<usize> = (0..n).map(|i| (i * 7 + i / 3) % n_classes).collect();
        let global: Vec<f64> = (0..n_classes).map(|k| labels.iter().filter(|&&l| l == k).count() as f64 / n as f64).collect();
        let parts = dirichlet(&labels, n_clients, 1e5, seed).unwrap();
        for s in partition_stats(&parts, &labels, n_classes).unwrap() {
            // Shares within a few percent of 1/n_clients, class mix within a few points of global.
            prop_assert!((s.n_examples as f64 / n as f64 - 1.0 / n_clients as f64).abs() < 0.01);
            for (k, &h) in s.label_hist.iter().enumerate() {
                prop_assert!((h as f64 / s.n_examples as f64 - global[k]).abs() < 0.02, "client {} class {k}", s.client_idx);
            }
        }
    }
}

#[test]
fn small_alpha_skews_labels_and_seeds_differ() {
    let labels: Vec<usize> = (0..1000).map(|i| i % 4).collect();
    let mean_entropy = |alpha: f64| {
        let parts = dirichlet(&labels, 10, alpha, 3).unwrap();
        let s = partition_stats(&parts, &labels, 4).unwrap();
        s.iter().map(|c| c.label_entropy_bits).sum::<f64>() / s.len() as f64
    };
    let (skewed, mild, flat) = (mean_entropy(0.05), mean_entropy(1.0), mean_entropy(1000.0));
    assert!(skewed < mild && mild < flat, "{skewed} {mild} {flat}");
    assert!(flat > 1.99 && skewed < 1.0, "{skewed} {flat}");
    assert_ne!(dirichlet(&labels, 10, 0.5, 1).unwrap(), dirichlet(&labels, 10, 0.5, 2).unwrap());
    // Extreme skew still leaves every client an example.
    let parts = dirichlet(&labels, 50, 1e-4, 9).unwrap();
    assert!(parts.iter().all(|p| !p.is_empty()));
}

#[test]
fn partition_scheme_reads_from_toml() {
    let s: PartitionScheme = toml::from_str("scheme = \"dirichlet\"\nalpha = 0.3").unwrap();
    assert_eq!(s, PartitionScheme::Dirichlet { alpha: 0.3 });
    let s: PartitionScheme = toml::from_str("scheme = \"iid\"").unwrap();
    assert_eq!(s, PartitionScheme::Iid);
}

#[test]
fn ethos_labels_split_among_clients() {
    let Some(dir) = common::shared_data("ethos") else { return };
    let ex = hetfed_data::builtin("ethos").unwrap().load(&dir, Split::Train).unwrap();
    let labels = ex.labels().unwrap();
    let parts = PartitionScheme::Dirichlet { alpha: 0.5 }.split(&labels, 8, 42).unwrap();
    assert_partition(&parts, labels.len(), 8);
    let stats = partition_stats(&parts, &labels, 2).unwrap();
    assert_eq!(stats.iter().map(|s| s.label_hist[1]).sum::<usize>(), 273);
    let client = ex.subset(&parts[0]).unwrap();
    assert_eq!(client.len(), stats[0].n_examples);
    assert_eq!(client.labels().unwrap().iter().filter(|&&l| l == 1).count(), stats[0].label_hist[1]);
}
