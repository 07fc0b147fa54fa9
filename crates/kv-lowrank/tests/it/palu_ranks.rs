//! Palu's Fisher-information rank allocation: hand-computed allocations (proportional shares,
//! the reference's remainder order, capped modules, block rounding with ties to even), a
//! property test, the `fisher=FILE` parameters of `PaluConfig`, and bad artefacts.

use burn::prelude::*;
use kv_core::{KvShape, RopeConfig, RopeConvention};
use kv_lowrank::{LayerRanks, PALU_FISHER_FORMAT, PaluConfig, PaluFisher};
use proptest::prelude::*;

use crate::{assert_invalid, saved_calibration, shape, synthetic_calibration, temp_path};

/// An artefact with the given per-module Fisher values (`[layer][head]`).
fn fisher(keys: Vec<Vec<f64>>, values: Vec<Vec<f64>>, head_dim: usize) -> PaluFisher {
    PaluFisher {
        format: PALU_FISHER_FORMAT,
        model: "test".into(),
        text: "test".into(),
        sequences: 1,
        tokens_per_sequence: 2,
        num_layers: keys.len(),
        kv_heads: keys[0].len(),
        head_dim,
        keys,
        values,
    }
}

fn ranks(pairs: &[(usize, usize)]) -> Vec<LayerRanks> {
    pairs
        .iter()
        .map(|&(rank_k, rank_v)| LayerRanks { rank_k, rank_v })
        .collect()
}

#[test]
fn ranks_are_proportional_to_fisher() {
    // Modules L0k, L0v, L1k, L1v with Fisher 4, 2, 1, 1 share 16 of 32 ranks as 8, 4, 2, 2.
    let f = fisher(vec![vec![4.0], vec![1.0]], vec![vec![2.0], vec![1.0]], 8);
    let a = f.allocate(0.5, 1).expect("allocate");
    assert_eq!(a.layers, ranks(&[(8, 4), (2, 2)]));
    assert_eq!(a.kept_ratio, 0.5);
}

#[test]
fn the_remainder_goes_to_the_smallest_fractions_first() {
    // Target 15 of 32: shares 5.625, 5.625, 1.875, 1.875 -> floors 5, 5, 1, 1; the three
    // ranks left go to the modules in increasing order of their fractions (0.625 first, then
    // 0.875 in module order), as the reference's sort does.
    let f = fisher(vec![vec![3.0], vec![1.0]], vec![vec![3.0], vec![1.0]], 8);
    let a = f.allocate(15.0 / 32.0, 1).expect("allocate");
    assert_eq!(a.layers, ranks(&[(6, 6), (2, 1)]));
}

#[test]
fn capped_modules_pass_their_share_on() {
    // Module L0k's share (15.5) is capped at 8; the remaining 8 ranks cycle over the others.
    let f = fisher(vec![vec![100.0], vec![1.0]], vec![vec![1.0], vec![1.0]], 8);
    let a = f.allocate(0.5, 1).expect("allocate");
    assert_eq!(a.layers, ranks(&[(8, 3), (3, 2)]));
    // Everything kept.
    let a = f.allocate(1.0, 1).expect("allocate");
    assert_eq!(a.layers, ranks(&[(8, 8), (8, 8)]));
}

