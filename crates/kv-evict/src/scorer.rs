//! Scorer configurations: which tokens matter, with kvpress 0.5.5's defaults.

use kv_core::{KvError, Result};
use serde::{Deserialize, Serialize};

use crate::gqa::GqaReduce;

/// A token scorer and its parameters (defaults as kvpress 0.5.5). Serialised with a `method`
/// tag holding the registry name (`knorm`, `snapkv`, `streaming_llm`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScorerConfig {
    /// `-‖k‖` (KnormPress).
    Knorm,
    /// Sinks plus the most recent tokens (StreamingLLMPress).
    StreamingLlm {
        /// Leading tokens always kept (default 4).
        #[serde(default = "default_sink")]
        n_sink: usize,
    },
    /// Observation-window voting (SnapKVPress).
    #[serde(rename = "snapkv")]
    SnapKv {
        /// Number of last prompt queries that vote (default 64; the fixtures used 32).
        #[serde(default = "default_window")]
        window: usize,
        /// Average-pooling kernel, odd (default 5).
        #[serde(default = "default_kernel")]
        kernel: usize,
        /// Reduction over the query heads of a KV head (default mean).
        #[serde(default)]
        gqa: GqaReduce,
    },
    /// The last prompt query's attention, averaged over all heads (TOVAPress).
    Tova,
    /// Full prefill attention column sums per query count (ObservedAttentionPress, H2O).
    ObservedAttention {
        /// Reduction over the query heads of a KV head (default mean).
        #[serde(default)]
        gqa: GqaReduce,
        /// The last `floor(recent * n)` prompt tokens are always kept (their scores become the
        /// maximum plus one, as SnapKV keeps its window): H2O's recent window as MiniKV uses
        /// it at prefill. 0 (the default) is kvpress's ObservedAttentionPress.
        #[serde(default)]
        recent: f64,
    },
    /// Minus the cosine similarity to the mean normalised key (KeyDiffPress).
    #[serde(rename = "keydiff")]
    KeyDiff,
    /// Attention expected from future queries (ExpectedAttentionPress).
    ExpectedAttention {
        /// Future positions the RoPE rotation is averaged over (default 512).
        #[serde(default = "default_future")]
        n_future_positions: usize,
        /// Leading tokens always kept and left out of the query statistics (default 4).
        #[serde(default = "default_sink")]
        n_sink: usize,
        /// Use the query covariance (default true).
        #[serde(default = "default_true")]
        use_covariance: bool,
        /// Multiply by the value norm (default true).
        #[serde(default = "default_true")]
        use_vnorm: bool,
        /// Added to the scores before the value-norm rescaling (default 0).
        #[serde(default)]
        epsilon: f32,
        /// Reduction over the query heads of a KV head (default mean).
        #[serde(default)]
        gqa: GqaReduce,
    },
}

fn default_sink() -> usize {
    4
}
fn default_window() -> usize {
    64
}
fn default_kernel() -> usize {
    5
}
fn default_future() -> usize {
    512
}
fn default_true() -> bool {
    true
}

/// What a scorer needs the cache to record during prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// The last `window` prompt queries (post-RoPE), 0 for none.
    pub window: usize,
    /// Column sums of the full prefill attention.
    pub column_sums: bool,
    /// Mean and covariance of the pre-RoPE queries at positions `>= n_sink`.
    pub query_moments: Option<usize>,
    /// Whether the covariance is needed with the moments.
    pub covariance: bool,
    /// Tokens the prompt must exceed (kvpress asserts `n > window` or `n > n_sink`).
    pub min_prompt: usize,
}

/// Parameter names every scorer accepts in [`ScorerConfig::from_params`].
pub const PARAMS: &[(&str, &[&str])] = &[
    ("knorm", &[]),
    ("streaming_llm", &["n_sink"]),
    ("snapkv", &["window", "kernel", "gqa"]),
    ("tova", &[]),
    ("observed_attention", &["gqa", "recent"]),
    ("keydiff", &[]),
    (
        "expected_attention",
        &[
            "n_future_positions",
            "n_sink",
            "use_covariance",
            "use_vnorm",
            "epsilon",
            "gqa",
        ],
    ),
];

pub(crate) fn parse<T: core::str::FromStr>(field: &'static str, v: &str) -> Result<T> {
    v.parse().map_err(|_| KvError::InvalidConfig {
        field,
        reason: format!("`{v}` is not a valid value"),
    })
}

pub(crate) fn parse_gqa(v: &str) -> Result<GqaReduce> {
    GqaReduce::parse(v).ok_or_else(|| KvError::InvalidConfig {
        field: "gqa",
        reason: format!("`{v}` is not one of mean, max, sum"),
    })
}

