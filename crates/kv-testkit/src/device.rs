//! The one place that picks the device tests, benches and binaries run on.

use burn::prelude::*;

/// The device for tests: `flex` (CPU), or wgpu when the `wgpu` feature is on and
/// `KV_TEST_DEVICE=wgpu` is set.
///
/// # Panics
/// When `KV_TEST_DEVICE=wgpu` is set but no wgpu adapter initialises (probed once), or the
/// crate was built without the `wgpu` feature: a run that asks for wgpu must not pass on the
/// CPU silently.
pub fn test_device() -> Device {
    let wants_wgpu = std::env::var("KV_TEST_DEVICE").as_deref() == Ok("wgpu");
    #[cfg(feature = "wgpu")]
    {
        if wants_wgpu {
            use std::sync::OnceLock;
            static WGPU: OnceLock<Result<Device, String>> = OnceLock::new();
            return match WGPU
                .get_or_init(|| Device::wgpu_options().init().map_err(|e| format!("{e:?}")))
            {
                Ok(d) => d.clone(),
                Err(e) => panic!("KV_TEST_DEVICE=wgpu but no wgpu adapter initialises: {e}"),
            };
        }
    }
    assert!(
        !wants_wgpu,
        "KV_TEST_DEVICE=wgpu but kv-testkit was built without its `wgpu` feature"
    );
    Device::flex()
}

/// A short name of the device tests run on (for messages and reports).
pub fn device_name(device: &Device) -> String {
    format!("{device:?}")
}
