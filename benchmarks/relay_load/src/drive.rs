//! The load generator: ChannelData from many allocated client sockets to one relay, a sink that
//! counts what the relay forwards, and a ping client with an echo peer for round trips.
//!
//! The TURN control exchanges (Allocate, ChannelBind) are done beforehand by the Python harness
//! on the same sockets, which it hands over as inherited file descriptors; this process only
//! sends and counts. Payloads start with a 4-byte step tag so the sink counts each step's
//! datagrams alone (late ones from an earlier step are ignored).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::mmsg::{self, Outgoing, RecvBatch, SendBatch};

/// Datagrams per sendmmsg call, and per recvmmsg call of the sink.
const BATCH: usize = 32;
/// The channel the load clients bound to the sink; the ping client's channel to the echo peer.
pub const LOAD_CHANNEL: u16 = 0x4000;
pub const PING_CHANNEL: u16 = 0x4001;
/// The ping payloads' tag: never a step tag, so the sink would not count them.
const PING_TAG: u32 = u32::MAX;
const POLL: Duration = Duration::from_millis(50);
const PING_TIMEOUT: Duration = Duration::from_millis(200);
const BUFFERS: usize = 4 << 20;

pub struct Sockets {
    pub server: SocketAddr,
    pub clients: Vec<UdpSocket>,
    pub sink: UdpSocket,
    pub ping: UdpSocket,
    pub echo: UdpSocket,
    /// The relay's process, whose CPU time each step reports.
    pub watch: Option<u32>,
}

/// What one step measured.
pub struct Step {
    pub offered: u64,
    pub received: u64,
    pub received_bytes: u64,
    /// Seconds the load ran.
    pub elapsed: f64,
    /// CPU seconds (user, system) the watched process used from the start of the load until
    /// the sink drained.
    pub cpu: (f64, f64),
    pub rtt_ns: Vec<u64>,
    pub pings_lost: u64,
}

struct Counters {
    tag: AtomicU32,
    received: AtomicU64,
    received_bytes: AtomicU64,
    stop: AtomicBool,
}

pub struct Driver {
    sockets: Sockets,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
    next_tag: u32,
}

