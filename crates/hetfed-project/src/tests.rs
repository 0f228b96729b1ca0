use candle_core::{DType, Device, Tensor};
use hetfed_core::Error;
use nalgebra::DMatrix;
use proptest::prelude::*;

use crate::map::gaussian_f64;
use crate::*;

fn gauss(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
    gaussian_f64(rows, cols, seed)
}

fn ten(m: &DMatrix<f64>) -> Tensor {
    matrix_f64_to_tensor(m, &Device::Cpu).unwrap()
}

fn mat(t: &Tensor) -> DMatrix<f64> {
    tensor_to_matrix_f64(t, "t").unwrap()
}

fn map64(m: &Map) -> DMatrix<f64> {
    m.matrix().map(f64::from)
}

fn max_abs_diff(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    (a - b).amax()
}

/// `X_s` (`[400, 8]`) and the semi-orthogonal `Q` (`[16, 8]`) of the rotation tests.
fn rotation_data() -> (DMatrix<f64>, DMatrix<f64>) {
    let xs = gauss(400, 8, 1);
    let q = map64(&random_orthogonal(16, 8, 2).unwrap());
    (xs, q)
}

#[test]
fn procrustes_and_ridge_recover_a_rotation() {
    let (xs, q) = rotation_data();
    let xl = &xs * q.transpose();
    for centring in [Centring::None, Centring::Mean] {
        let (p, rep) = fit_procrustes(&ten(&xs), &ten(&xl), centring).unwrap();
        assert_eq!(p.kind(), MapKind::Procrustes);
        assert_eq!((p.d_large(), p.d_small()), (16, 8));
        assert!(max_abs_diff(&map64(&p), &q) < 1e-3, "procrustes {centring:?}: {}", max_abs_diff(&map64(&p), &q));
        assert!(rep.explained_variance > 0.999, "{rep:?}");
        assert_eq!(rep.n_samples, 400);
        assert!(p.orthogonality_error() < 1e-5);

        let (r, rep) = fit_ridge(&ten(&xs), &ten(&xl), 1e-6, centring).unwrap();
        assert!(max_abs_diff(&map64(&r), &q) < 1e-3, "ridge {centring:?}: {}", max_abs_diff(&map64(&r), &q));
        assert!(rep.explained_variance > 0.999, "{rep:?}");
    }
    // Without lambda the normal equations are still well posed here.
    let (r, _) = fit_ridge(&ten(&xs), &ten(&xl), 0.0, Centring::None).unwrap();
    assert!(max_abs_diff(&map64(&r), &q) < 1e-3);
}

#[test]
fn noise_lowers_explained_variance_but_it_stays_high() {
    let (xs, q) = rotation_data();
    let xl = &xs * q.transpose() + gauss(400, 16, 3) * 0.1;
    // Expected R² ≈ 1 - 16·0.01 / (8 + 16·0.01) ≈ 0.98.
    let (p, rp) = fit_procrustes(&ten(&xs), &ten(&xl), Centring::Mean).unwrap();
    let (r, rr) = fit_ridge(&ten(&xs), &ten(&xl), 1e-3, Centring::Mean).unwrap();
    for (name, rep) in [("procrustes", &rp), ("ridge", &rr)] {
        assert!(rep.explained_variance < 0.995 && rep.explained_variance > 0.95, "{name}: {rep:?}");
    }
    // Ridge minimises the training residual over a larger set than Procrustes.
    assert!(rr.explained_variance >= rp.explained_variance - 1e-9);
    assert!(max_abs_diff(&map64(&p), &q) < 0.05);
    // Held-out pairs from the same relation score about as well.
    let xs2 = gauss(200, 8, 4);
    let xl2 = &xs2 * q.transpose() + gauss(200, 16, 5) * 0.1;
    for m in [&p, &r] {
        let r2 = m.explained_variance(&ten(&xs2), &ten(&xl2)).unwrap();
        assert!(r2 > 0.95 && r2 < 0.995, "held-out R² {r2}");
    }
}

