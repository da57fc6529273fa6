//! The Kademlia core (`kad`): `kad_key`, `kad_distance`, `KadRoutingTable` and `KadLookup`.
//!
//! Type conversion only. Peer IDs, addresses and keys are `bytes`; keys are 32 bytes; times are
//! non-negative integers of milliseconds on the caller's clock. Wrong key lengths, bad IP text and
//! negative numbers raise `ValueError` (never a panic).
//!
//! Both classes are ordinary (sendable) pyclasses: the cores are plain `Send + Sync` data, and
//! PyO3's per-object borrow flag serialises access, so a second thread calling into an object
//! while a call is running gets `RuntimeError: Already borrowed` instead of a data race. Calls
//! keep the GIL: each one is short (`closest` walks only the buckets that hold its answer).

use std::net::IpAddr;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use rand_core::OsRng;

use crate::kad::{
    Action, Entry, InsertOutcome, IpPrefix, Key, Lookup, LookupConfig, Peer, Refused, RoutingTable,
    TableConfig, KEY_BYTES,
};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(kad_key, m)?)?;
    m.add_function(wrap_pyfunction!(kad_distance, m)?)?;
    m.add_class::<KadRoutingTable>()?;
    m.add_class::<KadLookup>()?;
    Ok(())
}

// --- conversions ------------------------------------------------------------------------------

fn key32(data: &[u8], what: &str) -> PyResult<Key> {
    let bytes: [u8; KEY_BYTES] = data.try_into().map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a {KEY_BYTES}-byte Kademlia key (see kad_key), got {} bytes",
            data.len()
        ))
    })?;
    Ok(Key::from_hashed(bytes))
}

fn non_negative(value: i64, what: &str) -> PyResult<u64> {
    u64::try_from(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a non-negative integer, got {value}"
        ))
    })
}

fn count(value: i64, what: &str) -> PyResult<usize> {
    usize::try_from(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a non-negative integer, got {value}"
        ))
    })
}

fn ip_prefix(ip: Option<&str>) -> PyResult<Option<IpPrefix>> {
    ip.map(|text| {
        text.parse::<IpAddr>().map(IpPrefix::from_ip).map_err(|_| {
            PyValueError::new_err(format!(
                "ip must be an IPv4 or IPv6 address without port or brackets \
                 (e.g. '192.0.2.1', '2001:db8::1'), got {text:?}"
            ))
        })
    })
    .transpose()
}

/// A `list[bytes]` (any iterable of `bytes`).
fn byte_strings(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<Vec<u8>>> {
    if obj.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err(format!(
            "{what} must be a list of bytes, not bytes"
        )));
    }
    let mut out = Vec::with_capacity(obj.len().unwrap_or(0));
    for item in obj.try_iter()? {
        let item = item?;
        let bytes = item.cast::<PyBytes>().map_err(|_| {
            PyTypeError::new_err(format!(
                "{what} must be a list of bytes, found {}",
                item.get_type()
                    .name()
                    .map_or_else(|_| "?".to_string(), |n| n.to_string())
            ))
        })?;
        out.push(bytes.as_bytes().to_vec());
    }
    Ok(out)
}

/// A `list[tuple[bytes, list[bytes]]]` of (peer ID, addresses).
fn peers(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<Peer>> {
    let mut out = Vec::with_capacity(obj.len().unwrap_or(0));
    for item in obj.try_iter()? {
        let item = item?;
        let pair = item.cast::<PyTuple>().ok().filter(|t| t.len() == 2);
        let Some(pair) = pair else {
            return Err(PyTypeError::new_err(format!(
                "{what} must be a list of (peer_id: bytes, addrs: list[bytes]) tuples"
            )));
        };
        let peer_id = pair.get_item(0)?;
        let peer_id = peer_id
            .cast::<PyBytes>()
            .map_err(|_| PyTypeError::new_err(format!("{what}: a peer ID must be bytes")))?;
        let addrs = byte_strings(&pair.get_item(1)?, "a peer's addrs")?;
        out.push(Peer::new(peer_id.as_bytes().to_vec(), addrs));
    }
    Ok(out)
}

fn addr_list<'py>(py: Python<'py>, addrs: &[Vec<u8>]) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, addrs.iter().map(|a| PyBytes::new(py, a)))
}