impl Driver {
    pub fn start(sockets: Sockets) -> std::io::Result<Driver> {
        for socket in sockets
            .clients
            .iter()
            .chain([&sockets.sink, &sockets.ping, &sockets.echo])
        {
            // Blocking sends and timed receives, whatever the parent left set.
            socket.set_nonblocking(false)?;
            mmsg::set_buffers(socket.as_raw_fd(), BUFFERS);
        }
        sockets.sink.set_read_timeout(Some(POLL))?;
        sockets.echo.set_read_timeout(Some(POLL))?;
        sockets.ping.set_read_timeout(Some(PING_TIMEOUT))?;
        let counters = Arc::new(Counters {
            tag: AtomicU32::new(0),
            received: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let sink = {
            let (socket, counters) = (sockets.sink.try_clone()?, Arc::clone(&counters));
            thread::spawn(move || count_at_sink(&socket, &counters))
        };
        let echo = {
            let (socket, counters) = (sockets.echo.try_clone()?, Arc::clone(&counters));
            thread::spawn(move || echo(&socket, &counters))
        };
        Ok(Driver {
            sockets,
            counters,
            threads: vec![sink, echo],
            next_tag: 1,
        })
    }

    /// Offer `size`-byte payloads at `rate` datagrams/s (0: as fast as possible) for `seconds`;
    /// with `ping_interval`, a ping client does round trips meanwhile.
    pub fn run(
        &mut self,
        rate: f64,
        seconds: f64,
        size: usize,
        ping_interval: Option<Duration>,
    ) -> Step {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.counters.tag.store(tag, Ordering::Release);
        let (received_before, bytes_before) = (
            self.counters.received.load(Ordering::Acquire),
            self.counters.received_bytes.load(Ordering::Acquire),
        );
        let cpu_before = self.sockets.watch.map(cpu_seconds);
        let started = Instant::now();
        let end = started + Duration::from_secs_f64(seconds);
        let pinger = ping_interval.map(|interval| {
            let ping = self
                .sockets
                .ping
                .try_clone()
                .expect("clone the ping socket");
            let server = self.sockets.server;
            // Pings start once the load runs and stop before it does.
            let (from, to) = (started + Duration::from_millis(100), end - POLL);
            thread::spawn(move || ping_loop(&ping, server, size, interval, from, to))
        });
        let offered = self.blast(tag, rate, end, size);
        let elapsed = started.elapsed().as_secs_f64();
        let (rtt_ns, pings_lost) = pinger
            .map(|p| p.join().expect("ping thread"))
            .unwrap_or_default();
        self.drain();
        let cpu = match (self.sockets.watch, cpu_before) {
            (Some(pid), Some(before)) => {
                let after = cpu_seconds(pid);
                (after.0 - before.0, after.1 - before.1)
            }
            _ => (0.0, 0.0),
        };
        Step {
            offered,
            received: self.counters.received.load(Ordering::Acquire) - received_before,
            received_bytes: self.counters.received_bytes.load(Ordering::Acquire) - bytes_before,
            elapsed,
            cpu,
            rtt_ns,
            pings_lost,
        }
    }

    /// Round-robin over the client sockets, one sendmmsg of up to [`BATCH`] each, paced so the
    /// total never runs ahead of `rate` (sleeping, not spinning: the relay needs the CPU).
    fn blast(&self, tag: u32, rate: f64, end: Instant, size: usize) -> u64 {
        let mut message = vec![0u8; 4 + size];
        message[..2].copy_from_slice(&LOAD_CHANNEL.to_be_bytes());
        message[2..4].copy_from_slice(&(size as u16).to_be_bytes());
        message[4..8].copy_from_slice(&tag.to_be_bytes());
        let server = mmsg::to_sockaddr(self.sockets.server);
        let out: Vec<Outgoing<'_>> = (0..BATCH)
            .map(|_| Outgoing {
                head: &message,
                body: &[],
                to: &server,
            })
            .collect();
        let mut send = SendBatch::new(BATCH);
        let fds: Vec<_> = self.sockets.clients.iter().map(|s| s.as_raw_fd()).collect();
        let started = Instant::now();
        let (mut offered, mut turn) = (0u64, 0usize);
        loop {
            let now = Instant::now();
            if now >= end {
                return offered;
            }
            let count = if rate > 0.0 {
                let due = (rate * (now - started).as_secs_f64()) as u64;
                if due <= offered {
                    // Wake when half a batch is due: bursts stay short, syscalls few.
                    let wait = (offered + 1 - due + BATCH as u64 / 2) as f64 / rate;
                    thread::sleep(Duration::from_secs_f64(wait.max(20e-6)));
                    continue;
                }
                ((due - offered) as usize).min(BATCH)
            } else {
                BATCH
            };
            offered += send.send(fds[turn % fds.len()], &out[..count]) as u64;
            turn += 1;
        }
    }

    /// Wait until the sink has seen nothing new for a while (the relay's queues are empty).
    fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut last = self.counters.received.load(Ordering::Acquire);
        let mut quiet = 0;
        while quiet < 3 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            let now = self.counters.received.load(Ordering::Acquire);
            quiet = if now == last { quiet + 1 } else { 0 };
            last = now;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.counters.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn count_at_sink(socket: &UdpSocket, counters: &Counters) {
    let mut batch = RecvBatch::new(BATCH * 2, 2048);
    while !counters.stop.load(Ordering::Acquire) {
        let n = batch.recv(socket.as_raw_fd(), true);
        let tag = counters.tag.load(Ordering::Acquire).to_be_bytes();
        let (mut packets, mut bytes) = (0, 0);
        for i in 0..n {
            let data = batch.data(i);
            if data.len() >= 4 && data[..4] == tag {
                packets += 1;
                bytes += data.len() as u64;
            }
        }
        counters.received.fetch_add(packets, Ordering::AcqRel);
        counters.received_bytes.fetch_add(bytes, Ordering::AcqRel);
    }
}

/// The echo peer: whatever reaches it goes back to where it came from (a relayed address).
fn echo(socket: &UdpSocket, counters: &Counters) {
    let mut buffer = vec![0u8; 65_536];
    while !counters.stop.load(Ordering::Acquire) {
        if let Ok((n, from)) = socket.recv_from(&mut buffer) {
            if from.ip().is_loopback() {
                let _ = socket.send_to(&buffer[..n], from);
            }
        }
    }
}

/// Lock-step round trips from `from` until `to`, one every `interval`.
fn ping_loop(
    socket: &UdpSocket,
    server: SocketAddr,
    size: usize,
    interval: Duration,
    from: Instant,
    to: Instant,
) -> (Vec<u64>, u64) {
    let size = size.max(8);
    let mut message = vec![0u8; 4 + size];
    message[..2].copy_from_slice(&PING_CHANNEL.to_be_bytes());
    message[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    message[4..8].copy_from_slice(&PING_TAG.to_be_bytes());
    let mut buffer = vec![0u8; 65_536];
    let (mut rtts, mut lost) = (Vec::new(), 0u64);
    thread::sleep(from.saturating_duration_since(Instant::now()));
    let mut seq = 0u32;
    while Instant::now() + interval < to {
        seq += 1;
        message[8..12].copy_from_slice(&seq.to_be_bytes());
        let sent = Instant::now();
        if socket.send_to(&message, server).is_err() {
            lost += 1;
            continue;
        }
        loop {
            match socket.recv_from(&mut buffer) {
                // ChannelData back: header, our tag, our sequence number.
                Ok((n, _)) if n >= 12 && buffer[4..12] == message[4..12] => {
                    rtts.push(sent.elapsed().as_nanos() as u64);
                    break;
                }
                Ok(_) => continue, // a late answer to an earlier ping
                Err(_) => {
                    lost += 1;
                    break;
                }
            }
        }
        thread::sleep(interval.saturating_sub(sent.elapsed()));
    }
    (rtts, lost)
}

/// (utime, stime) of process `pid` (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // The command name may hold spaces; the fields after it are space-separated.
    let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return (0.0, 0.0);
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) / hz, ticks(12) / hz)
}
