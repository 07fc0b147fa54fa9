//! Contract tests every [`KvCache`](kv_core::KvCache) implementation stamps out with
//! [`kv_cache_contract!`](crate::kv_cache_contract).

/// Stamps out the cache contract for a factory `|device: &Device| -> Box<dyn KvCache>`:
/// length bookkeeping, reset, `attend` equal to the reference attention over `view()` (within
/// `atol`/`rtol`), `memory()` equal to the bytes of the buffers actually held, and bad input
/// rejected with the cache unchanged.
///
/// The factory must build an empty cache whose shape has `head_dim >= 2`; the contract
/// appends up to 12 tokens per sequence.
#[macro_export]
macro_rules! kv_cache_contract {
    ($name:ident, $make:expr, atol = $atol:expr, rtol = $rtol:expr) => {
        mod $name {
            #[allow(unused_imports, reason = "the factory expression may use them")]
            use super::*;
            use $crate::__private as c;

            #[test]
            fn lengths_grow_and_reset_empties() {
                c::lengths_grow_and_reset_empties(&$make);
            }
            #[test]
            fn attend_equals_reference_on_view() {
                c::attend_equals_reference_on_view(&$make, $atol, $rtol);
            }
            #[test]
            fn memory_equals_held_buffers() {
                c::memory_equals_held_buffers(&$make);
            }
            #[test]
            fn bad_input_leaves_cache_unchanged() {
                c::bad_input_leaves_cache_unchanged(&$make);
            }
        }
    };
    ($name:ident, $make:expr) => {
        $crate::kv_cache_contract!($name, $make, atol = $crate::ATOL, rtol = $crate::RTOL);
    };
}

#[doc(hidden)]
pub mod __private {
    use burn::prelude::*;
    use kv_core::{KvBlock, KvCache, KvError, Query, StatsRequest, memory_matches_buffers};

    use crate::{assert_close, seeded_tensor, test_device, to_vec};

    type Factory = dyn Fn(&Device) -> Box<dyn KvCache>;

    fn block(cache: &dyn KvCache, n: usize, start: u32, seed: u64) -> KvBlock {
        let s = cache.shape();
        let dims = [s.batch(), s.kv_heads(), n, s.head_dim()];
        let d = cache.device().clone();
        KvBlock::contiguous(
            seeded_tensor(dims, seed, 1.0, &d),
            seeded_tensor(dims, seed + 1, 1.0, &d),
            start,
        )
        .expect("invariant: contract blocks are well formed")
    }

    fn query(cache: &dyn KvCache, n: usize, start: u32, seed: u64) -> Query {
        let s = cache.shape();
        let dims = [s.batch(), s.q_heads(), n, s.head_dim()];
        Query::contiguous(seeded_tensor(dims, seed, 1.0, cache.device()), start)
            .expect("invariant: contract queries are well formed")
    }

    /// `len` bookkeeping and reset.
    pub fn lengths_grow_and_reset_empties(make: &Factory) {
        let mut cache = make(&test_device());
        let s = cache.shape();
        assert_eq!(
            cache.memory().logical_tokens,
            0,
            "a new cache holds nothing"
        );
        cache
            .append(block(cache.as_ref(), 7, 0, 1))
            .expect("prefill append");
        cache.end_prefill().expect("end_prefill");
        let l = cache.lengths();
        assert_eq!(
            l.logical,
            vec![7; s.batch()],
            "logical tokens after prefill"
        );
        assert_eq!(l.held.len(), s.streams());
        assert!(
            l.held.iter().all(|&h| h <= 7),
            "held {:?} > appended",
            l.held
        );
        cache
            .append(block(cache.as_ref(), 1, 7, 3))
            .expect("decode append");
        let l2 = cache.lengths();
        assert_eq!(
            l2.logical,
            vec![8; s.batch()],
            "logical tokens after a decode step"
        );
        assert_eq!(cache.memory().logical_tokens, 8 * s.batch());
        cache.reset();
        let l3 = cache.lengths();
        assert!(l3.held.iter().all(|&h| h == 0) && l3.logical.iter().all(|&h| h == 0));
        assert_eq!(cache.memory().held_token_slots, 0);
        assert_eq!(
            cache.view().keys.dims()[2],
            0,
            "view of a reset cache is empty"
        );
        cache
            .append(block(cache.as_ref(), 3, 0, 5))
            .expect("append after reset restarts at 0");
    }