#[test]
fn random_orthogonal_is_semi_orthogonal_and_explains_little() {
    let (xs, q) = rotation_data();
    let xl = &xs * q.transpose();
    let rnd = random_orthogonal(16, 8, 99).unwrap();
    assert_eq!(rnd.kind(), MapKind::RandomOrthogonal);
    let t = map64(&rnd);
    assert!(max_abs_diff(&t.tr_mul(&t), &DMatrix::identity(8, 8)) < 1e-5);
    let r2 = rnd.explained_variance(&ten(&xs), &ten(&xl)).unwrap();
    assert!(r2 < 0.5, "a random map should explain little, got R² {r2}");
    // Wide maps have orthonormal rows instead.
    let wide = random_orthogonal(5, 9, 7).unwrap();
    assert_eq!((wide.d_large(), wide.d_small()), (5, 9));
    assert!(wide.orthogonality_error() < 1e-5);
    // Seeded: same seed, same map; other seed, other map.
    assert_eq!(random_orthogonal(16, 8, 99).unwrap(), rnd);
    assert!(max_abs_diff(&map64(&random_orthogonal(16, 8, 100).unwrap()), &t) > 0.1);
}

#[test]
fn widened_permuted_copy_is_recovered() {
    let xs = gauss(300, 6, 11);
    // Column k of X_s lands in column perm[k] of X_l; the other 6 columns are zero.
    let perm = [7, 2, 11, 0, 5, 9];
    let mut xl = DMatrix::<f64>::zeros(300, 12);
    let mut expected = DMatrix::<f64>::zeros(12, 6);
    for (k, &p) in perm.iter().enumerate() {
        xl.set_column(p, &xs.column(k));
        expected[(p, k)] = 1.0;
    }
    let (p, rep) = fit_procrustes(&ten(&xs), &ten(&xl), Centring::None).unwrap();
    assert!(max_abs_diff(&map64(&p), &expected) < 1e-3, "{}", map64(&p));
    assert!(rep.explained_variance > 0.999);
    let (r, _) = fit_ridge(&ten(&xs), &ten(&xl), 1e-6, Centring::Mean).unwrap();
    assert!(max_abs_diff(&map64(&r), &expected) < 1e-3);
    // The map applied to fresh activations reproduces the copy.
    let xs2 = gauss(5, 6, 12);
    let y = mat(&r.apply(&ten(&xs2)).unwrap());
    for (k, &p) in perm.iter().enumerate() {
        assert!((y.column(p) - xs2.column(k)).amax() < 1e-3);
    }
}

#[test]
fn project_lora_keeps_rank_and_matches_project_full() {
    let (o_s, i_s, r, o_l, i_l) = (12, 10, 3, 20, 18);
    let b = gauss(o_s, r, 21);
    let a = gauss(r, i_s, 22);
    let t_out = random_orthogonal(o_l, o_s, 23).unwrap();
    // A general (not orthogonal) input map, as ridge would give.
    let t_in = Map::new(gauss(i_l, i_s, 24).map(|v| v as f32)).unwrap();
    let (b2, a2) = project_lora(&ten(&b), &ten(&a), &t_out, &t_in).unwrap();
    assert_eq!(b2.dims(), &[o_l, r]);
    assert_eq!(a2.dims(), &[r, i_l]);
    let prod = b2.matmul(&a2).unwrap();
    let sv = singular_values(&prod).unwrap();
    assert!(sv[r - 1] > 1e-2 * sv[0], "rank below {r}: {sv:?}");
    assert!(sv[r] < 1e-5 * sv[0], "rank above {r}: {sv:?}");
    assert_eq!(numerical_rank(&prod, 1e-5).unwrap(), r);
    let full = project_full(&ten(&(&b * &a)), &t_out, &t_in).unwrap();
    let diff = max_abs_diff(&mat(&prod), &mat(&full));
    assert!(diff < 1e-4 * mat(&full).amax().max(1.0), "{diff}");
}