/// `(peer_id, addrs)`.
fn peer_tuple<'py>(
    py: Python<'py>,
    peer_id: &[u8],
    addrs: &[Vec<u8>],
) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(
        py,
        [
            PyBytes::new(py, peer_id).into_any(),
            addr_list(py, addrs)?.into_any(),
        ],
    )
}

fn peer_tuples<'py, 'a>(
    py: Python<'py>,
    peers: impl IntoIterator<Item = (&'a [u8], &'a [Vec<u8>])>,
) -> PyResult<Bound<'py, PyList>> {
    let items = peers
        .into_iter()
        .map(|(id, addrs)| peer_tuple(py, id, addrs))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, items)
}

fn refusal(reason: &Refused) -> &'static str {
    match reason {
        Refused::LocalKey => "refused:local-key",
        Refused::BucketPrefixLimit { .. } => "refused:bucket-prefix-limit",
        Refused::TablePrefixLimit { .. } => "refused:table-prefix-limit",
        Refused::BucketFull => "refused:bucket-full",
    }
}

// --- keys -------------------------------------------------------------------------------------

/// SHA-256 of `data` (peer ID bytes or a record key): its 32-byte Kademlia key.
#[pyfunction]
fn kad_key<'py>(py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, Key::from_raw(data).as_bytes())
}

/// XOR distance of two 32-byte keys, as 32 big-endian bytes (compare as bytes: smaller is closer).
#[pyfunction]
fn kad_distance<'py>(py: Python<'py>, a: &[u8], b: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let (a, b) = (key32(a, "a")?, key32(b, "b")?);
    Ok(PyBytes::new(py, a.distance(&b).as_bytes()))
}

// --- routing table ----------------------------------------------------------------------------

/// The k-bucket routing table around the local peer (see `rust/src/kad/table.rs`).
#[pyclass(module = "teia._native", name = "KadRoutingTable")]
pub struct KadRoutingTable {
    inner: RoutingTable,
}

#[pymethods]
impl KadRoutingTable {
    #[new]
    #[pyo3(signature = (local_peer_id, *, k = 20, bucket_prefix_limit = 2, table_prefix_limit = 10, max_addrs = 16))]
    fn new(
        local_peer_id: &[u8],
        k: i64,
        bucket_prefix_limit: i64,
        table_prefix_limit: i64,
        max_addrs: i64,
    ) -> PyResult<Self> {
        let config = TableConfig {
            k: count(k, "k")?,
            max_per_prefix_per_bucket: count(bucket_prefix_limit, "bucket_prefix_limit")?,
            max_per_prefix: count(table_prefix_limit, "table_prefix_limit")?,
            max_addrs_per_entry: count(max_addrs, "max_addrs")?,
            ..TableConfig::default()
        };
        Ok(KadRoutingTable {
            inner: RoutingTable::new(Key::from_peer_id_bytes(local_peer_id), config),
        })
    }

