//! The data plane: the client-facing UDP socket, one relayed UDP socket per allocation, and a
//! worker thread that forwards between them without ever touching Python.
//!
//! Threading: one worker thread waits on an epoll set holding the listening socket and every
//! relayed socket (level-triggered), drains each ready socket with `recvmmsg` in batches, decides
//! under the state lock what each datagram becomes, and sends the results with `sendmmsg`
//! (scatter-gather: headers are prepended without copying payloads; consecutive datagrams of
//! one size to one address go out as one UDP GSO buffer, `UDP_SEGMENT`, which the kernel cuts
//! back into those datagrams after one pass down the stack instead of one each). The control plane's calls
//! (`allocate`, `add_permission`, …) take the same lock briefly from their own thread. STUN
//! messages other than Send indications go up through a bounded queue; so does peer data for
//! TCP-transport clients. The worker wakes at least every [`TICK`] to notice `close()` and to
//! sweep expired entries; expiry itself is checked on every datagram.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::codec::{self, ClientMessage, DATA_INDICATION_HEADER_MAX};
use super::stats::{DropReason, GlobalStats, Traffic};
use super::sys::{self, Outgoing, Poller, RecvBatch, SendBatch};
use super::table::{Channels, Permissions, TokenBucket};

/// How often the worker looks at the stop flag and sweeps expired entries, at the latest.
pub const TICK: Duration = Duration::from_millis(50);
/// Datagrams per recvmmsg/sendmmsg call.
pub const BATCH: usize = 64;
/// Batches taken from one ready socket before the worker looks at the others (fairness).
const ROUNDS: usize = 4;
/// The largest UDP payload, so no datagram is ever truncated.
const SLOT: usize = 65_536;
/// Socket buffers asked for on the listening socket (the kernel caps them).
const LISTEN_BUFFER: usize = 4 << 20;
/// What ChannelBind grants the peer's permission (RFC 8656 §9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
const CLIENT_TOKEN: u64 = u64::MAX;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How to start a [`DataPlane`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The client-facing address to bind.
    pub listen: SocketAddr,
    /// Where relayed sockets are bound; defaults to the listening IP.
    pub relay_ip: Option<IpAddr>,
    /// Relayed ports, inclusive; `(0, 0)` lets the OS choose.
    pub relay_ports: (u16, u16),
    /// Capacity of the control queue and of the TCP-client queue (datagrams).
    pub control_queue: usize,
    /// The relay's own addresses that peers may be at only as a live relayed allocation of this
    /// data plane (two clients of one relay reaching each other's relayed addresses), never at
    /// another port; `None`: the relay IP and the listening IP. An unspecified address stands
    /// for every loopback address of its family too. The control plane leaves out what its
    /// operator allow-listed.
    pub own_ips: Option<Vec<IpAddr>>,
    /// Send runs of equal-sized datagrams to one address as one UDP GSO buffer (off: one
    /// datagram per message, as before; GSO also turns itself off if the kernel refuses it).
    pub gso: bool,
}

impl Config {
    pub fn new(listen: SocketAddr) -> Self {
        Config {
            listen,
            relay_ip: None,
            relay_ports: (0, 0),
            control_queue: 4096,
            own_ips: None,
            gso: true,
        }
    }
}

/// What went wrong in a data-plane call.
#[derive(Debug)]
pub enum RelayError {
    /// A bad argument: the message says which and why.
    Invalid(String),
    /// No allocation for this client.
    UnknownAllocation(SocketAddr),
    /// The data plane was closed.
    Closed,
    /// The operating system refused (binding, sending); `context` says what was tried.
    Io { context: String, source: io::Error },
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayError::Invalid(message) => f.write_str(message),
            RelayError::UnknownAllocation(client) => write!(f, "no allocation for client {client}"),
            RelayError::Closed => f.write_str("the relay data plane is closed"),
            RelayError::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for RelayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RelayError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> RelayError {
    let context = context.into();
    move |source| RelayError::Io { context, source }
}

/// Metadata of one allocation, for the control plane and metrics.
#[derive(Debug, Clone)]
pub struct AllocationStats {
    pub client: SocketAddr,
    pub relayed: SocketAddr,
    pub tcp: bool,
    pub bytes_per_second: u64,
    pub permissions: usize,
    pub channels: usize,
    pub traffic: Traffic,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub last_activity_ms: u64,
}

struct Allocation {
    client: SocketAddr,
    relayed: SocketAddr,
    socket: UdpSocket,
    tcp: bool,
    permissions: Permissions,
    channels: Channels,
    to_peers: TokenBucket,
    to_client: TokenBucket,
    traffic: Traffic,
    created: Instant,
    last_activity: Instant,
}

#[derive(Default)]
struct Slot {
    generation: u32,
    allocation: Option<Allocation>,
}

fn token(index: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | index as u64
}

/// SplitMix64: transaction IDs of Data indications and the first port tried need to be hard to
/// predict and not to collide, not secret; seeded from the OS.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn transaction_id(&mut self) -> [u8; 12] {
        let a = self.next().to_le_bytes();
        let b = self.next().to_le_bytes();
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&a);
        t[8..].copy_from_slice(&b[..4]);
        t
    }
}

