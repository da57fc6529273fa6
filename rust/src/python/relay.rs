//! `RelayDataPlane` over `relay::DataPlane`: converts addresses, durations and errors only.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::relay::{Config, DataPlane, DropReason, RelayError};

/// The most datagrams one `recv_control` / `recv_relayed_for_tcp` call returns.
const MAX_BATCH: usize = 1024;

fn to_py(err: RelayError) -> PyErr {
    match err {
        RelayError::Io { ref source, .. } => match source.raw_os_error() {
            // OSError(errno, text) picks the matching subclass (ConnectionRefusedError, …).
            Some(errno) => PyOSError::new_err((errno, err.to_string())),
            None => PyOSError::new_err(err.to_string()),
        },
        other => PyValueError::new_err(other.to_string()),
    }
}

fn ip(text: &str, what: &str) -> PyResult<IpAddr> {
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse()
        .map_err(|_| PyValueError::new_err(format!("{what} {text:?} is not an IP address")))
}

fn port(value: i64, what: &str) -> PyResult<u16> {
    u16::try_from(value)
        .map_err(|_| PyValueError::new_err(format!("{what} {value} is not in 0-65535")))
}

fn addr(host: &str, port_number: i64, what: &str) -> PyResult<SocketAddr> {
    Ok(SocketAddr::new(
        ip(host, &format!("{what} host"))?,
        port(port_number, &format!("{what} port"))?,
    ))
}

fn non_negative(value: i64, what: &str) -> PyResult<u64> {
    u64::try_from(value)
        .map_err(|_| PyValueError::new_err(format!("{what} must be >= 0, not {value}")))
}

fn millis(value: i64, what: &str) -> PyResult<Duration> {
    non_negative(value, what).map(Duration::from_millis)
}

fn pair(a: SocketAddr) -> (String, u16) {
    (a.ip().to_string(), a.port())
}

fn datagrams<'py>(
    py: Python<'py>,
    items: Vec<(Vec<u8>, SocketAddr)>,
) -> Vec<(Bound<'py, PyBytes>, String, u16)> {
    items
        .into_iter()
        .map(|(data, from)| (PyBytes::new(py, &data), from.ip().to_string(), from.port()))
        .collect()
}

/// The TURN data plane: owns the client-facing UDP socket and the relayed sockets, and forwards
/// ChannelData, Send and Data indications on its own thread without the GIL.
#[pyclass(module = "teia._native", name = "RelayDataPlane", frozen)]
pub struct RelayDataPlane {
    inner: DataPlane,
}

