//! Product quantization: exact reconstruction, the ADC identity, validation.

use kv_core::KvError;
use kv_pq::{KMeansConfig, ProductQuantizer};
use kv_testkit::{assert_close, seeded_tensor, tensor_from, test_device, to_vec};

#[test]
fn one_subspace_with_a_centroid_per_distinct_key_reproduces_the_keys() {
    let device = test_device();
    // 2 groups of 16 keys: 8 distinct vectors, each twice, in shuffled order.
    let distinct = kv_testkit::seeded_data(2 * 8 * 6, 3, 2.0);
    let order = [3usize, 0, 7, 1, 3, 5, 2, 6, 0, 4, 1, 7, 2, 5, 6, 4];
    let mut data = Vec::new();
    for g in 0..2 {
        for &i in &order {
            data.extend_from_slice(&distinct[(g * 8 + i) * 6..(g * 8 + i + 1) * 6]);
        }
    }
    let x = tensor_from(data.clone(), [2, 16, 6], &device);
    let (pq, codes) =
        ProductQuantizer::train(x.clone(), 1, 3, &KMeansConfig::new(0)).expect("train");
    assert_eq!(pq.centroids(), 8);
    assert_eq!(to_vec(&pq.decode(codes.clone())), data);
    // Encoding the keys again gives codes that decode to the same keys.
    assert_eq!(to_vec(&pq.decode(pq.encode(x))), data);
}

#[test]
fn lookup_scores_equal_inner_products_with_decoded_keys() {
    let device = test_device();
    let x = seeded_tensor([3, 40, 8], 1, 1.0, &device);
    let (pq, codes) = ProductQuantizer::train(x, 4, 2, &KMeansConfig::new(0)).expect("train");
    let q = seeded_tensor([3, 5, 8], 2, 1.0, &device);
    let adc = pq.scores(q.clone(), codes.clone());
    let exact = q.matmul(pq.decode(codes).swap_dims(1, 2));
    assert_close(&adc, &exact, 1e-5, 1e-5);
    assert_eq!(
        pq.lookup_tables(seeded_tensor([3, 5, 8], 2, 1.0, &device))
            .dims(),
        [3, 5, 4, 4]
    );
}

#[test]
fn reconstruction_error_shrinks_with_more_centroids() {
    let device = test_device();
    let x = seeded_tensor([1, 128, 8], 4, 1.0, &device);
    let err = |bits| {
        let (pq, codes) =
            ProductQuantizer::train(x.clone(), 2, bits, &KMeansConfig::new(0)).expect("train");
        let d = pq.decode(codes) - x.clone();
        d.powi_scalar(2).sum().into_scalar::<f32>()
    };
    let (e1, e3, e5) = (err(1), err(3), err(5));
    assert!(e1 > e3 && e3 > e5, "{e1} {e3} {e5}");
}

#[test]
fn bad_parameters_are_clear_errors() {
    let device = test_device();
    let x = seeded_tensor([1, 8, 6], 1, 1.0, &device);
    let cfg = KMeansConfig::new(0);
    let field = |r: Result<_, KvError>| match r {
        Err(KvError::InvalidConfig { field, .. }) => field,
        Err(e) => panic!("unexpected {e:?}"),
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(
        field(ProductQuantizer::train(x.clone(), 4, 2, &cfg)),
        "subspaces"
    );
    assert_eq!(
        field(ProductQuantizer::train(x.clone(), 0, 2, &cfg)),
        "subspaces"
    );
    assert_eq!(
        field(ProductQuantizer::train(x.clone(), 2, 0, &cfg)),
        "bits"
    );
    assert_eq!(
        field(ProductQuantizer::train(x.clone(), 2, 9, &cfg)),
        "bits"
    );
    // 16 centroids, 8 points.
    assert_eq!(field(ProductQuantizer::train(x, 2, 4, &cfg)), "bits");
    let cb = seeded_tensor([1, 2, 3, 3], 1, 1.0, &device);
    assert!(ProductQuantizer::from_codebooks(cb).is_err());
}