#[test]
fn ranks_round_to_blocks_with_ties_to_even() {
    // Two heads of 64 channels, 4 modules of 128: Fisher 12, 10, 5, 5 share 256 ranks as 96,
    // 80, 40, 40, i.e. 48, 40, 20, 20 per head; blocks of 32: 48/32 = 1.5 rounds to 2 (even),
    // 40/32 to 1, 20/32 to 1.
    let f = fisher(
        vec![vec![12.0, 12.0], vec![5.0, 5.0]],
        vec![vec![10.0, 10.0], vec![5.0, 5.0]],
        64,
    );
    let a = f.allocate(0.5, 32).expect("allocate");
    assert_eq!(a.layers, ranks(&[(64, 32), (32, 32)]));
    assert_eq!(a.kept_ratio, 160.0 / 256.0);
    // Module 160 of 2 heads: 80 per head, 80/32 = 2.5 rounds to 2 (even), not 3.
    let f = fisher(vec![vec![1.0, 1.0]], vec![vec![1.0, 1.0]], 128);
    let a = f.allocate(160.0 / 256.0, 32).expect("allocate");
    assert_eq!(a.layers, ranks(&[(64, 64)]));
    // Block 16: 80 per head is 5 blocks exactly.
    assert_eq!(
        f.allocate(160.0 / 256.0, 16).expect("allocate").layers,
        ranks(&[(80, 80)])
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn allocation_spends_the_budget_and_follows_fisher(
        layers in 1usize..6,
        head_dim in 2usize..17,
        ratio in 0.05f64..1.0,
        seed in any::<u64>(),
    ) {
        let mut s = seed | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 1000) as f64 / 100.0 + 0.01
        };
        let keys: Vec<Vec<f64>> = (0..layers).map(|_| vec![next()]).collect();
        let values: Vec<Vec<f64>> = (0..layers).map(|_| vec![next()]).collect();
        let f = fisher(keys.clone(), values.clone(), head_dim);
        let a = f.allocate(ratio, 1).expect("allocate");
        let target = (ratio * (2 * layers * head_dim) as f64).round() as usize;
        let got: Vec<usize> = a.layers.iter().flat_map(|l| [l.rank_k, l.rank_v]).collect();
        let fs: Vec<f64> = keys.iter().zip(&values).flat_map(|(k, v)| [k[0], v[0]]).collect();
        // One head, block 1: the module ranks themselves, with 0 lifted to 1.
        let zeros = got.iter().filter(|&&r| r == 1).count();
        let sum: usize = got.iter().sum();
        prop_assert!(sum >= target && sum <= target + zeros, "sum {} target {}", sum, target);
        for (i, &r) in got.iter().enumerate() {
            prop_assert!((1..=head_dim).contains(&r));
            for (j, &q) in got.iter().enumerate() {
                // More Fisher never means more than one rank less (the remainder).
                if fs[i] > fs[j] && q < head_dim {
                    prop_assert!(r + 1 >= q, "module {} (F {}) rank {} < module {} (F {}) rank {}", i, fs[i], r, j, fs[j], q);
                }
            }
        }
    }
}

fn rope() -> RopeConfig {
    RopeConfig::new(8, 10_000.0, RopeConvention::RotateHalf)
}

/// The artefact of [`shape`] (2 KV heads of 8 channels, 2 layers) saved under `name`.
fn saved_fisher(name: &str, keys: [f64; 2], values: [f64; 2]) -> std::path::PathBuf {
    let f = fisher(
        keys.iter().map(|&k| vec![k, k]).collect(),
        values.iter().map(|&v| vec![v, v]).collect(),
        8,
    );
    let path = temp_path(name).with_extension("json");
    f.save(&path).expect("save");
    path
}

fn params<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a str, &'a str)> {
    pairs.iter().copied()
}