#[test]
fn identity_maps_and_transposes_undo_projection() {
    let dw = gauss(7, 5, 31);
    let (i_out, i_in) = (Map::identity(7, 7).unwrap(), Map::identity(5, 5).unwrap());
    assert_eq!(mat(&project_full(&ten(&dw), &i_out, &i_in).unwrap()), mat(&ten(&dw)));
    // Semi-orthogonal T: projecting up with T and back with T^T returns the original.
    let (t_out, t_in) = (random_orthogonal(13, 7, 32).unwrap(), random_orthogonal(11, 5, 33).unwrap());
    let up = project_full(&ten(&dw), &t_out, &t_in).unwrap();
    assert_eq!(up.dims(), &[13, 11]);
    let back = project_full(&up, &t_out.transpose(), &t_in.transpose()).unwrap();
    assert!(max_abs_diff(&mat(&back), &dw) < 1e-4);
    // ... but not the other way round: T·T^T is a projection, not the identity.
    let big = gauss(13, 11, 34);
    let down = project_full(&ten(&big), &t_out.transpose(), &t_in.transpose()).unwrap();
    let round = project_full(&down, &t_out, &t_in).unwrap();
    assert!(max_abs_diff(&mat(&round), &big) > 0.1);
    // Bias vectors: T^T·T·db = db.
    let db = Tensor::new(&[1.0f32, -2.0, 0.5, 3.0, 0.0, 1.5, -1.0], &Device::Cpu).unwrap();
    let up = project_vector(&db, &t_out).unwrap();
    assert_eq!(up.dims(), &[13]);
    let back = project_vector(&up, &t_out.transpose()).unwrap();
    let d = (back - &db).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-5, "{d}");
}

#[test]
fn projection_keeps_dtype() {
    let dw = ten(&gauss(4, 3, 35)).to_dtype(DType::BF16).unwrap();
    let out = project_full(&dw, &random_orthogonal(6, 4, 1).unwrap(), &random_orthogonal(5, 3, 2).unwrap()).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    assert_eq!(out.dims(), &[6, 5]);
}

#[test]
fn recompressed_factors_are_exact_at_full_rank_and_the_best_approximation_below() {
    let (b, a) = (gauss(20, 6, 51), gauss(6, 15, 52));
    let m = &b * &a;
    let sv = singular_values(&ten(&m)).unwrap();
    for k in [6, 9] {
        let (b2, a2, dropped) = recompress_factors(&ten(&b), &ten(&a), k).unwrap();
        assert_eq!((b2.dims(), a2.dims()), (&[20, 6][..], &[6, 15][..]), "k = {k} keeps the rank 6");
        assert!(max_abs_diff(&(mat(&b2) * mat(&a2)), &m) < 1e-4 && dropped < 1e-9, "k = {k}");
    }
    for k in [1, 3] {
        let (b2, a2, dropped) = recompress_factors(&ten(&b), &ten(&a), k).unwrap();
        let (tb, ta) = truncated_svd(&ten(&m), k).unwrap();
        assert!(max_abs_diff(&(mat(&b2) * mat(&a2)), &(mat(&tb) * mat(&ta))) < 1e-4, "k = {k}");
        let expected = sv[k..].iter().map(|s| s * s).sum::<f64>().sqrt();
        assert!((dropped - expected).abs() < 1e-6 * expected, "k = {k}: {dropped} vs {expected}");
        // A's rows are orthonormal: B' carries the singular values.
        let aa = mat(&a2) * mat(&a2).transpose();
        assert!((aa - DMatrix::<f64>::identity(k, k)).amax() < 1e-5);
    }
    assert!(recompress_factors(&ten(&b), &ten(&a), 0).is_err());
    assert!(recompress_factors(&ten(&b), &ten(&gauss(5, 15, 1)), 2).is_err());
}

#[test]
fn truncated_svd_is_exact_on_low_rank_and_optimal_otherwise() {
    // Rank-2 input: reconstructed exactly.
    let m = gauss(9, 2, 41) * gauss(2, 7, 42);
    let (b, a) = truncated_svd(&ten(&m), 2).unwrap();
    assert_eq!((b.dims(), a.dims()), (&[9, 2][..], &[2, 7][..]));
    assert!(max_abs_diff(&(mat(&b) * mat(&a)), &m) < 1e-4);
    // The square roots of the singular values are split evenly: equal factor norms.
    let (nb, na) = (mat(&b).norm(), mat(&a).norm());
    assert!((nb - na).abs() < 1e-4 * nb, "{nb} vs {na}");

    // Full-rank input: error = sqrt(sum of the dropped singular values squared).
    let m = gauss(10, 7, 43);
    let sv = singular_values(&ten(&m)).unwrap();
    assert!(sv.windows(2).all(|w| w[0] >= w[1]), "not descending: {sv:?}");
    for r in [1, 3, 6] {
        let (b, a) = truncated_svd(&ten(&m), r).unwrap();
        let err = (mat(&b) * mat(&a) - &m).norm();
        let expected = sv[r..].iter().map(|s| s * s).sum::<f64>().sqrt();
        assert!((err - expected).abs() < 1e-4 * expected.max(1.0), "r={r}: {err} vs {expected}");
    }
    let (b, a) = truncated_svd(&ten(&m), 7).unwrap();
    assert!(max_abs_diff(&(mat(&b) * mat(&a)), &m) < 1e-4);
}

