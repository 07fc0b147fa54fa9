//! The shared cache contract for every decision source and for merge-on-evict.

use burn::prelude::*;
use kv_core::{KvCache, KvShape, StorageDtype};
use kv_dmc::{DecisionConfig, DmcConfig, LayerDecision, LinearHead, MergeEvictConfig};

fn shape() -> KvShape {
    KvShape::new(2, 2, 4, 8).expect("valid")
}

fn dmc(decision: DecisionConfig, d: &Device) -> Box<dyn KvCache> {
    Box::new(DmcConfig::new(shape(), decision).init(d).expect("init"))
}

fn learned() -> DecisionConfig {
    // Merge when channel 0 of the key is positive; weight from channel 1.
    let heads = |c| (0..2).map(|_| LinearHead::channel(8, c)).collect();
    DecisionConfig::Learned {
        layer: LayerDecision {
            alpha: heads(0),
            omega: heads(1),
        },
    }
}

kv_testkit::kv_cache_contract!(dmc_never, |d: &Device| dmc(DecisionConfig::Never, d));
kv_testkit::kv_cache_contract!(dmc_always, |d: &Device| dmc(DecisionConfig::Always, d));
kv_testkit::kv_cache_contract!(dmc_similarity, |d: &Device| dmc(
    DecisionConfig::Similarity {
        threshold: 0.0,
        value_threshold: None
    },
    d
));
// With proportional attention `attend` adds `ln z` to each slot's score, which plain
// attention over `view()` cannot express; without merges the two agree.
kv_testkit::kv_cache_contract!(dmc_proportional_never, |d: &Device| -> Box<dyn KvCache> {
    let cfg = DmcConfig::new(shape(), DecisionConfig::Never).with_proportional(true);
    Box::new(cfg.init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(dmc_learned, |d: &Device| dmc(learned(), d));
kv_testkit::kv_cache_contract!(
    dmc_similarity_f16,
    |d: &Device| -> Box<dyn KvCache> {
        let cfg = DmcConfig::new(
            shape(),
            DecisionConfig::Similarity {
                threshold: 0.0,
                value_threshold: None,
            },
        )
        .with_dtype(StorageDtype::F16);
        Box::new(cfg.init(d).expect("init"))
    },
    atol = 2e-3,
    rtol = 1e-2
);
kv_testkit::kv_cache_contract!(merge_evict, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        MergeEvictConfig::new(shape(), 1, 3, 2)
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(merge_evict_roomy, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        MergeEvictConfig::new(shape(), 4, 64, 32)
            .init(d)
            .expect("init"),
    )
});
