//! A container of per-layer caches with aggregated memory reports.

use crate::cache::KvCache;
use crate::memory::MemoryReport;
use crate::{KvError, Result};

/// One cache per attention layer.
///
/// Layers are boxed trait objects so that a model can mix methods per layer (a pipeline may
/// treat early layers differently) and so that the model code is not generic over them.
#[derive(Debug, Default)]
pub struct LayerCaches {
    layers: Vec<Box<dyn KvCache>>,
}

impl LayerCaches {
    /// Wraps per-layer caches.
    pub fn new(layers: Vec<Box<dyn KvCache>>) -> Self {
        LayerCaches { layers }
    }
    /// Builds `n` layers with a factory that receives the layer index.
    ///
    /// # Errors
    /// The first error of the factory.
    pub fn try_from_fn(
        n: usize,
        mut make: impl FnMut(usize) -> Result<Box<dyn KvCache>>,
    ) -> Result<Self> {
        Ok(LayerCaches {
            layers: (0..n).map(&mut make).collect::<Result<_>>()?,
        })
    }
    /// Unwraps the per-layer caches.
    pub fn into_layers(self) -> Vec<Box<dyn KvCache>> {
        self.layers
    }
    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }
    /// Whether there are no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
    /// The cache of layer `i`.
    ///
    /// # Errors
    /// [`KvError::IndexOutOfRange`] if there is no such layer.
    pub fn layer(&self, i: usize) -> Result<&dyn KvCache> {
        let len = self.layers.len();
        self.layers
            .get(i)
            .map(|c| c.as_ref())
            .ok_or(KvError::IndexOutOfRange {
                op: "LayerCaches::layer",
                index: i,
                len,
            })
    }
    /// The cache of layer `i`, mutably.
    ///
    /// # Errors
    /// [`KvError::IndexOutOfRange`] if there is no such layer.
    pub fn layer_mut(&mut self, i: usize) -> Result<&mut (dyn KvCache + 'static)> {
        let len = self.layers.len();
        self.layers
            .get_mut(i)
            .map(|c| c.as_mut())
            .ok_or(KvError::IndexOutOfRange {
                op: "LayerCaches::layer_mut",
                index: i,
                len,
            })
    }
    /// Iterates over the layers.
    pub fn iter(&self) -> impl Iterator<Item = &dyn KvCache> {
        self.layers.iter().map(|c| c.as_ref())
    }
    /// Memory summed over layers.
    pub fn memory(&self) -> MemoryReport {
        self.layers.iter().map(|c| c.memory()).sum()
    }
    /// Memory per layer.
    pub fn memory_per_layer(&self) -> Vec<MemoryReport> {
        self.layers.iter().map(|c| c.memory()).collect()
    }
    /// Signals the end of prefill to every layer.
    ///
    /// # Errors
    /// The first layer error (later layers are not signalled).
    pub fn end_prefill(&mut self) -> Result<()> {
        self.layers.iter_mut().try_for_each(|c| c.end_prefill())
    }
    /// Resets every layer.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|c| c.reset());
    }
}