struct State {
    slots: Vec<Slot>,
    free: Vec<usize>,
    by_client: HashMap<SocketAddr, usize>,
    /// Live relayed ports (every relayed socket binds the one relay IP) → slot.
    by_port: HashMap<u16, usize>,
    stats: GlobalStats,
    rng: SplitMix,
    closed: bool,
}

impl State {
    fn allocation(&mut self, client: SocketAddr) -> Result<&mut Allocation, RelayError> {
        if self.closed {
            return Err(RelayError::Closed);
        }
        let index = *self
            .by_client
            .get(&client)
            .ok_or(RelayError::UnknownAllocation(client))?;
        Ok(self.slots[index]
            .allocation
            .as_mut()
            .expect("by_client points at live slots"))
    }
}

/// A bounded queue of datagrams with their addresses, for the control plane.
struct Queue {
    items: Mutex<VecDeque<(Vec<u8>, SocketAddr)>>,
    ready: Condvar,
    capacity: usize,
    closed: AtomicBool,
    /// Threads inside `pop` now (tests wait on it instead of sleeping).
    waiters: AtomicUsize,
}

impl Queue {
    fn new(capacity: usize) -> Self {
        Queue {
            items: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            capacity,
            closed: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
        }
    }

    fn push(&self, data: Vec<u8>, addr: SocketAddr) -> bool {
        let mut items = lock(&self.items);
        if items.len() >= self.capacity {
            return false;
        }
        items.push_back((data, addr));
        drop(items);
        self.ready.notify_one();
        true
    }

    fn pop(&self, timeout: Duration, max: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        self.waiters.fetch_add(1, Ordering::AcqRel);
        let popped = self.pop_inner(timeout, max);
        self.waiters.fetch_sub(1, Ordering::AcqRel);
        popped
    }