#[test]
fn palu_config_takes_its_ranks_from_the_fisher_artefact() {
    let cal = saved_calibration("palu-fisher");
    let file = saved_fisher("palu-fisher", [4.0, 1.0], [2.0, 1.0]);
    let (c, f) = (cal.to_str().expect("utf-8"), file.to_str().expect("utf-8"));
    // Modules of 16 channels (2 heads x 8), 32 of 64 kept: 16, 8, 4, 4 -> per head 8, 4, 2, 2.
    let p = [("calibration", c), ("fisher", f), ("block", "1")];
    let l0 = PaluConfig::from_params(shape(), 0, rope(), params(&p)).expect("layer 0");
    let l1 = PaluConfig::from_params(shape(), 1, rope(), params(&p)).expect("layer 1");
    assert_eq!((l0.rank_k, l0.rank_v, l1.rank_k, l1.rank_v), (8, 4, 2, 2));
    // It builds against the calibration of the same two layers.
    let device: Device = kv_testkit::test_device();
    let cache = l1
        .clone()
        .with_num_layers(2)
        .init_with(&synthetic_calibration(shape()), &device)
        .expect("init");
    assert_eq!(cache.key_basis().dims(), [2, 8, 2]);
    // A model of another depth is refused at init.
    assert_invalid(
        l1.with_num_layers(3)
            .init_with(&synthetic_calibration(shape()), &device),
        "layers",
    );
    // The reference's block of 32 is capped at head_dim 8.
    let p = [("calibration", c), ("fisher", f), ("rank_ratio", "0.25")];
    let l0 = PaluConfig::from_params(shape(), 0, rope(), params(&p)).expect("default block");
    assert_eq!((l0.rank_k, l0.rank_v), (8, 8));
}

#[test]
fn bad_fisher_parameters_and_artefacts_are_refused() {
    let cal = saved_calibration("palu-fisher-bad");
    let file = saved_fisher("palu-fisher-bad", [1.0, 1.0], [1.0, 1.0]);
    let (c, f) = (cal.to_str().expect("utf-8"), file.to_str().expect("utf-8"));
    let build = |p: &[(&str, &str)]| PaluConfig::from_params(shape(), 0, rope(), params(p));
    assert_invalid(
        build(&[("calibration", c), ("fisher", f), ("rank", "4")]),
        "drop rank",
    );
    assert_invalid(
        build(&[("calibration", c), ("rank_ratio", "0.5")]),
        "fisher",
    );
    assert_invalid(
        build(&[("calibration", c), ("fisher", f), ("rank_ratio", "0")]),
        "ratio",
    );
    assert_invalid(
        build(&[("calibration", c), ("fisher", f), ("rank_ratio", "1.5")]),
        "ratio",
    );
    assert_invalid(
        build(&[("calibration", c), ("fisher", f), ("block", "0")]),
        "block",
    );
    assert_invalid(
        build(&[("calibration", c), ("fisher", f), ("block", "9")]),
        "block",
    );
    assert_invalid(
        build(&[("calibration", c), ("fisher", "/nonexistent/fisher.json")]),
        "kv-eval fisher",
    );
    let other = KvShape::new(2, 1, 4, 8).expect("shape");
    assert_invalid(
        PaluConfig::from_params(
            other,
            0,
            rope(),
            params(&[("calibration", c), ("fisher", f)]),
        ),
        "KV heads",
    );
    assert_invalid(
        PaluConfig::from_params(
            shape(),
            2,
            rope(),
            params(&[("calibration", c), ("fisher", f)]),
        ),
        "outside",
    );

    let good = fisher(vec![vec![1.0, 2.0]], vec![vec![1.0, 2.0]], 8);
    let mut bad = good.clone();
    bad.format = 2;
    assert_invalid(bad.validate(), "format");
    let mut bad = good.clone();
    bad.keys[0].pop();
    assert_invalid(bad.validate(), "heads");
    let mut bad = good.clone();
    bad.values[0][1] = f64::NAN;
    assert_invalid(bad.validate(), "non-finite");
    let mut bad = good.clone();
    bad.keys[0][0] = -1.0;
    assert_invalid(bad.validate(), "negative");
    let mut bad = good.clone();
    bad.keys = vec![vec![0.0, 0.0]];
    bad.values = vec![vec![0.0, 0.0]];
    assert_invalid(bad.allocate(0.5, 1), "zero");
    assert_invalid(good.allocate(f64::NAN, 1), "ratio");
    // A corrupt file names itself.
    let path = temp_path("palu-fisher-corrupt").with_extension("json");
    std::fs::write(&path, "{\"format\": 1").expect("write");
    assert_invalid(PaluFisher::load(&path), "palu-fisher-corrupt");
}