    /// `("inserted" | "updated", None)`, `("pending", oldest_peer_id)` or
    /// `("refused:<reason>", None)`.
    #[pyo3(signature = (peer_id, addrs, now_ms, ip = None))]
    fn insert<'py>(
        &mut self,
        py: Python<'py>,
        peer_id: &[u8],
        addrs: &Bound<'py, PyAny>,
        now_ms: i64,
        ip: Option<&str>,
    ) -> PyResult<(&'static str, Option<Bound<'py, PyBytes>>)> {
        let now = non_negative(now_ms, "now_ms")?;
        let prefix = ip_prefix(ip)?;
        let addrs = byte_strings(addrs, "addrs")?;
        let entry = Entry::new(peer_id.to_vec(), addrs, now, prefix);
        Ok(match self.inner.insert(entry, now) {
            InsertOutcome::Inserted => ("inserted", None),
            InsertOutcome::Updated => ("updated", None),
            InsertOutcome::Pending { oldest_peer_id, .. } => {
                ("pending", Some(PyBytes::new(py, &oldest_peer_id)))
            }
            InsertOutcome::Refused(reason) => (refusal(&reason), None),
        })
    }

    /// The pinged entry answered: it stays (as most recently seen); its waiting candidate goes.
    fn ping_ok(&mut self, peer_id: &[u8], now_ms: i64) -> PyResult<bool> {
        let now = non_negative(now_ms, "now_ms")?;
        Ok(self.inner.ping_ok(&Key::from_peer_id_bytes(peer_id), now))
    }

    /// The pinged entry did not answer: evicted; returns the promoted candidate's peer ID.
    fn ping_failed<'py>(&mut self, py: Python<'py>, peer_id: &[u8]) -> Option<Bound<'py, PyBytes>> {
        let promoted = self
            .inner
            .ping_failed(&Key::from_peer_id_bytes(peer_id))
            .promoted?;
        let entry = self.inner.get(&promoted)?;
        Some(PyBytes::new(py, entry.peer_id()))
    }

    fn remove(&mut self, peer_id: &[u8]) -> bool {
        self.inner
            .remove(&Key::from_peer_id_bytes(peer_id))
            .is_some()
    }

    fn contains(&self, peer_id: &[u8]) -> bool {
        self.inner.contains(&Key::from_peer_id_bytes(peer_id))
    }

    /// `(addrs, last_seen_ms)`, or None if unknown.
    fn get<'py>(
        &self,
        py: Python<'py>,
        peer_id: &[u8],
    ) -> PyResult<Option<(Bound<'py, PyList>, u64)>> {
        self.inner
            .get(&Key::from_peer_id_bytes(peer_id))
            .map(|e| Ok((addr_list(py, e.addrs())?, e.last_seen_ms())))
            .transpose()
    }

    /// Up to `n` `(peer_id, addrs)` closest to the 32-byte `target_key`, nearest first.
    fn closest<'py>(
        &self,
        py: Python<'py>,
        target_key: &[u8],
        n: i64,
    ) -> PyResult<Bound<'py, PyList>> {
        let target = key32(target_key, "target_key")?;
        let n = count(n, "n")?;
        let found = self.inner.closest(&target, n);
        peer_tuples(py, found.into_iter().map(|e| (e.peer_id(), e.addrs())))
    }

    /// Every `(peer_id, addrs, last_seen_ms)`, bucket by bucket.
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let items = self
            .inner
            .iter()
            .map(|e| {
                PyTuple::new(
                    py,
                    [
                        PyBytes::new(py, e.peer_id()).into_any(),
                        addr_list(py, e.addrs())?.into_any(),
                        e.last_seen_ms().into_pyobject(py)?.into_any(),
                    ],
                )
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items)
    }

    /// A random 32-byte key in each bucket not refreshed for `max_age_ms`.
    fn refresh_targets<'py>(
        &self,
        py: Python<'py>,
        now_ms: i64,
        max_age_ms: i64,
    ) -> PyResult<Bound<'py, PyList>> {
        let now = non_negative(now_ms, "now_ms")?;
        let max_age = non_negative(max_age_ms, "max_age_ms")?;
        let targets = self.inner.refresh_targets(now, max_age, &mut OsRng);
        PyList::new(py, targets.iter().map(|k| PyBytes::new(py, k.as_bytes())))
    }

    /// A lookup for the 32-byte `target_key` ran at `now_ms`: its bucket is fresh.
    fn mark_refreshed(&mut self, target_key: &[u8], now_ms: i64) -> PyResult<()> {
        let target = key32(target_key, "target_key")?;
        let now = non_negative(now_ms, "now_ms")?;
        self.inner.mark_refreshed(&target, now);
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "KadRoutingTable(local_key={}, len={}, k={})",
            self.inner.local_key(),
            self.inner.len(),
            self.inner.config().k
        )
    }
}