    fn pop_inner(&self, timeout: Duration, max: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let deadline = Instant::now() + timeout;
        let mut items = lock(&self.items);
        loop {
            if !items.is_empty() {
                let n = items.len().min(max);
                return items.drain(..n).collect();
            }
            if self.closed.load(Ordering::Acquire) {
                return Vec::new();
            }
            let now = Instant::now();
            if now >= deadline {
                return Vec::new();
            }
            items = self
                .ready
                .wait_timeout(items, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.items).clear();
        self.ready.notify_all();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not turn every later call into one; the state stays consistent
    // because no update spans a panic point.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

struct Shared {
    state: Mutex<State>,
    control: Queue,
    tcp: Queue,
    stop: AtomicBool,
    poller: Poller,
    client_socket: RwLock<Option<Arc<UdpSocket>>>,
    listen: SocketAddr,
    relay_ip: IpAddr,
    own_ips: Vec<IpAddr>,
    relay_ports: (u16, u16),
    epoch: Instant,
    epoch_unix_ms: u64,
}

impl Shared {
    /// Whether `peer` is the relay's own listening socket: relaying there would loop.
    fn is_own_listener(&self, peer: SocketAddr) -> bool {
        if peer.port() != self.listen.port() {
            return false;
        }
        let ip = peer.ip();
        let listen = self.listen.ip();
        ip == listen
            || ip.is_unspecified()
            || (listen.is_unspecified() && (ip.is_loopback() || ip == self.relay_ip))
    }

    /// Whether `ip` is one of the relay's own addresses that only live allocations may be
    /// reached at.
    #[inline]
    fn guards(&self, ip: IpAddr) -> bool {
        self.own_ips.iter().any(|&own| {
            own == ip
                || (own.is_unspecified()
                    && own.is_ipv4() == ip.is_ipv4()
                    && (ip.is_loopback() || ip.is_unspecified()))
        })
    }

    /// The address policy for data: a peer at one of the relay's guarded addresses is allowed
    /// only as a live relayed allocation (whose socket the kernel then delivers to locally);
    /// the listening address never.
    #[inline]
    fn peer_allowed(&self, by_port: &HashMap<u16, usize>, peer: SocketAddr) -> bool {
        if self.is_own_listener(peer) {
            return false;
        }
        if !self.guards(peer.ip()) {
            return true;
        }
        by_port.contains_key(&peer.port())
            && (peer.ip() == self.relay_ip
                || (self.relay_ip.is_unspecified() && self.relay_ip.is_ipv4() == peer.is_ipv4()))
    }

    fn unix_ms(&self, at: Instant) -> u64 {
        self.epoch_unix_ms + at.saturating_duration_since(self.epoch).as_millis() as u64
    }
}

/// The TURN data plane. Dropping it closes it.
pub struct DataPlane {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
    local: SocketAddr,
}

impl DataPlane {
    /// Bind the client-facing socket and start the worker.
    pub fn start(config: Config) -> Result<DataPlane, RelayError> {
        let (min, max) = config.relay_ports;
        if min > max || (min == 0) != (max == 0) {
            return Err(RelayError::Invalid(format!(
                "relay port range {min}-{max} is not a range of ports (use 0-0 for any port)"
            )));
        }
        if config.control_queue == 0 {
            return Err(RelayError::Invalid(
                "control_queue must hold at least one datagram".into(),
            ));
        }
        let relay_ip = config.relay_ip.unwrap_or(config.listen.ip());
        let own_ips = config.own_ips.clone().unwrap_or_else(|| {
            let mut own = vec![relay_ip];
            if config.listen.ip() != relay_ip {
                own.push(config.listen.ip());
            }
            own
        });
        let socket = UdpSocket::bind(config.listen)
            .map_err(io_error(format!("binding the relay to {}", config.listen)))?;
        socket
            .set_nonblocking(true)
            .map_err(io_error("setting the listening socket non-blocking"))?;
        sys::set_buffer_sizes(&socket, LISTEN_BUFFER);
        let local = socket
            .local_addr()
            .map_err(io_error("reading the bound address"))?;
        let poller = Poller::new().map_err(io_error("creating an epoll instance"))?;
        poller
            .add(socket.as_raw_fd(), CLIENT_TOKEN)
            .map_err(io_error("registering the listening socket"))?;
        let socket = Arc::new(socket);
        let mut seed = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                slots: Vec::new(),
                free: Vec::new(),
                by_client: HashMap::new(),
                by_port: HashMap::new(),
                stats: GlobalStats::default(),
                rng: SplitMix(u64::from_le_bytes(seed)),
                closed: false,
            }),
            control: Queue::new(config.control_queue),
            tcp: Queue::new(config.control_queue),
            stop: AtomicBool::new(false),
            poller,
            client_socket: RwLock::new(Some(Arc::clone(&socket))),
            listen: local,
            relay_ip,
            own_ips,
            relay_ports: config.relay_ports,
            epoch: Instant::now(),
            epoch_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        });
        let worker_shared = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name("teia-relay".into())
            .spawn(move || Worker::new(worker_shared, socket, config.gso).run())
            .map_err(io_error("starting the relay worker thread"))?;
        Ok(DataPlane {
            shared,
            worker: Mutex::new(Some(worker)),
            local,
        })
    }

    /// The bound client-facing address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// STUN messages for the control plane, waiting up to `timeout`; at most `max` at once.
    pub fn recv_control(&self, timeout: Duration, max: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        self.shared.control.pop(timeout, max)
    }

    /// Threads waiting in [`DataPlane::recv_control`] or [`DataPlane::recv_tcp`] now.
    pub fn waiting_receivers(&self) -> usize {
        self.shared.control.waiters.load(Ordering::Acquire)
            + self.shared.tcp.waiters.load(Ordering::Acquire)
    }

    /// Peer data for TCP-transport clients, already framed for the TCP stream (padded
    /// ChannelData, or a Data indication), with the client it is for.
    pub fn recv_tcp(&self, timeout: Duration, max: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        self.shared.tcp.pop(timeout, max)
    }

    /// Send a control-plane datagram (a STUN response) to a client from the listening socket.
    pub fn send_to_client(&self, data: &[u8], client: SocketAddr) -> Result<(), RelayError> {
        let socket = self
            .shared
            .client_socket
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(RelayError::Closed)?;
        socket
            .send_to(data, client)
            .map_err(io_error(format!("sending to client {client}")))?;
        lock(&self.shared.state).stats.control_replies += 1;
        Ok(())
    }

    /// Open a relayed socket for `client`; returns its address. `tcp`: the client speaks over a
    /// TCP control connection, so peer data goes to [`DataPlane::recv_tcp`], and nothing from
    /// the listening UDP socket is accepted for it.
    pub fn allocate(
        &self,
        client: SocketAddr,
        bytes_per_second: u64,
        tcp: bool,
    ) -> Result<SocketAddr, RelayError> {
        let mut state = lock(&self.shared.state);
        if state.closed {
            return Err(RelayError::Closed);
        }
        if state.by_client.contains_key(&client) {
            return Err(RelayError::Invalid(format!(
                "an allocation exists for client {client}"
            )));
        }
        let start = state.rng.next();
        let socket = self.bind_relayed(start)?;
        let relayed = socket
            .local_addr()
            .map_err(io_error("reading the relayed address"))?;
        let index = match state.free.pop() {
            Some(index) => index,
            None => {
                state.slots.push(Slot::default());
                state.slots.len() - 1
            }
        };
        let generation = state.slots[index].generation;
        if let Err(e) = self
            .shared
            .poller
            .add(socket.as_raw_fd(), token(index, generation))
        {
            state.free.push(index);
            return Err(io_error("registering a relayed socket")(e));
        }
        let now = Instant::now();
        state.slots[index].allocation = Some(Allocation {
            client,
            relayed,
            socket,
            tcp,
            permissions: Permissions::default(),
            channels: Channels::default(),
            to_peers: TokenBucket::new(bytes_per_second, now),
            to_client: TokenBucket::new(bytes_per_second, now),
            traffic: Traffic::default(),
            created: now,
            last_activity: now,
        });
        state.by_client.insert(client, index);
        state.by_port.insert(relayed.port(), index);
        state.stats.allocations += 1;
        state.stats.allocations_created += 1;
        Ok(relayed)
    }

    fn bind_relayed(&self, start: u64) -> Result<UdpSocket, RelayError> {
        let ip = self.shared.relay_ip;
        let (min, max) = self.shared.relay_ports;
        let socket = if min == 0 {
            UdpSocket::bind(SocketAddr::new(ip, 0))
                .map_err(io_error(format!("binding a relayed socket on {ip}")))?
        } else {
            // Start at a random port (RFC 8656 §7.2 wants relayed ports hard to predict), then
            // walk the range once.
            let span = u32::from(max - min) + 1;
            let first = (start % u64::from(span)) as u32;
            let mut found = None;
            for step in 0..span {
                let port = min + ((first + step) % span) as u16;
                match UdpSocket::bind(SocketAddr::new(ip, port)) {
                    Ok(socket) => {
                        found = Some(socket);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                    Err(e) => {
                        return Err(io_error(format!("binding a relayed socket on {ip}:{port}"))(e))
                    }
                }
            }
            found.ok_or_else(|| RelayError::Io {
                context: format!("relay port range {min}-{max} on {ip} is exhausted"),
                source: io::Error::from(io::ErrorKind::AddrInUse),
            })?
        };
        socket
            .set_nonblocking(true)
            .map_err(io_error("setting a relayed socket non-blocking"))?;
        Ok(socket)
    }

    /// Close `client`'s relayed socket; false if it had none.
    pub fn release(&self, client: SocketAddr) -> bool {
        let mut state = lock(&self.shared.state);
        let Some(index) = state.by_client.remove(&client) else {
            return false;
        };
        let State { slots, by_port, .. } = &mut *state;
        let slot = &mut slots[index];
        if let Some(allocation) = slot.allocation.take() {
            self.shared.poller.remove(allocation.socket.as_raw_fd());
            by_port.remove(&allocation.relayed.port());
        }
        slot.generation = slot.generation.wrapping_add(1);
        state.free.push(index);
        state.stats.allocations -= 1;
        state.stats.allocations_released += 1;
        true
    }

    fn check_peer_family(allocation: &Allocation, peer: IpAddr) -> Result<(), RelayError> {
        if peer.is_unspecified() {
            return Err(RelayError::Invalid(format!("{peer} is not a peer address")));
        }
        if peer.is_ipv4() != allocation.relayed.is_ipv4() {
            return Err(RelayError::Invalid(format!(
                "peer {peer} is not of the relayed address's family ({})",
                allocation.relayed
            )));
        }
        Ok(())
    }

    /// Install or refresh the permission for `peer_ip` (ports do not matter); a zero lifetime
    /// removes it.
    pub fn add_permission(
        &self,
        client: SocketAddr,
        peer_ip: IpAddr,
        lifetime: Duration,
    ) -> Result<(), RelayError> {
        let mut state = lock(&self.shared.state);
        let allocation = state.allocation(client)?;
        Self::check_peer_family(allocation, peer_ip)?;
        allocation
            .permissions
            .install(peer_ip, Instant::now(), lifetime);
        Ok(())
    }

    /// Bind (or refresh) `channel` to `peer`, and install or extend the permission for the
    /// peer's IP by up to [`PERMISSION_LIFETIME`].
    pub fn bind_channel(
        &self,
        client: SocketAddr,
        channel: u16,
        peer: SocketAddr,
        lifetime: Duration,
    ) -> Result<(), RelayError> {
        if lifetime.is_zero() {
            return Err(RelayError::Invalid(
                "a channel binding needs a positive lifetime".into(),
            ));
        }
        if peer.port() == 0 {
            return Err(RelayError::Invalid(format!("{peer} has no port")));
        }
        if self.shared.is_own_listener(peer) {
            return Err(RelayError::Invalid(format!(
                "refusing to bind a channel to the relay's own listening address {peer}"
            )));
        }
        let mut state = lock(&self.shared.state);
        if !state.closed && !self.shared.peer_allowed(&state.by_port, peer) {
            return Err(RelayError::Invalid(format!(
                "refusing to bind a channel to {peer}: the relay's own address, not a live \
                 relayed allocation"
            )));
        }
        let allocation = state.allocation(client)?;
        Self::check_peer_family(allocation, peer.ip())?;
        let now = Instant::now();
        allocation
            .channels
            .bind(channel, peer, now, lifetime)
            .map_err(|e| RelayError::Invalid(e.to_string()))?;
        allocation
            .permissions
            .extend(peer.ip(), now, lifetime.min(PERMISSION_LIFETIME));
        Ok(())
    }

    /// Change the allocation's byte rate in each direction (0 = unlimited).
    pub fn set_quota(&self, client: SocketAddr, bytes_per_second: u64) -> Result<(), RelayError> {
        let mut state = lock(&self.shared.state);
        let allocation = state.allocation(client)?;
        let now = Instant::now();
        allocation.to_peers.set_rate(bytes_per_second, now);
        allocation.to_client.set_rate(bytes_per_second, now);
        Ok(())
    }

    /// Forward `data` from `client`'s relayed socket to `peer` (for TCP-transport clients,
    /// whose Send indications and ChannelData reach the control plane). Same checks as the UDP
    /// path; false when dropped (counted).
    pub fn send_from_relay(
        &self,
        client: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
    ) -> Result<bool, RelayError> {
        let mut guard = lock(&self.shared.state);
        let State {
            slots,
            by_client,
            by_port,
            stats,
            closed,
            ..
        } = &mut *guard;
        let own = !self.shared.peer_allowed(by_port, peer);
        if *closed {
            return Err(RelayError::Closed);
        }
        let index = *by_client
            .get(&client)
            .ok_or(RelayError::UnknownAllocation(client))?;
        let allocation = slots[index].allocation.as_mut().expect("live slot");
        let now = Instant::now();
        let verdict = if own {
            Err(DropReason::ForbiddenPeer)
        } else if !allocation.permissions.allows(peer.ip(), now) {
            Err(DropReason::NoPermission)
        } else if !allocation.to_peers.take(data.len(), now) {
            Err(DropReason::Quota)
        } else if allocation.socket.send_to(data, peer).is_err() {
            Err(DropReason::SendError)
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => {
                allocation.traffic.to_peer(data.len());
                allocation.last_activity = now;
                stats.traffic.to_peer(data.len());
                Ok(true)
            }
            Err(reason) => {
                allocation.traffic.drop(reason);
                stats.traffic.drop(reason);
                Ok(false)
            }
        }
    }

    /// The global counters.
    pub fn stats(&self) -> GlobalStats {
        lock(&self.shared.state).stats
    }

    /// Metadata of every allocation.
    pub fn allocation_stats(&self) -> Vec<AllocationStats> {
        let state = lock(&self.shared.state);
        state
            .slots
            .iter()
            .filter_map(|slot| slot.allocation.as_ref())
            .map(|a| AllocationStats {
                client: a.client,
                relayed: a.relayed,
                tcp: a.tcp,
                bytes_per_second: a.to_peers.rate(),
                permissions: a.permissions.len(),
                channels: a.channels.len(),
                traffic: a.traffic,
                created_ms: self.shared.unix_ms(a.created),
                last_activity_ms: self.shared.unix_ms(a.last_activity),
            })
            .collect()
    }

    /// Stop the worker, close every socket, wake waiting receivers. Idempotent; returns within
    /// about [`TICK`].
    pub fn close(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(worker) = lock(&self.worker).take() {
            let _ = worker.join();
        }
        {
            let mut state = lock(&self.shared.state);
            state.closed = true;
            state.by_client.clear();
            state.by_port.clear();
            state.free.clear();
            for slot in state.slots.drain(..) {
                if let Some(allocation) = slot.allocation {
                    self.shared.poller.remove(allocation.socket.as_raw_fd());
                }
            }
            state.stats.allocations = 0;
        }
        if let Some(socket) = self
            .shared
            .client_socket
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            self.shared.poller.remove(socket.as_raw_fd());
        }
        self.shared.control.close();
        self.shared.tcp.close();
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.close();
    }
}

