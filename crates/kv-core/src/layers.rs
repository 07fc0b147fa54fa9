//! A container of per-layer caches with aggregated memory reports, and cross-layer KV sharing.

use crate::cache::KvCache;
use crate::memory::MemoryReport;
use crate::{KvError, Result};

/// One cache per attention layer, or one per *storage owner* when layers share KV.
///
/// Layers are boxed trait objects so that a model can mix methods per layer (a pipeline may
/// treat early layers differently) and so that the model code is not generic over them.
///
/// # Cross-layer sharing
/// [`LayerCaches::shared`] takes an owner per layer (`owners[i] == i`: layer `i` stores its
/// own KV; `owners[i] == j`: layer `i` reads layer `j`'s cache). A reading layer does not
/// append: the model computes only its queries and attends over the owner's cache (CLA,
/// LCKV-style condensed layers, MLKV, KVSharer). [`layer`](Self::layer) and
/// [`layer_mut`](Self::layer_mut) of a reading layer return the owner's cache; memory counts
/// each storage once, and a reading layer contributes only the dense equivalent of the tokens
/// it sees (so the compression ratio shows the saving). The declarative, validated maps
/// (CLA pairs, MLKV groups, KVSharer artefacts) live in `kv-share`.
#[derive(Debug, Default)]
pub struct LayerCaches {
    /// One entry per model layer; `None` for layers that read another layer's storage.
    layers: Vec<Option<Box<dyn KvCache>>>,
    /// Per model layer, the layer whose storage it attends over (itself when it owns one).
    owners: Vec<usize>,
}

