//! The layer-sharing map: for every layer, the layer whose KV it reads.

use kv_core::{KvCache, KvError, LayerCaches, Result};
use serde::{Deserialize, Serialize};

/// A validated map from each layer to the layer whose keys and values it attends over.
///
/// `owner(i) == i`: layer `i` stores its own KV (a *producer*); `owner(i) == j != i`: layer
/// `i` computes only its queries and attends over layer `j`'s cache (a *consumer*). This is
/// LCKV's `layer_types` string (`0_0_2_2` for CLA2 over 4 layers) and mistral.rs's
/// `layer_to_owner` vector.
///
/// # Invariants (checked by every constructor)
/// - every owner is a layer of the model;
/// - a consumer reads a producer (chains such as `3 → 2 → 0` are rejected; resolve them with
///   [`LayerMap::resolve_chains`]), which also rules out cycles.
///
/// Forward references (a layer reading a *later* layer, as LCKV's condensed layers do) are
/// representable, since checkpoints use them, but [`LayerMap::build_caches`] rejects them:
/// the decoder has no iterative prefill.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "LayerMapRepr", into = "LayerMapRepr")]
pub struct LayerMap {
    owners: Vec<usize>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerMapRepr {
    owners: Vec<usize>,
}

impl TryFrom<LayerMapRepr> for LayerMap {
    type Error = KvError;
    fn try_from(r: LayerMapRepr) -> Result<Self> {
        LayerMap::new(r.owners)
    }
}

impl From<LayerMap> for LayerMapRepr {
    fn from(m: LayerMap) -> Self {
        LayerMapRepr { owners: m.owners }
    }
}

fn invalid(reason: String) -> KvError {
    KvError::InvalidConfig {
        field: "layer_map",
        reason,
    }
}

impl LayerMap {
    /// Validates an owner per layer.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `layer_map`) for an empty map, an owner out of range,
    /// a cycle, or a layer that reads a layer which does not own storage.
    pub fn new(owners: Vec<usize>) -> Result<Self> {
        let n = owners.len();
        if n == 0 {
            return Err(invalid("a model has at least one layer".into()));
        }
        for (i, &o) in owners.iter().enumerate() {
            if o >= n {
                return Err(invalid(format!(
                    "layer {i} reads layer {o}, but the model has {n} layers (0..{n})"
                )));
            }
        }
        for (i, &o) in owners.iter().enumerate() {
            if o != i && owners[o] != o {
                if let Some(cycle) = find_cycle(&owners, i) {
                    return Err(invalid(format!("the map has a cycle: {cycle}")));
                }
                return Err(invalid(format!(
                    "layer {i} reads layer {o}, which does not own storage (layer {o} reads \
                     layer {}); a layer can only read a layer that stores its own KV \
                     (use LayerMap::resolve_chains to follow chains)",
                    owners[o]
                )));
            }
        }
        Ok(LayerMap { owners })
    }

    /// Follows chains (`3 → 2 → 0` becomes `3 → 0`) and validates the result, as KVSharer's
    /// search does when it adds a pair.
    ///
    /// # Errors
    /// As [`LayerMap::new`]; a cycle is reported with its layers.
    pub fn resolve_chains(raw: Vec<usize>) -> Result<Self> {
        let n = raw.len();
        let mut owners = raw.clone();
        for i in 0..n {
            let mut o = i;
            let mut steps = 0;
            while raw.get(o).is_some_and(|&next| next != o) {
                o = raw[o];
                steps += 1;
                if steps > n {
                    let cycle = find_cycle(&raw, i).unwrap_or_default();
                    return Err(invalid(format!("the map has a cycle: {cycle}")));
                }
            }
            owners[i] = o;
        }
        LayerMap::new(owners)
    }

    /// Every layer owns its storage: the plain model.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for zero layers.
    pub fn identity(num_layers: usize) -> Result<Self> {
        LayerMap::new((0..num_layers).collect())
    }

    /// Cross-Layer Attention (CLA, arXiv 2405.12981): consecutive groups of `group` layers
    /// share the KV of the group's first layer (`group = 2` is CLA2: `0_0_2_2_4_4…`).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for zero layers or a zero group.
    pub fn cla(num_layers: usize, group: usize) -> Result<Self> {
        if group == 0 {
            return Err(KvError::InvalidConfig {
                field: "group",
                reason: "a CLA group holds at least one layer".into(),
            });
        }
        LayerMap::new((0..num_layers).map(|i| i - i % group).collect())
    }

    /// MLKV (arXiv 2406.09297): only `kv_layers` layers own KV heads; the layers are split
    /// into `kv_layers` consecutive groups of (nearly) equal size and every layer reads the
    /// first layer of its group (MLKV-6 over 12 layers: `0_0_2_2_4_4…`).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if `kv_layers` is zero or larger than the number of layers.
    pub fn mlkv(num_layers: usize, kv_layers: usize) -> Result<Self> {
        if kv_layers == 0 || kv_layers > num_layers {
            return Err(KvError::InvalidConfig {
                field: "kv_layers",
                reason: format!(
                    "{kv_layers} KV layers for a model of {num_layers} layers (need 1..={num_layers})"
                ),
            });
        }
        let owners = (0..num_layers)
            .map(|i| {
                let g = i * kv_layers / num_layers;
                // First layer of group g: the smallest l with l * kv_layers / n == g.
                (g * num_layers).div_ceil(kv_layers)
            })
            .collect();
        LayerMap::new(owners)
    }

