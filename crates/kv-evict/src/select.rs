//! Execution helpers: from scores and budgets to sorted keep lists for
//! [`RaggedCache::retain`](kv_core::RaggedCache::retain).

/// Indices of the `k` highest scores, sorted ascending (kvpress: `topk`, then the kept rows in
/// their original order).
///
/// Ties are broken towards the earlier token (kvpress's `topk` leaves the choice to the
/// backend). NaN scores rank below every number.
pub fn top_k_sorted(scores: &[f32], k: usize) -> Vec<usize> {
    let n = scores.len();
    if k >= n {
        return (0..n).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let key = |i: usize| {
        let s = scores[i];
        if s.is_nan() { f32::NEG_INFINITY } else { s }
    };
    let mut idx: Vec<usize> = (0..n).collect();
    let by_rank = |a: &usize, b: &usize| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, by_rank);
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Keep lists for every stream: the `budgets[s]` best tokens of `scores[s]`, sorted.
///
/// # Panics
/// If `scores` and `budgets` differ in length.
pub fn keep_lists(scores: &[Vec<f32>], budgets: &[usize]) -> Vec<Vec<usize>> {
    assert_eq!(
        scores.len(),
        budgets.len(),
        "keep_lists: {} score lists for {} budgets",
        scores.len(),
        budgets.len()
    );
    scores
        .iter()
        .zip(budgets)
        .map(|(s, &k)| top_k_sorted(s, k))
        .collect()
}