impl LayerCaches {
    /// Wraps per-layer caches (every layer owns its storage).
    pub fn new(layers: Vec<Box<dyn KvCache>>) -> Self {
        let owners = (0..layers.len()).collect();
        LayerCaches {
            layers: layers.into_iter().map(Some).collect(),
            owners,
        }
    }
    /// Builds caches that share storage across layers: `owners[i]` is the layer whose cache
    /// layer `i` attends over; `make` is called once per owning layer (`owners[i] == i`) with
    /// its index.
    ///
    /// # Errors
    /// [`KvError::InvalidConfig`] (field `owners`) if an owner is out of range, comes after
    /// the layer reading it (a forward reference such as LCKV's top-layer target needs an
    /// iterative prefill, which this container does not run), or does not own storage itself
    /// (chains must be resolved first); the first error of `make`.
    pub fn shared(
        owners: &[usize],
        mut make: impl FnMut(usize) -> Result<Box<dyn KvCache>>,
    ) -> Result<Self> {
        let n = owners.len();
        for (i, &o) in owners.iter().enumerate() {
            let reason = if o >= n {
                format!("layer {i} reads layer {o}, but the model has {n} layers")
            } else if o > i {
                format!(
                    "layer {i} reads the later layer {o}: forward references need an \
                     iterative prefill, which LayerCaches does not run"
                )
            } else if owners[o] != o {
                format!(
                    "layer {i} reads layer {o}, which does not own storage (it reads layer \
                     {}); point layer {i} at the owner",
                    owners[o]
                )
            } else {
                continue;
            };
            return Err(KvError::InvalidConfig {
                field: "owners",
                reason,
            });
        }
        let layers = owners
            .iter()
            .enumerate()
            .map(|(i, &o)| if o == i { make(i).map(Some) } else { Ok(None) })
            .collect::<Result<_>>()?;
        Ok(LayerCaches {
            layers,
            owners: owners.to_vec(),
        })
    }
    /// The layer whose storage layer `i` attends over (`i` itself when it owns storage).
    ///
    /// # Errors
    /// [`KvError::IndexOutOfRange`] if there is no such layer.
    pub fn owner(&self, i: usize) -> Result<usize> {
        self.owners.get(i).copied().ok_or(KvError::IndexOutOfRange {
            op: "LayerCaches::owner",
            index: i,
            len: self.owners.len(),
        })
    }
    /// Whether layer `i` owns storage, so the model appends its keys and values (false for a
    /// layer that reads another layer's cache, and for layers out of range).
    pub fn appends(&self, i: usize) -> bool {
        self.owners.get(i) == Some(&i)
    }
    /// Number of layers that own storage.
    pub fn storage_layers(&self) -> usize {
        self.layers.iter().filter(|c| c.is_some()).count()
    }
    fn slot(&self, i: usize, op: &'static str) -> Result<usize> {
        self.owners.get(i).copied().ok_or(KvError::IndexOutOfRange {
            op,
            index: i,
            len: self.owners.len(),
        })
    }
    /// Builds `n` layers with a factory that receives the layer index.
    ///
    /// # Errors
    /// The first error of the factory.
    pub fn try_from_fn(
        n: usize,
        mut make: impl FnMut(usize) -> Result<Box<dyn KvCache>>,
    ) -> Result<Self> {
        Ok(LayerCaches::new(
            (0..n).map(&mut make).collect::<Result<_>>()?,
        ))
    }
    /// Unwraps the caches that own storage (one per layer unless layers share).
    pub fn into_layers(self) -> Vec<Box<dyn KvCache>> {
        self.layers.into_iter().flatten().collect()
    }
    /// Number of (model) layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }
    /// Whether there are no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
    /// The cache layer `i` attends over (its owner's for a reading layer).
    ///
    /// # Errors
    /// [`KvError::IndexOutOfRange`] if there is no such layer.
    pub fn layer(&self, i: usize) -> Result<&dyn KvCache> {
        let o = self.slot(i, "LayerCaches::layer")?;
        Ok(self.layers[o]
            .as_deref()
            .expect("invariant: owners own storage"))
    }
    /// The cache layer `i` attends over, mutably (its owner's for a reading layer).
    ///
    /// # Errors
    /// [`KvError::IndexOutOfRange`] if there is no such layer.
    pub fn layer_mut(&mut self, i: usize) -> Result<&mut (dyn KvCache + 'static)> {
        let o = self.slot(i, "LayerCaches::layer_mut")?;
        Ok(self.layers[o]
            .as_deref_mut()
            .expect("invariant: owners own storage"))
    }
    /// Iterates over the layers: the cache each layer attends over (a shared cache appears
    /// once per layer reading it).
    pub fn iter(&self) -> impl Iterator<Item = &dyn KvCache> {
        self.owners.iter().map(|&o| {
            self.layers[o]
                .as_deref()
                .expect("invariant: owners own storage")
        })
    }
    /// Memory summed over layers, each storage counted once.
    pub fn memory(&self) -> MemoryReport {
        self.memory_per_layer().into_iter().sum()
    }
    /// Memory per layer. A reading layer holds no bytes; it reports the dense equivalent of
    /// the tokens it attends over (`logical_*` of its owner), so that ratios against the
    /// dense cache of every layer stay honest.
    pub fn memory_per_layer(&self) -> Vec<MemoryReport> {
        self.layers
            .iter()
            .zip(&self.owners)
            .map(|(c, &o)| match c {
                Some(c) => c.memory(),
                None => {
                    let m = self.layers[o]
                        .as_deref()
                        .expect("invariant: owners own storage")
                        .memory();
                    MemoryReport {
                        logical_elements: m.logical_elements,
                        logical_tokens: m.logical_tokens,
                        ..MemoryReport::default()
                    }
                }
            })
            .collect()
    }
    /// Signals the end of prefill to every cache that owns storage, in layer order.
    ///
    /// # Errors
    /// The first layer error (later layers are not signalled).
    pub fn end_prefill(&mut self) -> Result<()> {
        self.layers
            .iter_mut()
            .flatten()
            .try_for_each(|c| c.end_prefill())
    }
    /// Resets every cache.
    pub fn reset(&mut self) {
        self.layers.iter_mut().flatten().for_each(|c| c.reset());
    }
}
