//! Decode-time eviction in place: a stream that evicts as many tokens as its sequence receives
//! writes the new tokens into the rows of the evicted ones
//! ([`RaggedCache::append_into`](kv_core::RaggedCache::append_into)), one row per token,
//! instead of gathering every kept row into a new buffer and appending after it. Rows are
//! then no longer in the order of positions, so the policies find their sinks and recent
//! tokens by position ([`chronological`]).

/// The row indices of a stream ordered by position, oldest first (positions are unique, as
/// a stream's are).
///
/// In linear time when the positions span at most a few times the rows (a ring of recent
/// tokens, or heavy hitters among the tokens seen so far): one bucket per position. A sort
/// would cost more per decode step than the in-place write saves.
pub(crate) fn chronological(positions: &[u32]) -> Vec<usize> {
    let n = positions.len();
    let (Some(&lo), Some(&hi)) = (positions.iter().min(), positions.iter().max()) else {
        return Vec::new();
    };
    let span = (hi - lo) as usize + 1;
    if span <= 8 * n.max(64) {
        let mut rows = vec![usize::MAX; span];
        for (j, &p) in positions.iter().enumerate() {
            rows[(p - lo) as usize] = j;
        }
        rows.retain(|&j| j != usize::MAX);
        rows
    } else {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by_key(|&j| positions[j]);
        order
    }
}

/// Whether the rows are already in the order of positions (the order is then the identity).
fn in_order(positions: &[u32]) -> bool {
    positions.windows(2).all(|w| w[0] < w[1])
}

/// Applies `rule`, written over a stream's tokens in chronological order (index `i` = the
/// `i`-th oldest; values aligned with it), to a stream whose rows hold `values` at
/// `positions`, and returns the kept rows, sorted.
pub(crate) fn keep_by_position<T: Copy>(
    values: &[T],
    positions: &[u32],
    rule: impl FnOnce(&[T]) -> Vec<usize>,
) -> Vec<usize> {
    if in_order(positions) {
        return rule(values);
    }
    let order = chronological(positions);
    let chrono: Vec<T> = order.iter().map(|&j| values[j]).collect();
    let mut kept = vec![false; values.len()];
    for i in rule(&chrono) {
        kept[order[i]] = true;
    }
    (0..values.len()).filter(|&j| kept[j]).collect()
}

/// Splits per-stream keep lists (sorted rows) into what
/// [`RaggedCache::retain`](kv_core::RaggedCache::retain) compacts and where
/// [`RaggedCache::append_into`](kv_core::RaggedCache::append_into) writes: a stream whose
/// sequence receives `m > 0` tokens and which evicts exactly `m` keeps every row for `retain`
/// and gets its evicted rows as slots; the others are compacted and append after their rows.
pub(crate) fn plan(
    held: &[usize],
    keep: Vec<Vec<usize>>,
    incoming: &[usize],
    kv_heads: usize,
) -> (Vec<Vec<usize>>, Vec<Option<Vec<usize>>>) {
    let mut slots = Vec::with_capacity(keep.len());
    let keep = keep
        .into_iter()
        .enumerate()
        .map(|(s, k)| {
            let (n, m) = (held[s], incoming[s / kv_heads]);
            if m > 0 && n - k.len() == m {
                let mut kept = vec![false; n];
                for &j in &k {
                    kept[j] = true;
                }
                slots.push(Some((0..n).filter(|&j| !kept[j]).collect()));
                (0..n).collect()
            } else {
                slots.push(None);
                k
            }
        })
        .collect();
    (keep, slots)
}

#[cfg(test)]
mod tests;
