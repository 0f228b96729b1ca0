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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn quantity_skew_is_a_partition_and_deterministic(n_clients in 1usize..20, extra in 0usize..300, alpha in 0.05f64..50.0, seed in any::<u64>()) {
        let n = n_clients + extra;
        let a = hetfed_data::partition::quantity(n, n_clients, alpha, seed).unwrap();
        assert_partition(&a, n, n_clients);
        prop_assert_eq!(&a, &hetfed_data::partition::quantity(n, n_clients, alpha, seed).unwrap());
    }

    #[test]
    fn one_task_per_client_covers_every_task_once(sizes in proptest::collection::vec(1usize..60, 1..5), more in 0usize..6, seed in any::<u64>()) {
        let n_clients = sizes.len() + more;
        // Enough examples for every client sharing a task.
        let sizes: Vec<usize> = sizes.iter().map(|s| s + n_clients).collect();
        let out = hetfed_data::partition::one_task_per_client(&sizes, n_clients, seed).unwrap();
        prop_assert_eq!(out.len(), n_clients);
        for (t, &size) in sizes.iter().enumerate() {
            let parts: Vec<Vec<usize>> = out.iter().filter(|(tt, _)| *tt == t).map(|(_, p)| p.clone()).collect();
            prop_assert!(!parts.is_empty());
            let k = parts.len();
            assert_partition(&parts, size, k);
        }
        prop_assert_eq!(&out, &hetfed_data::partition::one_task_per_client(&sizes, n_clients, seed).unwrap());
    }
}

#[test]
fn small_alpha_quantity_skew_is_unequal_and_token_counts_add_up() {
    let parts = hetfed_data::partition::quantity(1000, 10, 0.1, 3).unwrap();
    let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
    assert!(sizes.iter().max().unwrap() > &(5 * sizes.iter().min().unwrap()), "{sizes:?}");
    let labels = vec![0usize; 1000];
    let tokens: Vec<usize> = (0..1000).map(|i| i % 7 + 1).collect();
    let stats = hetfed_data::partition::with_token_counts(
        hetfed_data::partition_stats(&parts, &labels, 1).unwrap(),
        &parts,
        &tokens,
    )
    .unwrap();
    assert_eq!(stats.iter().map(|s| s.n_tokens).sum::<usize>(), tokens.iter().sum::<usize>());
    assert!(hetfed_data::partition::one_task_per_client(&[5, 5], 1, 0).is_err());
}
