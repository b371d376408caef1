//! The async runtime a process runs on, as `runtime.worker_threads` says.

use crate::config::RuntimeConfig;

/// A runtime with `cfg.worker_threads` threads: one is a current-thread runtime (every task on the
/// thread that blocks on it, so no task is ever woken on another thread), more a multi-thread one,
/// 0 one thread per core.
pub fn build(cfg: &RuntimeConfig) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match cfg.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    builder.enable_all().build()
}