/// A datagram from a client that passed every check: where it goes.
struct ToPeer {
    slot: usize,
    fd: RawFd,
    datagram: usize,
    start: usize,
    len: usize,
    to: SocketAddr,
}

/// A datagram from a peer that passed every check: its header and where it goes.
struct ToClient {
    datagram: usize,
    head_len: usize,
    pad: usize,
}

struct Worker {
    shared: Arc<Shared>,
    client: Arc<UdpSocket>,
    recv: RecvBatch,
    send: SendBatch,
    heads: Vec<[u8; DATA_INDICATION_HEADER_MAX]>,
    to_peers: Vec<ToPeer>,
    to_client: Vec<ToClient>,
    failed: Vec<bool>,
}

impl Worker {
    fn new(shared: Arc<Shared>, client: Arc<UdpSocket>, gso: bool) -> Self {
        let mut send = SendBatch::new(BATCH);
        if !gso {
            send.disable_gso();
        }
        Worker {
            shared,
            client,
            recv: RecvBatch::new(BATCH, SLOT),
            send,
            heads: vec![[0; DATA_INDICATION_HEADER_MAX]; BATCH],
            to_peers: Vec::with_capacity(BATCH),
            to_client: Vec::with_capacity(BATCH),
            failed: vec![false; BATCH],
        }
    }

