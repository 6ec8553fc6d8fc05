//! The GPUs a dispatcher may hand out: found through NVML, or declared by flags.

use crate::allocator::Gpu;

/// Why the GPUs could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(
        "cannot load NVML ({0}); is the NVIDIA driver installed on this machine? Without a driver, \
         declare the GPUs with --gpus N (and --gpu-product/--gpu-memory-mib), or use \
         --backend kubernetes"
    )]
    NoDriver(String),
    #[error("NVML failed while listing GPUs: {0}")]
    Nvml(String),
    #[error(
        "NVML found no GPU on this machine; declare them with --gpus N or use --backend kubernetes"
    )]
    None,
}

/// Every GPU NVML sees, with its UUID as id (indices of NVML and CUDA may differ; UUIDs do
/// not), product name and memory. The driver's library is loaded at run time, so this fails
/// cleanly where there is none.
pub fn from_nvml() -> Result<Vec<Gpu>, InventoryError> {
    use nvml_wrapper::error::NvmlError;
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| match e {
        NvmlError::LibloadingError(_) | NvmlError::DriverNotLoaded | NvmlError::LibraryNotFound => {
            InventoryError::NoDriver(e.to_string())
        }
        other => InventoryError::Nvml(other.to_string()),
    })?;
    let n = nvml
        .device_count()
        .map_err(|e| InventoryError::Nvml(e.to_string()))?;
    let mut gpus = Vec::with_capacity(n as usize);
    for i in 0..n {
        let d = nvml
            .device_by_index(i)
            .map_err(|e| InventoryError::Nvml(format!("GPU {i}: {e}")))?;
        let id = d
            .uuid()
            .map_err(|e| InventoryError::Nvml(format!("GPU {i} UUID: {e}")))?;
        let product = d.name().ok();
        let memory_mib = d.memory_info().ok().map(|m| m.total / (1024 * 1024));
        gpus.push(Gpu {
            id,
            product,
            memory_mib,
        });
    }
    if gpus.is_empty() {
        return Err(InventoryError::None);
    }
    Ok(gpus)
}

/// `n` GPUs declared by flags, with ids `0..n` (their indices for `CUDA_VISIBLE_DEVICES`).
pub fn declared(n: u32, product: Option<&str>, memory_mib: Option<u64>) -> Vec<Gpu> {
    (0..n)
        .map(|i| Gpu {
            id: i.to_string(),
            product: product.map(str::to_string),
            memory_mib,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_gpus_are_numbered() {
        let g = declared(2, Some("NVIDIA-A10"), Some(24_000));
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].id, "1");
        assert_eq!(g[0].product.as_deref(), Some("NVIDIA-A10"));
        assert!(declared(0, None, None).is_empty());
    }

    /// With a driver, NVML lists GPUs with UUIDs; without one it fails with advice, never a
    /// panic. (CI has no GPU; the device machine runs the first branch.)
    #[test]
    fn nvml_lists_gpus_or_fails_cleanly() {
        match from_nvml() {
            Ok(gpus) => {
                assert!(!gpus.is_empty());
                for g in &gpus {
                    assert!(
                        g.id.starts_with("GPU-") || g.id.starts_with("MIG-"),
                        "{g:?}"
                    );
                    assert!(g.memory_mib.unwrap_or(0) > 0, "{g:?}");
                }
                eprintln!("NVML sees {gpus:?}");
            }
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("--gpus"), "{text}");
                eprintln!("no NVML here (expected without a GPU): {text}");
            }
        }
    }
}