    /// `attend` agrees with the reference attention over `view()`, in prefill and decode.
    pub fn attend_equals_reference_on_view(make: &Factory, atol: f32, rtol: f32) {
        let mut cache = make(&test_device());
        cache
            .append(block(cache.as_ref(), 9, 0, 11))
            .expect("prefill append");
        let q = query(cache.as_ref(), 4, 5, 13);
        let got = cache.attend(&q, StatsRequest::NONE).expect("attend").output;
        let want = cache.view().attend_reference(&q, StatsRequest::NONE).output;
        assert_close(&got, &want, atol, rtol);
        cache.end_prefill().expect("end_prefill");
        for step in 0..3u32 {
            cache
                .append(block(cache.as_ref(), 1, 9 + step, 20 + u64::from(step)))
                .expect("decode");
            let q = query(cache.as_ref(), 1, 9 + step, 30 + u64::from(step));
            let got = cache.attend(&q, StatsRequest::NONE).expect("attend").output;
            let want = cache.view().attend_reference(&q, StatsRequest::NONE).output;
            assert_close(&got, &want, atol, rtol);
        }
    }

    /// `memory()` equals the bytes of the buffers held, through a cache's life.
    pub fn memory_equals_held_buffers(make: &Factory) {
        let mut cache = make(&test_device());
        let check = |c: &dyn KvCache, when: &str| {
            if let Err(e) = memory_matches_buffers(c) {
                panic!("{when}: {e}");
            }
        };
        check(cache.as_ref(), "new");
        cache
            .append(block(cache.as_ref(), 10, 0, 41))
            .expect("append");
        check(cache.as_ref(), "after prefill");
        cache.end_prefill().expect("end_prefill");
        check(cache.as_ref(), "after end_prefill");
        cache
            .append(block(cache.as_ref(), 1, 10, 43))
            .expect("append");
        check(cache.as_ref(), "after decode");
        let m = cache.memory();
        assert!(m.stored_bytes() > 0 && m.logical_elements > 0);
        cache.reset();
        check(cache.as_ref(), "after reset");
    }

    fn snapshot(cache: &dyn KvCache) -> (Vec<f32>, Vec<f32>, Vec<u32>, kv_core::MemoryReport) {
        let v = cache.view();
        (
            to_vec(&v.keys),
            to_vec(&v.values),
            v.positions,
            cache.memory(),
        )
    }

    /// Errors for bad input, with nothing changed.
    pub fn bad_input_leaves_cache_unchanged(make: &Factory) {
        let device = test_device();
        let mut cache = make(&device);
        let s = cache.shape();
        cache
            .append(block(cache.as_ref(), 6, 0, 51))
            .expect("append");
        let before = snapshot(cache.as_ref());
        let lengths = cache.lengths();
        let (b, h, d) = (s.batch(), s.kv_heads(), s.head_dim());

        let mut bad: Vec<(&str, KvBlock)> = Vec::new();
        let k = seeded_tensor([b, h, 2, d + 1], 1, 1.0, &device);
        bad.push((
            "wrong head_dim",
            KvBlock::contiguous(k.clone(), k, 6).expect("block"),
        ));
        let k = seeded_tensor([b, h + 1, 2, d], 2, 1.0, &device);
        bad.push((
            "wrong kv_heads",
            KvBlock::contiguous(k.clone(), k, 6).expect("block"),
        ));
        let k = seeded_tensor([b, h, 2, d], 3, 1.0, &device);
        let nan = k.clone().slice_fill([0..1, 0..1, 1..2, 0..1], f32::NAN);
        bad.push((
            "NaN keys",
            KvBlock::contiguous(nan, k.clone(), 6).expect("block"),
        ));
        let inf = k
            .clone()
            .slice_fill([0..1, 0..1, 0..1, 0..1], f32::INFINITY);
        bad.push((
            "infinite values",
            KvBlock::contiguous(k.clone(), inf, 6).expect("block"),
        ));
        bad.push((
            "positions going back",
            KvBlock::contiguous(k.clone(), k, 3).expect("block"),
        ));
        for (what, blk) in bad {
            let err = cache.append(blk);
            assert!(err.is_err(), "{what}: append accepted bad input");
            assert_eq!(
                snapshot(cache.as_ref()),
                before,
                "{what}: cache changed after an error"
            );
            assert_eq!(
                cache.lengths(),
                lengths,
                "{what}: lengths changed after an error"
            );
        }
        let q = seeded_tensor([b, s.q_heads() + 1, 1, d], 4, 1.0, &device);
        let q = Query::contiguous(q, 6).expect("query");
        assert!(matches!(
            cache.attend(&q, StatsRequest::NONE),
            Err(KvError::ShapeMismatch { .. })
        ));
        let q = seeded_tensor([b, s.q_heads(), 1, d], 5, 1.0, &device)
            .slice_fill([0..1, 0..1, 0..1, 0..1], f32::NAN);
        let q = Query::contiguous(q, 6).expect("query");
        assert!(matches!(
            cache.attend(&q, StatsRequest::NONE),
            Err(KvError::NonFinite { .. })
        ));
        assert_eq!(
            snapshot(cache.as_ref()),
            before,
            "cache changed after a bad query"
        );
    }
}
