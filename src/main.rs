//! `omnibox`: the operations CLI of the omnibox engine.

mod cli;

fn main() -> std::process::ExitCode {
    tune_allocator();
    cli::main()
}

/// glibc's malloc raises its mmap threshold to the size of the largest
/// block freed (up to 32 MiB); past that, the buffers of large events come
/// from its arenas and stay resident once freed, so a relay's or a
/// consumer's memory grows with the allocator's high-water mark instead of
/// following the batches in flight. A fixed threshold keeps every block of
/// 128 KiB or more in its own mapping, given back to the system when freed
/// (`bench/run.sh memory` measures the difference).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only sets a malloc parameter; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
