//! Counters: metadata only (counts, bytes, times), never content.

/// Why a datagram was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not STUN or ChannelData, truncated, bad framing, bad indication.
    Malformed,
    /// ChannelData or a Send indication from a client with no allocation (over UDP).
    NoAllocation,
    /// ChannelData on a channel that is not bound, or whose binding expired.
    UnknownChannel,
    /// To or from a peer IP without a live permission.
    NoPermission,
    /// To or from the relay's own listening address (a forwarding loop), or one of its own
    /// addresses at a port that is not a live relayed allocation.
    ForbiddenPeer,
    /// Over the allocation's byte rate.
    Quota,
    /// The control-plane queue was full.
    ControlQueueFull,
    /// The queue of peer data for TCP-transport clients was full.
    TcpQueueFull,
    /// The kernel refused to send (full socket buffer, unreachable, too large).
    SendError,
}

impl DropReason {
    pub const COUNT: usize = 9;
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::Malformed,
        DropReason::NoAllocation,
        DropReason::UnknownChannel,
        DropReason::NoPermission,
        DropReason::ForbiddenPeer,
        DropReason::Quota,
        DropReason::ControlQueueFull,
        DropReason::TcpQueueFull,
        DropReason::SendError,
    ];

    /// The name in stats dictionaries and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NoAllocation => "no_allocation",
            DropReason::UnknownChannel => "unknown_channel",
            DropReason::NoPermission => "no_permission",
            DropReason::ForbiddenPeer => "forbidden_peer",
            DropReason::Quota => "quota",
            DropReason::ControlQueueFull => "control_queue_full",
            DropReason::TcpQueueFull => "tcp_queue_full",
            DropReason::SendError => "send_error",
        }
    }
}

/// Forwarded traffic and drops, for one allocation or the whole data plane. Bytes are payload
/// bytes (without ChannelData or indication framing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Client → peer datagrams sent from the relayed socket.
    pub packets_to_peers: u64,
    pub bytes_to_peers: u64,
    /// Peer → client datagrams delivered (as ChannelData or Data indications).
    pub packets_to_client: u64,
    pub bytes_to_client: u64,
    pub drops: [u64; DropReason::COUNT],
}

impl Traffic {
    #[inline]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    #[inline]
    pub fn to_peer(&mut self, bytes: usize) {
        self.packets_to_peers += 1;
        self.bytes_to_peers += bytes as u64;
    }

    #[inline]
    pub fn to_client(&mut self, bytes: usize) {
        self.packets_to_client += 1;
        self.bytes_to_client += bytes as u64;
    }
}

/// Counters of the whole data plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GlobalStats {
    /// Everything received on the client-facing socket.
    pub client_datagrams: u64,
    pub client_bytes: u64,
    /// Everything received on relayed sockets.
    pub peer_datagrams: u64,
    pub peer_bytes: u64,
    /// STUN messages handed to the control plane.
    pub control_messages: u64,
    /// Peer data queued for TCP-transport clients.
    pub tcp_messages: u64,
    /// Replies the control plane sent through [`super::DataPlane::send_to_client`].
    pub control_replies: u64,
    pub allocations: u64,
    pub allocations_created: u64,
    pub allocations_released: u64,
    pub traffic: Traffic,
}

impl GlobalStats {
    /// Flat `(name, value)` pairs: the Python `stats()` dictionary and metric names.
    pub fn entries(&self) -> Vec<(String, u64)> {
        let t = &self.traffic;
        let mut out: Vec<(String, u64)> = [
            ("client_datagrams", self.client_datagrams),
            ("client_bytes", self.client_bytes),
            ("peer_datagrams", self.peer_datagrams),
            ("peer_bytes", self.peer_bytes),
            ("control_messages", self.control_messages),
            ("control_replies", self.control_replies),
            ("tcp_messages", self.tcp_messages),
            ("allocations", self.allocations),
            ("allocations_created", self.allocations_created),
            ("allocations_released", self.allocations_released),
            ("packets_to_peers", t.packets_to_peers),
            ("bytes_to_peers", t.bytes_to_peers),
            ("packets_to_clients", t.packets_to_client),
            ("bytes_to_clients", t.bytes_to_client),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let mut total = 0;
        for reason in DropReason::ALL {
            total += t.dropped(reason);
            out.push((format!("dropped_{}", reason.name()), t.dropped(reason)));
        }
        out.push(("dropped".to_owned(), total));
        out
    }
}
