//! The one place that picks the device tests, benches and binaries run on.

use burn::prelude::*;

/// The device for tests: `flex` (CPU), or wgpu when the `wgpu` feature is on,
/// `KV_TEST_DEVICE=wgpu` is set and an adapter exists (probed once, without panicking).
pub fn test_device() -> Device {
    #[cfg(feature = "wgpu")]
    {
        if std::env::var("KV_TEST_DEVICE").as_deref() == Ok("wgpu") {
            use std::sync::OnceLock;
            static WGPU: OnceLock<Option<Device>> = OnceLock::new();
            if let Some(d) = WGPU.get_or_init(|| Device::wgpu_options().init().ok()) {
                return d.clone();
            }
        }
    }
    Device::flex()
}

/// A short name of the device tests run on (for messages and reports).
pub fn device_name(device: &Device) -> String {
    format!("{device:?}")
}