#[pymethods]
impl RelayDataPlane {
    #[new]
    #[pyo3(signature = (host, port = 0, *, relay_ip = None, relay_port_min = 0, relay_port_max = 0, control_queue = 4096, own_ips = None, udp_gso = true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: &str,
        port: i64,
        relay_ip: Option<&str>,
        relay_port_min: i64,
        relay_port_max: i64,
        control_queue: i64,
        own_ips: Option<Vec<String>>,
        udp_gso: bool,
    ) -> PyResult<Self> {
        let mut config = Config::new(addr(host, port, "listening")?);
        config.relay_ip = relay_ip.map(|r| ip(r, "relay_ip")).transpose()?;
        config.own_ips = own_ips
            .map(|ips| ips.iter().map(|text| ip(text, "own_ips entry")).collect())
            .transpose()?;
        config.gso = udp_gso;
        config.relay_ports = (
            self::port(relay_port_min, "relay_port_min")?,
            self::port(relay_port_max, "relay_port_max")?,
        );
        config.control_queue = usize::try_from(control_queue)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                PyValueError::new_err(format!("control_queue must be > 0, not {control_queue}"))
            })?;
        let inner = py.detach(|| DataPlane::start(config)).map_err(to_py)?;
        Ok(RelayDataPlane { inner })
    }

    /// The bound client-facing port.
    #[getter]
    fn port(&self) -> u16 {
        self.inner.local_addr().port()
    }

    /// STUN messages for the control plane as ``(datagram, client_host, client_port)``.
    fn recv_control<'py>(
        &self,
        py: Python<'py>,
        timeout_ms: i64,
    ) -> PyResult<Vec<(Bound<'py, PyBytes>, String, u16)>> {
        let timeout = Duration::from_millis(timeout_ms.max(0) as u64);
        let items = py.detach(|| self.inner.recv_control(timeout, MAX_BATCH));
        Ok(datagrams(py, items))
    }

    /// Threads blocked in ``recv_control`` or ``recv_relayed_for_tcp`` now.
    fn waiting_receivers(&self) -> usize {
        self.inner.waiting_receivers()
    }

    /// Peer data for TCP-transport allocations, framed for the TCP stream (padded ChannelData
    /// or a Data indication), as ``(message, client_host, client_port)``.
    fn recv_relayed_for_tcp<'py>(
        &self,
        py: Python<'py>,
        timeout_ms: i64,
    ) -> PyResult<Vec<(Bound<'py, PyBytes>, String, u16)>> {
        let timeout = Duration::from_millis(timeout_ms.max(0) as u64);
        let items = py.detach(|| self.inner.recv_tcp(timeout, MAX_BATCH));
        Ok(datagrams(py, items))
    }

    /// Send a control-plane response to a client from the listening socket.
    fn send_to_client(&self, data: &[u8], host: &str, port: i64) -> PyResult<()> {
        self.inner
            .send_to_client(data, addr(host, port, "client")?)
            .map_err(to_py)
    }

    /// Open the relayed socket for a client; returns the relayed ``(ip, port)``.
    #[pyo3(signature = (client_host, client_port, *, bytes_per_second = 0, tcp = false))]
    fn allocate(
        &self,
        client_host: &str,
        client_port: i64,
        bytes_per_second: i64,
        tcp: bool,
    ) -> PyResult<(String, u16)> {
        let client = addr(client_host, client_port, "client")?;
        let rate = non_negative(bytes_per_second, "bytes_per_second")?;
        self.inner
            .allocate(client, rate, tcp)
            .map(pair)
            .map_err(to_py)
    }

    /// Close a client's relayed socket; False if it had none.
    fn release(&self, client_host: &str, client_port: i64) -> PyResult<bool> {
        Ok(self
            .inner
            .release(addr(client_host, client_port, "client")?))
    }

    /// Install or refresh the permission for ``peer_ip``; a zero lifetime removes it.
    fn add_permission(
        &self,
        client_host: &str,
        client_port: i64,
        peer_ip: &str,
        lifetime_ms: i64,
    ) -> PyResult<()> {
        self.inner
            .add_permission(
                addr(client_host, client_port, "client")?,
                ip(peer_ip, "peer_ip")?,
                millis(lifetime_ms, "lifetime_ms")?,
            )
            .map_err(to_py)
    }

    /// Bind or refresh a channel; installs or extends the peer IP's permission too.
    #[allow(clippy::too_many_arguments)]
    fn bind_channel(
        &self,
        client_host: &str,
        client_port: i64,
        channel: i64,
        peer_host: &str,
        peer_port: i64,
        lifetime_ms: i64,
    ) -> PyResult<()> {
        let number = u16::try_from(channel).map_err(|_| {
            PyValueError::new_err(format!("channel number {channel} is outside 0x4000-0x4fff"))
        })?;
        self.inner
            .bind_channel(
                addr(client_host, client_port, "client")?,
                number,
                addr(peer_host, peer_port, "peer")?,
                millis(lifetime_ms, "lifetime_ms")?,
            )
            .map_err(to_py)
    }

    /// Change an allocation's byte rate, each direction (0 = unlimited).
    fn set_quota(
        &self,
        client_host: &str,
        client_port: i64,
        bytes_per_second: i64,
    ) -> PyResult<()> {
        self.inner
            .set_quota(
                addr(client_host, client_port, "client")?,
                non_negative(bytes_per_second, "bytes_per_second")?,
            )
            .map_err(to_py)
    }

    /// Forward data from a client's relayed socket to a peer; False when dropped (counted).
    fn send_from_relay(
        &self,
        client_host: &str,
        client_port: i64,
        peer_host: &str,
        peer_port: i64,
        data: &[u8],
    ) -> PyResult<bool> {
        self.inner
            .send_from_relay(
                addr(client_host, client_port, "client")?,
                addr(peer_host, peer_port, "peer")?,
                data,
            )
            .map_err(to_py)
    }

    /// Per-allocation metadata.
    fn allocation_stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .allocation_stats()
            .into_iter()
            .map(|a| {
                let d = PyDict::new(py);
                d.set_item("client", pair(a.client))?;
                d.set_item("relayed", pair(a.relayed))?;
                d.set_item("tcp", a.tcp)?;
                d.set_item("bytes_per_second", a.bytes_per_second)?;
                d.set_item("permissions", a.permissions)?;
                d.set_item("channels", a.channels)?;
                d.set_item("packets_to_peers", a.traffic.packets_to_peers)?;
                d.set_item("bytes_to_peers", a.traffic.bytes_to_peers)?;
                d.set_item("packets_to_client", a.traffic.packets_to_client)?;
                d.set_item("bytes_to_client", a.traffic.bytes_to_client)?;
                let drops = PyDict::new(py);
                for reason in DropReason::ALL {
                    drops.set_item(reason.name(), a.traffic.dropped(reason))?;
                }
                d.set_item("drops", drops)?;
                d.set_item("created_ms", a.created_ms)?;
                d.set_item("last_activity_ms", a.last_activity_ms)?;
                Ok(d)
            })
            .collect()
    }

    /// Global counters.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, value) in self.inner.stats().entries() {
            d.set_item(name, value)?;
        }
        Ok(d)
    }

    /// Stop the worker and close every socket; idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.close());
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RelayDataPlane>()?;
    Ok(())
}