    /// LCKV (arXiv 2405.10637): every layer attends over the KV of the top layer, except
    /// `warmup_bottom` layers at the bottom and `warmup_top - 1` layers above the target that
    /// keep their own (whyNLP/LCKV's `0_20_20…_20_21` for 22 layers is
    /// `lckv(22, 1, 2)`). The map has forward references: representable, but not runnable by
    /// [`LayerMap::build_caches`].
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] if `warmup_top` is zero (the target itself is a top layer)
    /// or the warm-up layers do not fit in the model.
    pub fn lckv(num_layers: usize, warmup_bottom: usize, warmup_top: usize) -> Result<Self> {
        if warmup_top == 0 || warmup_bottom + warmup_top > num_layers {
            return Err(KvError::InvalidConfig {
                field: "warmup_top",
                reason: format!(
                    "{warmup_bottom} bottom and {warmup_top} top warm-up layers (the target \
                     counts as a top layer, so at least 1) do not fit in {num_layers} layers"
                ),
            });
        }
        let target = num_layers - warmup_top;
        LayerMap::new(
            (0..num_layers)
                .map(|i| {
                    if i < warmup_bottom || i >= target {
                        i
                    } else {
                        target
                    }
                })
                .collect(),
        )
    }

    /// Parses LCKV's `layer_types` notation: owners separated by `_` (or `,`), such as
    /// `0_0_2_2`.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for a token that is not a layer index, or an invalid map.
    pub fn parse(text: &str) -> Result<Self> {
        let owners = text
            .split(['_', ','])
            .map(|t| {
                t.trim()
                    .parse::<usize>()
                    .map_err(|_| invalid(format!("`{t}` in `{text}` is not a layer index")))
            })
            .collect::<Result<Vec<_>>>()?;
        LayerMap::new(owners)
    }

    /// The map in LCKV's `layer_types` notation (`0_0_2_2`).
    pub fn to_layer_types(&self) -> String {
        self.owners
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("_")
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.owners.len()
    }
    /// Always false: a map covers at least one layer.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }
    /// The owner of every layer.
    pub fn owners(&self) -> &[usize] {
        &self.owners
    }
    /// The layer whose KV layer `i` reads, or `None` out of range.
    pub fn owner(&self, i: usize) -> Option<usize> {
        self.owners.get(i).copied()
    }
    /// Whether layer `i` stores its own KV.
    pub fn owns(&self, i: usize) -> bool {
        self.owners.get(i) == Some(&i)
    }
    /// Number of layers that store KV.
    pub fn storage_layers(&self) -> usize {
        (0..self.len()).filter(|&i| self.owns(i)).count()
    }
    /// Whether every layer stores its own KV.
    pub fn is_identity(&self) -> bool {
        self.storage_layers() == self.len()
    }
    /// Layers that read a later layer (LCKV-style forward references).
    pub fn forward_references(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.owners[i] > i).collect()
    }

    /// Builds the per-layer container: `make` builds the cache of each layer that owns
    /// storage; consumers attend over their owner's cache and never append (see
    /// [`LayerCaches::shared`]).
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] for forward references (no iterative prefill); the first
    /// error of `make`.
    pub fn build_caches(
        &self,
        make: impl FnMut(usize) -> Result<Box<dyn KvCache>>,
    ) -> Result<LayerCaches> {
        LayerCaches::shared(&self.owners, make)
    }
}

/// The cycle reached from `start`, as `a → b → … → a`, if any.
fn find_cycle(owners: &[usize], start: usize) -> Option<String> {
    let mut seen = vec![usize::MAX; owners.len()];
    let mut path = Vec::new();
    let mut o = start;
    loop {
        if seen[o] != usize::MAX {
            let from = seen[o];
            let mut cyc: Vec<String> = path[from..].iter().map(usize::to_string).collect();
            cyc.push(o.to_string());
            return Some(cyc.join(" → "));
        }
        seen[o] = path.len();
        path.push(o);
        let next = *owners.get(o)?;
        if next == o {
            return None;
        }
        o = next;
    }
}

/// MLKV's (and LCKV's `convert_pretrained.py`) initializer for uptraining: the element-wise
/// mean of the K (or V) projection weights of the layers that will share one KV, to be used
/// as the owner's weight before training.
///
/// # Errors
/// [`KvError::InvalidConfig`] (field `weights`) for no weights, weights of different
/// lengths, or non-finite values.
pub fn average_weights(weights: &[&[f32]]) -> Result<Vec<f32>> {
    let bad = |reason: &str| KvError::InvalidConfig {
        field: "weights",
        reason: reason.into(),
    };
    let first = weights
        .first()
        .ok_or_else(|| bad("no weights to average"))?;
    if weights.iter().any(|w| w.len() != first.len()) {
        return Err(bad("the weights to average differ in length"));
    }
    if weights.iter().any(|w| w.iter().any(|x| !x.is_finite())) {
        return Err(bad("the weights hold non-finite values"));
    }
    let n = weights.len() as f64;
    Ok((0..first.len())
        .map(|i| (weights.iter().map(|w| f64::from(w[i])).sum::<f64>() / n) as f32)
        .collect())
}
