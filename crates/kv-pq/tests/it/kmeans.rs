//! k-means: monotone objective, determinism, edge cases.

use kv_core::KvError;
use kv_pq::{KMeansConfig, kmeans};
use kv_testkit::{seeded_tensor, tensor_from, test_device, to_vec};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Lloyd iterations never increase the objective (up to fp32 rounding of near ties).
    #[test]
    fn objective_never_increases(
        g in 1usize..=3,
        n in 2usize..=40,
        dim in 1usize..=6,
        kf in 0.0f64..1.0,
        seed in any::<u64>(),
    ) {
        let device = test_device();
        let k = 1 + (kf * (n - 1) as f64) as usize;
        let x = seeded_tensor([g, n, dim], seed, 3.0, &device);
        let fit = kmeans(x, &KMeansConfig::new(k).with_max_iters(30).with_tol(0.0).with_seed(seed))
            .expect("kmeans");
        for w in fit.history.windows(2) {
            prop_assert!(w[1] <= w[0] * (1.0 + 1e-5) + 1e-6, "objective rose: {:?}", fit.history);
        }
        let total: f64 = fit.objective.iter().sum();
        prop_assert!((total - fit.history.last().copied().unwrap()).abs() <= 1e-9 * (1.0 + total));
    }
}

#[test]
fn same_seed_same_result() {
    let device = test_device();
    let x = seeded_tensor([2, 50, 4], 7, 1.0, &device);
    let cfg = KMeansConfig::new(5).with_seed(42);
    let a = kmeans(x.clone(), &cfg).expect("kmeans");
    let b = kmeans(x, &cfg).expect("kmeans");
    assert_eq!(to_vec(&a.centroids), to_vec(&b.centroids));
    assert_eq!(
        a.assignments.to_data().convert::<i64>(),
        b.assignments.to_data().convert::<i64>()
    );
    assert_eq!(a.objective, b.objective);
    assert_eq!(a.history, b.history);
}

#[test]
fn more_clusters_than_points_is_an_error() {
    let device = test_device();
    let x = seeded_tensor([1, 3, 2], 1, 1.0, &device);
    let err = kmeans(x, &KMeansConfig::new(4)).expect_err("k > n");
    match err {
        KvError::InvalidConfig { field, reason } => {
            assert_eq!(field, "k");
            assert!(reason.contains("only 3 points"), "{reason}");
        }
        e => panic!("unexpected error {e:?}"),
    }
}

#[test]
fn zero_clusters_bad_tolerance_and_nan_are_errors() {
    let device = test_device();
    let x = seeded_tensor([1, 3, 2], 1, 1.0, &device);
    assert!(matches!(
        kmeans(x.clone(), &KMeansConfig::new(0)),
        Err(KvError::InvalidConfig { field: "k", .. })
    ));
    assert!(matches!(
        kmeans(x.clone(), &KMeansConfig::new(1).with_tol(f64::NAN)),
        Err(KvError::InvalidConfig { field: "tol", .. })
    ));
    let nan = x.slice_fill([0..1, 0..1, 0..1], f32::NAN);
    assert!(matches!(
        kmeans(nan, &KMeansConfig::new(1)),
        Err(KvError::NonFinite { .. })
    ));
}

#[test]
fn as_many_clusters_as_points_gives_zero_objective() {
    let device = test_device();
    let x = seeded_tensor([3, 9, 4], 3, 1.0, &device);
    let fit = kmeans(x, &KMeansConfig::new(9).with_seed(5)).expect("kmeans");
    assert!(
        fit.objective.iter().all(|&j| j == 0.0),
        "{:?}",
        fit.objective
    );
    // Duplicate points: 4 distinct values, k = 4 still reaches zero.
    let dup: Vec<f32> = (0..8).map(|i| (i % 4) as f32).collect();
    let fit = kmeans(tensor_from(dup, [1, 8, 1], &device), &KMeansConfig::new(4)).expect("kmeans");
    assert_eq!(fit.objective, vec![0.0]);
}

#[test]
fn finds_separated_clusters() {
    let device = test_device();
    // Two tight blobs around -10 and +10 in 2-D.
    let noise = kv_testkit::seeded_data(40, 9, 0.5);
    let data: Vec<f32> = noise
        .chunks(2)
        .enumerate()
        .flat_map(|(i, c)| {
            let centre = if i % 2 == 0 { -10.0 } else { 10.0 };
            [centre + c[0], centre + c[1]]
        })
        .collect();
    let fit = kmeans(
        tensor_from(data, [1, 20, 2], &device),
        &KMeansConfig::new(2),
    )
    .expect("kmeans");
    let mut c = to_vec(&fit.centroids);
    c.sort_by(f32::total_cmp);
    assert!(
        c[0] < -9.0 && c[1] < -9.0 && c[2] > 9.0 && c[3] > 9.0,
        "{c:?}"
    );
    assert!(fit.converged);
    let a = fit
        .assignments
        .to_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("ints");
    assert!(a.iter().step_by(2).all(|&x| x == a[0]));
    assert!(a.iter().skip(1).step_by(2).all(|&x| x == a[1] && x != a[0]));
}