/// Four weight pairs `W_l = A0·W_s·B0^T` (`W_s` `[6, 5]`, `W_l` `[12, 10]`).
fn weight_pairs(a0: &DMatrix<f64>, b0: &DMatrix<f64>) -> (Vec<Tensor>, Vec<Tensor>) {
    let small: Vec<DMatrix<f64>> = (0..4).map(|k| gauss(a0.ncols(), b0.ncols(), 60 + k)).collect();
    let ws = small.iter().map(ten).collect();
    let wl = small.iter().map(|w| ten(&(a0 * w * b0.transpose()))).collect();
    (ws, wl)
}

fn assert_monotone(rep: &WeightFitReport) {
    assert!(rep.errors[0] <= rep.initial_error * (1.0 + 1e-9) + 1e-12, "{rep:?}");
    for w in rep.errors.windows(2) {
        assert!(w[1] <= w[0] * (1.0 + 1e-9) + 1e-12, "error rose: {:?}", rep.errors);
    }
}

#[test]
fn weight_space_fit_recovers_semi_orthogonal_maps() {
    let a0 = map64(&random_orthogonal(12, 6, 51).unwrap());
    let b0 = map64(&random_orthogonal(10, 5, 52).unwrap());
    let (ws, wl) = weight_pairs(&a0, &b0);
    let fit = fit_weight_space(&ws, &wl, &WeightFitOptions::default()).unwrap();
    let rep = &fit.report;
    assert_eq!(rep.errors.len(), 50);
    assert_eq!(rep.n_pairs, 4);
    assert_monotone(rep);
    assert!(*rep.errors.last().unwrap() < 1e-2, "{rep:?}");
    assert_eq!((fit.out_map.d_large(), fit.out_map.d_small()), (12, 6));
    assert_eq!((fit.in_map.d_large(), fit.in_map.d_small()), (10, 5));
    // The fitted pair transports an unseen update as the true pair does.
    let dw = gauss(6, 5, 70);
    let got = mat(&project_full(&ten(&dw), &fit.out_map, &fit.in_map).unwrap());
    let want = &a0 * &dw * b0.transpose();
    assert!((got - &want).norm() < 1e-2 * want.norm());

    // From the identity-padded start the alternation still never gets worse.
    let opts = WeightFitOptions { init: WeightFitInit::IdentityPadded, ..Default::default() };
    let rep = fit_weight_space(&ws, &wl, &opts).unwrap().report;
    assert_monotone(&rep);
}

#[test]
fn weight_space_fit_refines_general_maps() {
    // Neither map semi-orthogonal, and a scale: the spectral start is only approximate, and the
    // alternation has real work to do.
    let a0 = map64(&random_orthogonal(12, 6, 53).unwrap()) * 2.0 + gauss(12, 6, 54) * 0.2;
    let b0 = map64(&random_orthogonal(10, 5, 55).unwrap()) + gauss(10, 5, 56) * 0.2;
    let (ws, wl) = weight_pairs(&a0, &b0);
    let rep = fit_weight_space(&ws, &wl, &WeightFitOptions::default()).unwrap().report;
    assert_monotone(&rep);
    let last = *rep.errors.last().unwrap();
    assert!(last < 1e-2, "{rep:?}");
    assert!(rep.initial_error > 10.0 * last, "{rep:?}");
}

#[test]
fn weight_space_fit_rejects_mismatched_pairs() {
    let ws = vec![ten(&gauss(3, 2, 1)), ten(&gauss(3, 3, 2))];
    let wl = vec![ten(&gauss(6, 4, 3)), ten(&gauss(6, 4, 4))];
    let e = fit_weight_space(&ws, &wl, &WeightFitOptions::default()).unwrap_err();
    assert!(matches!(&e, Error::Shape { expected, found, .. } if expected == &[3, 2] && found == &[3, 3]), "{e}");
    let e = fit_weight_space(&ws[..1], &wl, &WeightFitOptions::default()).unwrap_err();
    assert!(e.to_string().contains("1 and 2"), "{e}");
}

