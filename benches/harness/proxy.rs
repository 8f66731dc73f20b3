//! A TCP delay proxy: network latency between omnibox and its servers
//! (PostgreSQL, the Kafka broker) on one machine.
//!
//! Listens on 127.0.0.1, connects every accepted connection to the target,
//! and forwards the bytes of each direction unchanged, each chunk written D
//! after it was read. Chunks pipeline: a chunk read at t is written at t + D
//! whatever the earlier chunks do, so the proxy adds D each way without
//! limiting throughput (the reader never waits for the writer), and the
//! order of the bytes is kept (one FIFO per direction, due times only grow).
//!
//! Tokio's timers tick in milliseconds, too coarse for 0.5 ms, so every
//! direction has two OS threads: a reader that stamps each chunk and sends
//! it down a channel, and a writer that sleeps until the chunk is due (the
//! thread's timer slack set to 1 ns, the last 25 µs spun) and writes it.
//! Both sockets of a connection have TCP_NODELAY. The threads end with
//! their connection; the proxy itself lives as long as the process.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What spinning replaces at the end of a wait: sleeps overshoot by 5-10 µs
/// with a 1 ns timer slack on this machine, more when it is busy.
const SPIN: Duration = Duration::from_micros(25);

pub struct Proxy {
    pub addr: SocketAddr,
}

/// Starts a proxy on 127.0.0.1:`port` (0: an ephemeral port) forwarding to
/// `target` (HOST:PORT) with `delay` each way.
pub fn start(port: u16, target: &str, delay: Duration) -> io::Result<Proxy> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let addr = listener.local_addr()?;
    let target = target.to_string();
    std::thread::Builder::new()
        .name("proxy-accept".into())
        .spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                match TcpStream::connect(&target) {
                    Ok(server) => {
                        if let Err(e) = connect(client, server, delay) {
                            eprintln!("proxy: {e}");
                        }
                    }
                    Err(e) => {
                        eprintln!("proxy: cannot connect to {target}: {e}");
                        let _ = client.shutdown(Shutdown::Both);
                    }
                }
            }
        })?;
    Ok(Proxy { addr })
}

fn connect(client: TcpStream, server: TcpStream, delay: Duration) -> io::Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    pipe(client.try_clone()?, server.try_clone()?, delay)?;
    pipe(server, client, delay)
}

enum Chunk {
    Data(Instant, Vec<u8>),
    /// The reading side closed (true: with an error)
    End(Instant, bool),
}

/// One direction: `from` → `to`, each chunk `delay` after it was read.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) -> io::Result<()> {
    let (tx, rx) = mpsc::channel::<Chunk>();
    let from_w = from.try_clone()?;
    std::thread::Builder::new()
        .name("proxy-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let (chunk, last) = match from.read(&mut buf) {
                    Ok(0) => (Chunk::End(Instant::now() + delay, false), true),
                    Ok(n) => (
                        Chunk::Data(Instant::now() + delay, buf[..n].to_vec()),
                        false,
                    ),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => (Chunk::End(Instant::now() + delay, true), true),
                };
                if tx.send(chunk).is_err() || last {
                    return;
                }
            }
        })?;
    std::thread::Builder::new()
        .name("proxy-write".into())
        .spawn(move || {
            // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's
            // timer slack (default 50 µs, which would be added to every sleep).
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
            }
            for chunk in rx {
                match chunk {
                    Chunk::Data(due, bytes) => {
                        wait_until(due);
                        if to.write_all(&bytes).is_err() {
                            // The peer is gone: close both ends, which also
                            // wakes the reader of this direction.
                            let _ = to.shutdown(Shutdown::Both);
                            let _ = from_w.shutdown(Shutdown::Both);
                            return;
                        }
                    }
                    Chunk::End(due, error) => {
                        wait_until(due);
                        let _ = to.shutdown(if error {
                            Shutdown::Both
                        } else {
                            Shutdown::Write
                        });
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

fn wait_until(due: Instant) {
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        let left = due - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}