    fn run(mut self) {
        let mut events = Vec::with_capacity(256);
        let mut tokens = Vec::with_capacity(256);
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        let tick = TICK.as_millis() as i32;
        while !self.shared.stop.load(Ordering::Acquire) {
            self.shared.poller.wait(&mut events, &mut tokens, tick);
            for &token in &tokens {
                if token == CLIENT_TOKEN {
                    self.drain_clients();
                } else {
                    self.drain_relayed(token);
                }
            }
            let now = Instant::now();
            if now >= next_sweep {
                let mut state = lock(&self.shared.state);
                for allocation in state.slots.iter_mut().filter_map(|s| s.allocation.as_mut()) {
                    allocation.permissions.sweep(now);
                    allocation.channels.sweep(now);
                }
                next_sweep = now + SWEEP_EVERY;
            }
        }
    }

    /// Drain the listening socket: ChannelData and Send indications are forwarded, other STUN
    /// goes up, the rest is dropped.
    fn drain_clients(&mut self) {
        for _ in 0..ROUNDS {
            let n = self.recv.recv(&self.client);
            if n == 0 {
                return;
            }
            self.client_batch(n);
            if n < self.recv.capacity() {
                return;
            }
        }
    }

    fn client_batch(&mut self, n: usize) {
        let shared = &*self.shared;
        let mut guard = lock(&shared.state);
        let State {
            slots,
            by_client,
            by_port,
            stats,
            ..
        } = &mut *guard;
        let now = Instant::now();
        self.to_peers.clear();
        for i in 0..n {
            let (datagram, from) = self.recv.get(i);
            stats.client_datagrams += 1;
            stats.client_bytes += datagram.len() as u64;
            let Some(from) = from else {
                stats.traffic.drop(DropReason::Malformed);
                continue;
            };
            let (payload, peer_or_channel) = match codec::classify(datagram) {
                Err(_) => {
                    stats.traffic.drop(DropReason::Malformed);
                    continue;
                }
                Ok(ClientMessage::Stun) => {
                    if shared.control.push(datagram.to_vec(), from) {
                        stats.control_messages += 1;
                    } else {
                        stats.traffic.drop(DropReason::ControlQueueFull);
                    }
                    continue;
                }
                Ok(ClientMessage::ChannelData { channel, payload }) => (payload, Err(channel)),
                Ok(ClientMessage::Send { peer, data }) => (data, Ok(peer)),
            };
            let index = match by_client.get(&from) {
                Some(&index) => index,
                None => {
                    stats.traffic.drop(DropReason::NoAllocation);
                    continue;
                }
            };
            let allocation = slots[index].allocation.as_mut().expect("live slot");
            let verdict = if allocation.tcp {
                Err(DropReason::NoAllocation)
            } else {
                match peer_or_channel {
                    Ok(peer) => Ok(peer),
                    Err(channel) => allocation
                        .channels
                        .peer(channel, now)
                        .ok_or(DropReason::UnknownChannel),
                }
            }
            .and_then(|peer| {
                if !shared.peer_allowed(by_port, peer) {
                    Err(DropReason::ForbiddenPeer)
                } else if !allocation.permissions.allows(peer.ip(), now) {
                    Err(DropReason::NoPermission)
                } else if !allocation.to_peers.take(payload.len(), now) {
                    Err(DropReason::Quota)
                } else {
                    Ok(peer)
                }
            });
            match verdict {
                Ok(to) => {
                    allocation.last_activity = now;
                    self.to_peers.push(ToPeer {
                        slot: index,
                        fd: allocation.socket.as_raw_fd(),
                        datagram: i,
                        start: payload.as_ptr() as usize - datagram.as_ptr() as usize,
                        len: payload.len(),
                        to,
                    });
                }
                Err(reason) => {
                    allocation.traffic.drop(reason);
                    stats.traffic.drop(reason);
                }
            }
        }
        if self.to_peers.is_empty() {
            return;
        }
        // One sendmmsg per relayed socket; the stable sort keeps each flow in order.
        self.to_peers.sort_by_key(|p| p.slot);
        let mut outgoing: Vec<Outgoing<'_>> = Vec::with_capacity(self.to_peers.len());
        let mut run_start = 0;
        while run_start < self.to_peers.len() {
            let slot = self.to_peers[run_start].slot;
            let fd = self.to_peers[run_start].fd;
            let run_end = run_start
                + self.to_peers[run_start..]
                    .iter()
                    .take_while(|p| p.slot == slot)
                    .count();
            outgoing.clear();
            for p in &self.to_peers[run_start..run_end] {
                let (datagram, _) = self.recv.get(p.datagram);
                outgoing.push(Outgoing {
                    head: &[],
                    body: &datagram[p.start..p.start + p.len],
                    pad: 0,
                    to: p.to,
                });
            }
            let failed = &mut self.failed;
            failed[..outgoing.len()].fill(false);
            self.send.send(fd, &outgoing, |i| failed[i] = true);
            let allocation = slots[slot].allocation.as_mut().expect("live slot");
            for (k, p) in self.to_peers[run_start..run_end].iter().enumerate() {
                if self.failed[k] {
                    allocation.traffic.drop(DropReason::SendError);
                    stats.traffic.drop(DropReason::SendError);
                } else {
                    allocation.traffic.to_peer(p.len);
                    stats.traffic.to_peer(p.len);
                }
            }
            run_start = run_end;
        }
    }

