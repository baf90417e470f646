//! Finding this machine's GPUs through the CUDA driver, loaded at run time.
//!
//! `cudarc` opens `libcuda` only when first used, so volley builds and runs on machines
//! without CUDA; there the count is 0.

/// How many CUDA devices this process can see (0 without a driver or devices).
pub fn detect() -> u32 {
    // A missing library makes cudarc panic on first use; that means "no GPUs", so the
    // panic is caught, and kept out of the log (this runs once, at node start).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let count = std::panic::catch_unwind(|| {
        cudarc::driver::result::init().ok()?;
        cudarc::driver::result::device::get_count().ok()
    });
    std::panic::set_hook(hook);
    match count {
        Ok(Some(n)) if n > 0 => n as u32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn detect_never_panics() {
        let n = super::detect();
        assert!(n < 1024);
    }
}
