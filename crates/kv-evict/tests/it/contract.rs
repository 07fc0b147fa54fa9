//! The shared cache contract, stamped out for every scorer (small windows and sink counts, so
//! that the contract's 7- to 10-token prompts are long enough).

use burn::prelude::*;
use kv_core::{KvCache, KvShape, RopeConfig, RopeConvention, StorageDtype};
use kv_evict::{EvictConfig, GqaReduce, ScorerConfig};

fn shape() -> KvShape {
    KvShape::new(2, 2, 6, 8).expect("valid")
}

fn make(scorer: ScorerConfig, d: &Device) -> Box<dyn KvCache> {
    let cfg = EvictConfig::new(shape(), 0.5, scorer).with_rope(RopeConfig::new(
        8,
        10_000.0,
        RopeConvention::RotateHalf,
    ));
    Box::new(cfg.init(d).expect("init"))
}

kv_testkit::kv_cache_contract!(knorm, |d: &Device| make(ScorerConfig::Knorm, d));
kv_testkit::kv_cache_contract!(keydiff, |d: &Device| make(ScorerConfig::KeyDiff, d));
kv_testkit::kv_cache_contract!(streaming_llm, |d: &Device| make(
    ScorerConfig::StreamingLlm { n_sink: 2 },
    d
));
kv_testkit::kv_cache_contract!(snapkv, |d: &Device| make(
    ScorerConfig::SnapKv {
        window: 2,
        kernel: 3,
        gqa: GqaReduce::Mean
    },
    d
));
kv_testkit::kv_cache_contract!(tova, |d: &Device| make(ScorerConfig::Tova, d));
kv_testkit::kv_cache_contract!(observed_attention, |d: &Device| make(
    ScorerConfig::ObservedAttention {
        gqa: GqaReduce::Max,
        recent: 0.0
    },
    d
));
kv_testkit::kv_cache_contract!(expected_attention, |d: &Device| make(
    ScorerConfig::ExpectedAttention {
        n_future_positions: 16,
        n_sink: 1,
        use_covariance: true,
        use_vnorm: true,
        epsilon: 0.0,
        gqa: GqaReduce::Mean
    },
    d
));
kv_testkit::kv_cache_contract!(
    knorm_f16,
    |d: &Device| -> Box<dyn KvCache> {
        let cfg = EvictConfig::new(shape(), 0.5, ScorerConfig::Knorm).with_dtype(StorageDtype::F16);
        Box::new(cfg.init(d).expect("init"))
    },
    atol = 2e-3,
    rtol = 1e-2
);
kv_testkit::kv_cache_contract!(streaming_decode, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        kv_evict::StreamingConfig::new(shape(), 2, 3)
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(pyramidkv, |d: &Device| -> Box<dyn KvCache> {
    let scorer = ScorerConfig::SnapKv {
        window: 2,
        kernel: 3,
        gqa: GqaReduce::Mean,
    };
    let cfg = EvictConfig::new(shape(), 0.3, scorer)
        .with_budget(kv_evict::BudgetKind::Pyramid { beta: 2.0 })
        .with_layer(1, 3);
    Box::new(cfg.init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(adakv_snapkv, |d: &Device| -> Box<dyn KvCache> {
    let scorer = ScorerConfig::SnapKv {
        window: 2,
        kernel: 3,
        gqa: GqaReduce::Mean,
    };
    let cfg = EvictConfig::new(shape(), 0.5, scorer).with_budget(kv_evict::BudgetKind::ADAKV);
    Box::new(cfg.init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(adakv_knorm, |d: &Device| -> Box<dyn KvCache> {
    let cfg = EvictConfig::new(shape(), 0.5, ScorerConfig::Knorm).with_budget(
        kv_evict::BudgetKind::AdaKv {
            alpha_safeguard: 0.0,
        },
    );
    Box::new(cfg.init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(h2o_tokens, |d: &Device| -> Box<dyn KvCache> {
    use kv_evict::TokenBudget::Tokens;
    Box::new(
        kv_evict::H2oConfig::new(shape(), Tokens(2), Tokens(3))
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(h2o_fractions, |d: &Device| -> Box<dyn KvCache> {
    use kv_evict::TokenBudget::Ratio;
    Box::new(
        kv_evict::H2oConfig::new(shape(), Ratio(0.2), Ratio(0.3))
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(scissorhands_tokens, |d: &Device| -> Box<dyn KvCache> {
    let mut cfg = kv_evict::ScissorhandsConfig::new(shape(), kv_evict::TokenBudget::Tokens(5));
    cfg.n_sink = 1;
    cfg.recent = 2;
    cfg.history = 3;
    Box::new(cfg.init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(
    scissorhands_fraction_raw,
    |d: &Device| -> Box<dyn KvCache> {
        let mut cfg = kv_evict::ScissorhandsConfig::new(shape(), kv_evict::TokenBudget::Ratio(0.6));
        cfg.n_sink = 1;
        cfg.recent = 2;
        cfg.threshold = false;
        Box::new(cfg.init(d).expect("init"))
    }
);
kv_testkit::kv_cache_contract!(keyformer_tokens, |d: &Device| -> Box<dyn KvCache> {
    let mut cfg = kv_evict::KeyformerConfig::new(shape(), kv_evict::TokenBudget::Tokens(5));
    cfg.recent = 0.4;
    Box::new(cfg.init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(keyformer_fraction, |d: &Device| -> Box<dyn KvCache> {
    Box::new(
        kv_evict::KeyformerConfig::new(shape(), kv_evict::TokenBudget::Ratio(0.6))
            .init(d)
            .expect("init"),
    )
});
kv_testkit::kv_cache_contract!(coverage_snapkv, |d: &Device| -> Box<dyn KvCache> {
    let scorer = ScorerConfig::SnapKv {
        window: 2,
        kernel: 3,
        gqa: GqaReduce::Mean,
    };
    let cfg = EvictConfig::new(shape(), 0.5, scorer)
        .with_budget(kv_evict::BudgetKind::Coverage { mass: 0.7 });
    Box::new(cfg.init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(coverage_knorm, |d: &Device| -> Box<dyn KvCache> {
    let cfg = EvictConfig::new(shape(), 0.5, ScorerConfig::Knorm)
        .with_budget(kv_evict::BudgetKind::Coverage { mass: 0.5 });
    Box::new(cfg.init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(decode_compression_knorm, |d: &Device| -> Box<dyn KvCache> {
    let cfg = EvictConfig::new(shape(), 0.5, ScorerConfig::Knorm).with_decode_compression(1, 3);
    Box::new(cfg.init(d).expect("init"))
});
kv_testkit::kv_cache_contract!(
    decode_compression_snapkv,
    |d: &Device| -> Box<dyn KvCache> {
        let scorer = ScorerConfig::SnapKv {
            window: 1,
            kernel: 1,
            gqa: GqaReduce::Mean,
        };
        let cfg = EvictConfig::new(shape(), 0.5, scorer).with_decode_compression(1, 3);
        Box::new(cfg.init(d).expect("init"))
    }
);
kv_testkit::kv_cache_contract!(headkv_snapkv, |d: &Device| -> Box<dyn KvCache> {
    let scorer = ScorerConfig::SnapKv {
        window: 2,
        kernel: 3,
        gqa: GqaReduce::Mean,
    };
    let importance = kv_evict::HeadImportance {
        format: kv_evict::HEAD_IMPORTANCE_FORMAT.into(),
        version: kv_evict::HEAD_IMPORTANCE_VERSION,
        model: "synthetic".into(),
        num_layers: 1,
        q_heads: 6,
        kv_heads: 2,
        head_dim: 8,
        method: "hand-written".into(),
        trials: 1,
        scores: vec![vec![0.1, 0.2, 0.0, 0.9, 0.5, 0.4]],
    };
    let cfg = EvictConfig::new(shape(), 0.4, scorer)
        .with_budget(kv_evict::BudgetKind::HeadKv {
            beta: 2.0,
            temp: 1.0,
        })
        .with_head_importance(importance);
    Box::new(cfg.init(d).expect("init"))
});
