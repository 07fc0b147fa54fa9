use super::*;

#[test]
fn rules_run_in_chronological_order_and_map_back_to_rows() {
    // Rows hold positions [5, 1, 9, 3]: chronologically rows 1, 3, 0, 2.
    let pos = [5u32, 1, 9, 3];
    assert_eq!(chronological(&pos), [1, 3, 0, 2]);
    // Positions spread far apart take the sorting path: same order.
    let far = [5_000_000u32, 1, 9_000_000, 3];
    assert_eq!(chronological(&far), [1, 3, 0, 2]);
    assert_eq!(chronological(&[]), Vec::<usize>::new());
    // "Keep the two newest" keeps rows 0 (5) and 2 (9).
    let rows = keep_by_position(&[0.0f32; 4], &pos, |v| (v.len() - 2..v.len()).collect());
    assert_eq!(rows, [0, 2]);
    // Values follow their rows: the best value is at row 3 (position 3, chronological 1).
    let vals = [0.1f32, 0.2, 0.3, 0.9];
    let rows = keep_by_position(&vals, &pos, |v| crate::top_k_sorted(v, 1));
    assert_eq!(rows, [3]);
    // In order: the rule's own answer.
    assert_eq!(
        keep_by_position(&vals, &[1, 2, 3, 4], |v| crate::top_k_sorted(v, 2)),
        [2, 3]
    );
}

#[test]
fn one_out_one_in_becomes_a_slot_and_the_rest_is_compacted() {
    // Two sequences of two heads: sequence 0 receives 1 token, sequence 1 none.
    let held = [4, 4, 4, 3];
    let keep = vec![vec![0, 1, 3], vec![0, 1, 2, 3], vec![1, 2], vec![0, 1, 2]];
    let (keep, slots) = plan(&held, keep, &[1, 0], 2);
    assert_eq!(slots, [Some(vec![2]), None, None, None]);
    assert_eq!(
        keep[0],
        [0, 1, 2, 3],
        "a slotted stream keeps every row for retain"
    );
    assert_eq!(keep[1], [0, 1, 2, 3]);
    assert_eq!(keep[2], [1, 2], "no incoming token: compacted");
    // Two evicted for one incoming: compacted, then appended.
    let (keep, slots) = plan(&[4], vec![vec![0, 3]], &[1], 1);
    assert_eq!((keep, slots), (vec![vec![0, 3]], vec![None]));
}