#[test]
fn pair_layers_follows_the_formula() {
    let formula = |j: usize, ls: usize, ll: usize| ((j * (ls - 1)) as f64 / (ll - 1) as f64).round() as usize;
    for (ls, ll) in [(4, 8), (24, 30), (2, 24), (30, 24), (5, 5), (1, 6)] {
        let p = pair_layers(ls, ll).unwrap();
        assert_eq!(p.len(), ll);
        let expected: Vec<usize> = (0..ll).map(|j| formula(j, ls, ll)).collect();
        assert_eq!(p, expected, "({ls}, {ll})");
        assert_eq!(p[0], 0);
        assert_eq!(p[ll - 1], ls - 1);
        assert!(p.windows(2).all(|w| w[0] <= w[1]));
    }
    assert_eq!(pair_layers(4, 8).unwrap(), vec![0, 0, 1, 1, 2, 2, 3, 3]);
    let p = pair_layers(24, 30).unwrap();
    assert_eq!((p[0], p[29]), (0, 23));
    assert_eq!(pair_layers(5, 5).unwrap(), vec![0, 1, 2, 3, 4]);
    assert_eq!(pair_layers(7, 1).unwrap(), vec![0]);
    assert!(pair_layers(3, 0).unwrap().is_empty());
    assert!(pair_layers(0, 3).is_err());
}

#[test]
fn stacked_qkv_split_and_join() {
    let m = ten(&gauss(12, 4, 81));
    let parts = split_rows(&m, 3).unwrap();
    assert_eq!(parts.len(), 3);
    assert_eq!(mat(&parts[1]), mat(&m).rows(4, 4).into_owned());
    assert_eq!(mat(&concat_rows(&parts).unwrap()), mat(&m));
    assert!(split_rows(&m, 5).is_err());
    assert!(split_rows(&m, 0).is_err());
    // Grouped-query attention: Q larger than K and V.
    let parts = split_rows_sizes(&m, &[6, 3, 3]).unwrap();
    assert_eq!(parts[2].dims(), &[3, 4]);
    assert_eq!(mat(&parts[2]), mat(&m).rows(9, 3).into_owned());
    assert_eq!(mat(&concat_rows(&parts).unwrap()), mat(&m));
    assert!(split_rows_sizes(&m, &[6, 3]).is_err());
    let e = concat_rows(&[parts[0].clone(), ten(&gauss(2, 5, 1))]).unwrap_err();
    assert!(matches!(&e, Error::Shape { expected, found, .. } if expected == &[2, 4] && found == &[2, 5]), "{e}");
    // Biases split the same way.
    let bias = Tensor::arange(0f32, 9.0, &Device::Cpu).unwrap();
    let parts = split_rows(&bias, 3).unwrap();
    assert_eq!(parts[2].to_vec1::<f32>().unwrap(), vec![6.0, 7.0, 8.0]);
}

#[test]
fn bloom_interleaved_qkv_split_and_join() {
    // Row (head h, part p, dim d) of BLOOM's fused QKV holds 100h + 10p + d in every column.
    let (nh, hd, cols) = (3, 2, 4);
    let rows: Vec<f32> =
        (0..nh).flat_map(|h| (0..3).flat_map(move |p| (0..hd).map(move |d| (100 * h + 10 * p + d) as f32))).collect();
    let m = Tensor::from_vec(rows.clone(), (nh * 3 * hd, 1), &Device::Cpu)
        .unwrap()
        .broadcast_as((nh * 3 * hd, cols))
        .unwrap()
        .contiguous()
        .unwrap();
    let parts = split_rows_interleaved(&m, nh, 3).unwrap();
    for (p, part) in parts.iter().enumerate() {
        assert_eq!(part.dims(), &[nh * hd, cols]);
        let got = mat(part);
        for h in 0..nh {
            for d in 0..hd {
                assert_eq!(got[(h * hd + d, cols - 1)], (100 * h + 10 * p + d) as f64);
            }
        }
    }
    assert_eq!(mat(&concat_rows_interleaved(&parts, nh).unwrap()), mat(&m));
    // The bias uses the same row order.
    let bias = Tensor::from_vec(rows, nh * 3 * hd, &Device::Cpu).unwrap();
    let parts = split_rows_interleaved(&bias, nh, 3).unwrap();
    assert_eq!(parts[1].to_vec1::<f32>().unwrap(), vec![10.0, 11.0, 110.0, 111.0, 210.0, 211.0]);
    assert_eq!(concat_rows_interleaved(&parts, nh).unwrap().to_vec1::<f32>().unwrap(), bias.to_vec1::<f32>().unwrap());
    assert!(split_rows_interleaved(&m, 4, 3).is_err());
}