// --- lookup -----------------------------------------------------------------------------------

/// One iterative FIND_NODE lookup, sans-IO (see `rust/src/kad/lookup.rs`).
#[pyclass(module = "teia._native", name = "KadLookup")]
pub struct KadLookup {
    inner: Lookup,
}

#[pymethods]
impl KadLookup {
    #[new]
    #[pyo3(signature = (target_key, seeds, *, local_peer_id = None, k = 20, alpha = 3, request_timeout_ms = 10_000, max_requests = 200))]
    fn new(
        target_key: &[u8],
        seeds: &Bound<'_, PyAny>,
        local_peer_id: Option<&[u8]>,
        k: i64,
        alpha: i64,
        request_timeout_ms: i64,
        max_requests: i64,
    ) -> PyResult<Self> {
        let target = key32(target_key, "target_key")?;
        let config = LookupConfig {
            k: count(k, "k")?,
            alpha: count(alpha, "alpha")?,
            request_timeout_ms: non_negative(request_timeout_ms, "request_timeout_ms")?,
            max_requests: count(max_requests, "max_requests")?,
            ..LookupConfig::default()
        };
        let seeds = peers(seeds, "seeds")?;
        let local = local_peer_id.map(Key::from_peer_id_bytes);
        Ok(KadLookup {
            inner: Lookup::new(target, local, seeds, config),
        })
    }

    /// `("send", (peer_id, addrs))`, `("wait", until_ms)` or `("done", None)`.
    fn poll<'py>(
        &mut self,
        py: Python<'py>,
        now_ms: i64,
    ) -> PyResult<(&'static str, Bound<'py, PyAny>)> {
        let now = non_negative(now_ms, "now_ms")?;
        Ok(match self.inner.poll(now) {
            Action::Send { peer } => (
                "send",
                peer_tuple(py, peer.peer_id(), peer.addrs())?.into_any(),
            ),
            Action::Wait { until } => ("wait", until.into_pyobject(py)?.into_any()),
            Action::Done => ("done", py.None().into_bound(py)),
        })
    }

    /// `peer_id` answered with `closer_peers`; False if the answer was ignored.
    fn on_response(&mut self, peer_id: &[u8], closer_peers: &Bound<'_, PyAny>) -> PyResult<bool> {
        let closer = peers(closer_peers, "closer_peers")?;
        Ok(self.inner.on_response(peer_id, closer))
    }

    /// The request to `peer_id` failed; False if none was outstanding.
    fn on_failure(&mut self, peer_id: &[u8]) -> bool {
        self.inner.on_failure(peer_id)
    }

    #[getter]
    fn is_done(&self) -> bool {
        self.inner.is_done()
    }

    /// The k closest peers that answered, nearest first.
    fn results<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let found = self.inner.results();
        peer_tuples(py, found.iter().map(|p| (p.peer_id(), p.addrs())))
    }

    /// Peer IDs that failed or timed out (without a late answer).
    fn unresponsive<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let peers = self.inner.unresponsive();
        PyList::new(py, peers.iter().map(|p| PyBytes::new(py, p.peer_id())))
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let dict = PyDict::new(py);
        dict.set_item("requests", s.requests)?;
        dict.set_item("responses", s.responses)?;
        dict.set_item("late_responses", s.late_responses)?;
        dict.set_item("failures", s.failures)?;
        dict.set_item("timeouts", s.timeouts)?;
        dict.set_item("ignored_responses", s.ignored_responses)?;
        Ok(dict)
    }

    fn __repr__(&self) -> String {
        format!(
            "KadLookup(target_key={}, done={}, requests={})",
            self.inner.target(),
            self.inner.is_done(),
            self.inner.stats().requests
        )
    }
}