impl ScorerConfig {
    /// The kvpress name of the method (`knorm`, `snapkv`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            ScorerConfig::Knorm => "knorm",
            ScorerConfig::StreamingLlm { .. } => "streaming_llm",
            ScorerConfig::SnapKv { .. } => "snapkv",
            ScorerConfig::Tova => "tova",
            ScorerConfig::ObservedAttention { .. } => "observed_attention",
            ScorerConfig::KeyDiff => "keydiff",
            ScorerConfig::ExpectedAttention { .. } => "expected_attention",
        }
    }

    /// The scorer `name` with kvpress's defaults.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for an unknown name.
    pub fn default_for(name: &str) -> Result<Self> {
        Ok(match name {
            "knorm" => ScorerConfig::Knorm,
            "streaming_llm" => ScorerConfig::StreamingLlm { n_sink: 4 },
            "snapkv" => ScorerConfig::SnapKv {
                window: 64,
                kernel: 5,
                gqa: GqaReduce::Mean,
            },
            "tova" => ScorerConfig::Tova,
            "observed_attention" => ScorerConfig::ObservedAttention {
                gqa: GqaReduce::Mean,
                recent: 0.0,
            },
            "keydiff" => ScorerConfig::KeyDiff,
            "expected_attention" => ScorerConfig::ExpectedAttention {
                n_future_positions: 512,
                n_sink: 4,
                use_covariance: true,
                use_vnorm: true,
                epsilon: 0.0,
                gqa: GqaReduce::Mean,
            },
            other => {
                return Err(KvError::InvalidConfig {
                    field: "method",
                    reason: format!("unknown eviction scorer `{other}`"),
                });
            }
        })
    }

    /// The scorer `name` with `key=value` parameters over kvpress's defaults (the harness's
    /// `--param` syntax; see [`PARAMS`]). The result is validated.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] naming the unknown or malformed parameter.
    pub fn from_params<'a>(
        name: &str,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self> {
        let mut cfg = Self::default_for(name)?;
        for (k, v) in params {
            match (&mut cfg, k) {
                (ScorerConfig::StreamingLlm { n_sink }, "n_sink")
                | (ScorerConfig::ExpectedAttention { n_sink, .. }, "n_sink") => {
                    *n_sink = parse("n_sink", v)?;
                }
                (ScorerConfig::ObservedAttention { recent, .. }, "recent") => {
                    *recent = parse("recent", v)?;
                }
                (ScorerConfig::SnapKv { window, .. }, "window") => *window = parse("window", v)?,
                (ScorerConfig::SnapKv { kernel, .. }, "kernel") => *kernel = parse("kernel", v)?,
                (ScorerConfig::SnapKv { gqa, .. }, "gqa")
                | (ScorerConfig::ObservedAttention { gqa, .. }, "gqa")
                | (ScorerConfig::ExpectedAttention { gqa, .. }, "gqa") => *gqa = parse_gqa(v)?,
                (
                    ScorerConfig::ExpectedAttention {
                        n_future_positions, ..
                    },
                    "n_future_positions",
                ) => *n_future_positions = parse("n_future_positions", v)?,
                (ScorerConfig::ExpectedAttention { use_covariance, .. }, "use_covariance") => {
                    *use_covariance = parse("use_covariance", v)?;
                }
                (ScorerConfig::ExpectedAttention { use_vnorm, .. }, "use_vnorm") => {
                    *use_vnorm = parse("use_vnorm", v)?;
                }
                (ScorerConfig::ExpectedAttention { epsilon, .. }, "epsilon") => {
                    *epsilon = parse("epsilon", v)?;
                }
                _ => {
                    return Err(KvError::InvalidConfig {
                        field: "param",
                        reason: format!("`{k}` is not a parameter of `{name}`"),
                    });
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the parameters.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`]: a zero SnapKV window, an even or zero kernel, a zero
    /// `n_future_positions`, a non-finite epsilon.
    pub fn validate(&self) -> Result<()> {
        match *self {
            ScorerConfig::SnapKv { window, kernel, .. } => {
                if window == 0 {
                    return Err(KvError::InvalidConfig {
                        field: "window",
                        reason: "must be at least 1 query".into(),
                    });
                }
                if kernel % 2 == 0 {
                    return Err(KvError::InvalidConfig {
                        field: "kernel",
                        reason: format!(
                            "{kernel} must be odd (kvpress's avg_pool1d with padding kernel/2 \
                             only preserves the length for odd kernels)"
                        ),
                    });
                }
            }
            ScorerConfig::ObservedAttention { recent, .. } if !(0.0..1.0).contains(&recent) => {
                return Err(KvError::InvalidConfig {
                    field: "recent",
                    reason: format!(
                        "{recent} must be a fraction of the prompt in [0, 1) (the share of the \
                         most recent tokens always kept)"
                    ),
                });
            }
            ScorerConfig::ExpectedAttention {
                n_future_positions,
                epsilon,
                ..
            } => {
                if n_future_positions == 0 {
                    return Err(KvError::InvalidConfig {
                        field: "n_future_positions",
                        reason: "must be at least 1".into(),
                    });
                }
                if !epsilon.is_finite() {
                    return Err(KvError::InvalidConfig {
                        field: "epsilon",
                        reason: format!("{epsilon} is not finite"),
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// What the cache must record during prefill for this scorer.
    pub fn needs(&self) -> Needs {
        match *self {
            ScorerConfig::Knorm | ScorerConfig::KeyDiff => Needs {
                min_prompt: 0,
                ..Needs::default()
            },
            ScorerConfig::StreamingLlm { n_sink } => Needs {
                min_prompt: n_sink,
                ..Needs::default()
            },
            ScorerConfig::SnapKv { window, .. } => Needs {
                window,
                min_prompt: window,
                ..Needs::default()
            },
            ScorerConfig::Tova => Needs {
                window: 1,
                min_prompt: 1,
                ..Needs::default()
            },
            ScorerConfig::ObservedAttention { .. } => Needs {
                column_sums: true,
                ..Needs::default()
            },
            ScorerConfig::ExpectedAttention {
                n_sink,
                use_covariance,
                ..
            } => Needs {
                query_moments: Some(n_sink),
                covariance: use_covariance,
                min_prompt: n_sink,
                ..Needs::default()
            },
        }
    }
}