#[test]
fn fused_qkv_lora_projected_per_part() {
    // Small: 2 heads of 3 (h_s = 6); large: 4 heads of 2 (h_l = 8); rank 2; BLOOM layout.
    let (h_s, h_l, nh_s, nh_l, r) = (6, 8, 2, 4, 2);
    let b = ten(&gauss(3 * h_s, r, 91));
    let a = ten(&gauss(r, h_s, 92));
    let t_in = random_orthogonal(h_l, h_s, 93).unwrap();
    let t_outs: Vec<Map> = (0..3).map(|k| random_orthogonal(h_l, h_s, 94 + k).unwrap()).collect();
    // LoRA: split B only, A is shared.
    let b_parts = split_rows_interleaved(&b, nh_s, 3).unwrap();
    let mut a2 = None;
    let mut b2_parts = Vec::new();
    for (bp, t_out) in b_parts.iter().zip(&t_outs) {
        let (b2, a2p) = project_lora(bp, &a, t_out, &t_in).unwrap();
        b2_parts.push(b2);
        a2 = Some(a2p);
    }
    let b2 = concat_rows_interleaved(&b2_parts, nh_l).unwrap();
    let a2 = a2.unwrap();
    assert_eq!(b2.dims(), &[3 * h_l, r]);
    // Dense: split the update's rows, project each part, join.
    let dw = b.matmul(&a).unwrap();
    let dense_parts: Vec<Tensor> = split_rows_interleaved(&dw, nh_s, 3)
        .unwrap()
        .iter()
        .zip(&t_outs)
        .map(|(p, t)| project_full(p, t, &t_in).unwrap())
        .collect();
    let dense = concat_rows_interleaved(&dense_parts, nh_l).unwrap();
    assert!(max_abs_diff(&mat(&b2.matmul(&a2).unwrap()), &mat(&dense)) < 1e-4);
}

#[test]
fn bad_shapes_are_errors_naming_both_shapes() {
    let t_out = random_orthogonal(8, 4, 1).unwrap();
    let t_in = random_orthogonal(6, 3, 2).unwrap();
    let e = project_full(&ten(&gauss(3, 4, 3)), &t_out, &t_in).unwrap_err();
    assert!(matches!(&e, Error::Shape { expected, found, .. } if expected == &[4, 3] && found == &[3, 4]), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("[4, 3]") && msg.contains("[3, 4]"), "{msg}");
    // LoRA: rank disagreement between B and A.
    let e = project_lora(&ten(&gauss(4, 2, 4)), &ten(&gauss(3, 3, 5)), &t_out, &t_in).unwrap_err();
    assert!(matches!(&e, Error::Shape { expected, found, .. } if expected == &[2, 3] && found == &[3, 3]), "{e}");
    let e = project_lora(&ten(&gauss(5, 2, 4)), &ten(&gauss(2, 3, 5)), &t_out, &t_in).unwrap_err();
    assert!(matches!(&e, Error::Shape { expected, found, .. } if expected == &[4, 2] && found == &[5, 2]), "{e}");
    let e = project_vector(&Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(), &t_out).unwrap_err();
    assert!(matches!(&e, Error::Shape { expected, found, .. } if expected == &[4] && found == &[5]), "{e}");
    // Rank-3 input where a matrix is expected.
    let e = project_full(&Tensor::zeros((4, 3, 1), DType::F32, &Device::Cpu).unwrap(), &t_out, &t_in).unwrap_err();
    assert!(e.to_string().contains("[4, 3, 1]"), "{e}");
    // Fits: rows disagree, too few rows, NaN, negative lambda.
    let e = fit_procrustes(&ten(&gauss(10, 3, 6)), &ten(&gauss(9, 5, 7)), Centring::None).unwrap_err();
    assert!(matches!(&e, Error::Shape { expected, found, .. } if expected == &[10, 5] && found == &[9, 5]), "{e}");
    assert!(fit_ridge(&ten(&gauss(1, 3, 6)), &ten(&gauss(1, 5, 7)), 0.0, Centring::None).is_err());
    let mut bad = gauss(10, 3, 8);
    bad[(4, 1)] = f64::NAN;
    let e = fit_ridge(&ten(&bad), &ten(&gauss(10, 5, 9)), 1.0, Centring::None).unwrap_err();
    assert!(e.to_string().contains("[4, 1]"), "{e}");
    assert!(fit_ridge(&ten(&gauss(10, 3, 6)), &ten(&gauss(10, 5, 7)), -1.0, Centring::None).is_err());
    let e = t_out.explained_variance(&ten(&gauss(10, 3, 6)), &ten(&gauss(10, 8, 7))).unwrap_err();
    assert!(matches!(&e, Error::Shape { .. }), "{e}");
    assert!(t_out.apply(&ten(&gauss(2, 3, 1))).is_err());
    // Decompositions and constructors.
    assert!(truncated_svd(&ten(&gauss(4, 3, 1)), 0).is_err());
    assert!(truncated_svd(&ten(&gauss(4, 3, 1)), 4).is_err());
    assert!(random_orthogonal(0, 3, 1).is_err());
    assert!(Map::new(DMatrix::zeros(0, 2)).is_err());
    assert!(Map::new(DMatrix::from_element(2, 2, f32::INFINITY)).is_err());
}