    /// Drain one relayed socket: data from permitted peers goes to the client.
    fn drain_relayed(&mut self, token: u64) {
        let index = (token & 0xFFFF_FFFF) as usize;
        let generation = (token >> 32) as u32;
        for _ in 0..ROUNDS {
            let shared = &*self.shared;
            let mut guard = lock(&shared.state);
            let State {
                slots,
                by_port,
                stats,
                rng,
                ..
            } = &mut *guard;
            let Some(slot) = slots.get_mut(index) else {
                return;
            };
            if slot.generation != generation {
                return;
            }
            let Some(allocation) = slot.allocation.as_mut() else {
                return;
            };
            let n = self.recv.recv(&allocation.socket);
            if n == 0 {
                return;
            }
            let now = Instant::now();
            self.to_client.clear();
            for i in 0..n {
                let (datagram, from) = self.recv.get(i);
                stats.peer_datagrams += 1;
                stats.peer_bytes += datagram.len() as u64;
                let verdict = match from {
                    None => Err(DropReason::Malformed),
                    Some(from) if !allocation.permissions.allows(from.ip(), now) => {
                        Err(DropReason::NoPermission)
                    }
                    Some(from) if !shared.peer_allowed(by_port, from) => {
                        Err(DropReason::ForbiddenPeer)
                    }
                    Some(_) if !codec::fits_indication(datagram.len()) => {
                        Err(DropReason::SendError)
                    }
                    Some(_) if !allocation.to_client.take(datagram.len(), now) => {
                        Err(DropReason::Quota)
                    }
                    Some(from) => Ok(from),
                };
                let from = match verdict {
                    Ok(from) => from,
                    Err(reason) => {
                        allocation.traffic.drop(reason);
                        stats.traffic.drop(reason);
                        continue;
                    }
                };
                allocation.last_activity = now;
                let channel = allocation.channels.channel(from, now);
                if allocation.tcp {
                    let framed = match channel {
                        Some(channel) => codec::encode_channel_data(channel, datagram, true),
                        None => {
                            let t = rng.transaction_id();
                            codec::encode_data_indication(&t, from, datagram)
                        }
                    };
                    if shared.tcp.push(framed, allocation.client) {
                        stats.tcp_messages += 1;
                        allocation.traffic.to_client(datagram.len());
                        stats.traffic.to_client(datagram.len());
                    } else {
                        allocation.traffic.drop(DropReason::TcpQueueFull);
                        stats.traffic.drop(DropReason::TcpQueueFull);
                    }
                    continue;
                }
                let head = &mut self.heads[i];
                let (head_len, pad) = match channel {
                    Some(channel) => {
                        head[..4]
                            .copy_from_slice(&codec::channel_data_header(channel, datagram.len()));
                        (4, 0)
                    }
                    None => {
                        let t = rng.transaction_id();
                        let len = codec::data_indication_header(head, &t, from, datagram.len());
                        (len, codec::padding(datagram.len()))
                    }
                };
                self.to_client.push(ToClient {
                    datagram: i,
                    head_len,
                    pad,
                });
            }
            if !self.to_client.is_empty() {
                let client = allocation.client;
                let outgoing: Vec<Outgoing<'_>> = self
                    .to_client
                    .iter()
                    .map(|c| Outgoing {
                        head: &self.heads[c.datagram][..c.head_len],
                        body: self.recv.get(c.datagram).0,
                        pad: c.pad,
                        to: client,
                    })
                    .collect();
                let failed = &mut self.failed;
                failed[..outgoing.len()].fill(false);
                self.send
                    .send(self.client.as_raw_fd(), &outgoing, |i| failed[i] = true);
                for (k, c) in self.to_client.iter().enumerate() {
                    if self.failed[k] {
                        allocation.traffic.drop(DropReason::SendError);
                        stats.traffic.drop(DropReason::SendError);
                    } else {
                        let len = self.recv.get(c.datagram).0.len();
                        allocation.traffic.to_client(len);
                        stats.traffic.to_client(len);
                    }
                }
            }
            if n < self.recv.capacity() {
                return;
            }
        }
    }
}