#[test]
fn map_tensor_round_trip_and_transpose() {
    let t = gauss(5, 3, 5).map(|v| v as f32);
    let m = Map::new(t.clone()).unwrap();
    let tt = m.to_tensor(&Device::Cpu).unwrap();
    assert_eq!(tt.dims(), &[5, 3]);
    assert_eq!(Map::from_tensor(&tt).unwrap().matrix(), &t);
    let back = m.transpose();
    assert_eq!((back.d_large(), back.d_small()), (3, 5));
    assert_eq!(back.matrix(), &t.transpose());
    assert_eq!(back.kind(), MapKind::Transposed);
    // A centred fit keeps its means and swaps them when transposed.
    let xs = gauss(50, 3, 6).add_scalar(5.0);
    let xl = gauss(50, 4, 7).add_scalar(-2.0);
    let (f, _) = fit_procrustes(&ten(&xs), &ten(&xl), Centring::Mean).unwrap();
    let (mu_s, mu_l) = f.means().unwrap();
    assert!((mu_s.mean() - 5.0).abs() < 0.5 && (mu_l.mean() + 2.0).abs() < 0.5);
    let (ts, tl) = f.transpose().means().map(|(s, l)| (s.clone(), l.clone())).unwrap();
    assert_eq!((&ts, &tl), (mu_l, mu_s));
}

fn dims() -> impl Strategy<Value = usize> {
    1usize..6
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn projections_have_the_documented_shapes(
        o_s in dims(), i_s in dims(), o_l in dims(), i_l in dims(), r in dims(), seed in 0u64..1000,
    ) {
        let t_out = random_orthogonal(o_l, o_s, seed).unwrap();
        let t_in = random_orthogonal(i_l, i_s, seed + 1).unwrap();
        let dw = ten(&gauss(o_s, i_s, seed + 2));
        let full = project_full(&dw, &t_out, &t_in).unwrap();
        prop_assert_eq!(full.dims(), &[o_l, i_l]);
        let (b, a) = (ten(&gauss(o_s, r, seed + 3)), ten(&gauss(r, i_s, seed + 4)));
        let (b2, a2) = project_lora(&b, &a, &t_out, &t_in).unwrap();
        prop_assert_eq!(b2.dims(), &[o_l, r]);
        prop_assert_eq!(a2.dims(), &[r, i_l]);
        let lora = mat(&b2.matmul(&a2).unwrap());
        let dense = mat(&project_full(&b.matmul(&a).unwrap(), &t_out, &t_in).unwrap());
        prop_assert!(max_abs_diff(&lora, &dense) < 1e-4 * dense.amax().max(1.0));
        let v = project_vector(&ten(&gauss(o_s, 1, seed + 5)).squeeze(1).unwrap(), &t_out).unwrap();
        prop_assert_eq!(v.dims(), &[o_l]);
        // Wrong orientation is refused whenever the shapes differ.
        if o_s != i_s {
            prop_assert!(project_full(&dw.t().unwrap(), &t_out, &t_in).is_err());
        }
        let k = r.min(o_s).min(i_s);
        let (sb, sa) = truncated_svd(&dw, k).unwrap();
        prop_assert_eq!(sb.dims(), &[o_s, k]);
        prop_assert_eq!(sa.dims(), &[k, i_s]);
    }

    #[test]
    fn split_then_concat_is_identity(parts in 1usize..4, nh in 1usize..4, hd in 1usize..4, cols in 1usize..4, seed in 0u64..1000) {
        let m = ten(&gauss(parts * nh * hd, cols, seed));
        let stacked = split_rows(&m, parts).unwrap();
        prop_assert_eq!(stacked.len(), parts);
        prop_assert_eq!(mat(&concat_rows(&stacked).unwrap()), mat(&m));
        let inter = split_rows_interleaved(&m, nh, parts).unwrap();
        prop_assert!(inter.iter().all(|p| p.dims() == [nh * hd, cols]));
        prop_assert_eq!(mat(&concat_rows_interleaved(&inter, nh).unwrap()), mat(&m));
    }

    #[test]
    fn pair_layers_is_monotone_and_covers_the_ends(ls in 1usize..40, ll in 1usize..60) {
        let p = pair_layers(ls, ll).unwrap();
        prop_assert_eq!(p.len(), ll);
        prop_assert_eq!(p[0], 0);
        prop_assert_eq!(*p.last().unwrap(), if ll == 1 { 0 } else { ls - 1 });
        prop_assert!(p.windows(2).all(|w| w[0] <= w[1]));
        prop_assert!(p.iter().all(|&i| i < ls));
    }
}

#[test]
fn moments_summed_over_batches_fit_what_the_stacked_activations_fit() {
    // Rows with a large constant offset (as residual streams have) and a linear relation plus
    // noise, added in uneven batches.
    let (n, d_s, d_l) = (90, 6, 9);
    let x = gauss(n, d_s, 1).map(|v| v + 40.0);
    let t = gauss(d_l, d_s, 2);
    let y = (&x * t.transpose() + gauss(n, d_l, 3) * 0.3).map(|v| v - 25.0);
    let mut m = Moments::new(d_s, d_l, true, true);
    for (a, b) in [(0, 7), (7, 40), (40, 41), (41, 90)] {
        m.add(&ten(&x.rows(a, b - a).into_owned()), &ten(&y.rows(a, b - a).into_owned())).unwrap();
    }
    assert_eq!((m.n(), m.dims()), (n, (d_s, d_l)));
    let (xs, xl) = (ten(&x), ten(&y));
    let (pr, rep) = fit_procrustes(&xs, &xl, Centring::Mean).unwrap();
    let streamed = m.fit_procrustes().unwrap();
    assert!(max_abs_diff(&map64(&streamed), &map64(&pr)) < 1e-5);
    assert!((m.explained_variance(&streamed).unwrap() - rep.explained_variance).abs() < 1e-6);
    let (rr, rep) = fit_ridge(&xs, &xl, 2.5, Centring::Mean).unwrap();
    let streamed = m.fit_ridge(2.5).unwrap();
    assert!(max_abs_diff(&map64(&streamed), &map64(&rr)) < 1e-5);
    assert!((m.explained_variance(&streamed).unwrap() - rep.explained_variance).abs() < 1e-6);
    let (mu_s, _) = m.means().unwrap();
    let centred = x.clone() - DMatrix::from_fn(n, d_s, |_, c| mu_s[c]);
    assert!((m.total_sq_small().unwrap() - centred.norm_squared()).abs() < 1e-6 * centred.norm_squared());
    // Bad input is an error: shapes, too few rows, non-finite values, statistics not kept.
    assert!(m.add(&ten(&gauss(3, d_s + 1, 4)), &ten(&gauss(3, d_l, 5))).is_err());
    assert!(m.add(&ten(&gauss(3, d_s, 4)), &ten(&gauss(2, d_l, 5))).is_err());
    let mut one = Moments::new(d_s, d_l, true, false);
    one.add(&ten(&gauss(1, d_s, 6)), &ten(&gauss(1, d_l, 7))).unwrap();
    assert!(one.fit_procrustes().unwrap_err().to_string().contains("at least 2 samples"));
    one.add(&ten(&gauss(4, d_s, 6)), &ten(&gauss(4, d_l, 7))).unwrap();
    assert!(one.fit_ridge(1.0).unwrap_err().to_string().contains("not accumulated"));
    let mut bad = gauss(4, d_s, 8);
    bad[(2, 1)] = f64::NAN;
    one.add(&ten(&bad), &ten(&gauss(4, d_l, 9))).unwrap();
    assert!(one.fit_procrustes().is_err());
}
