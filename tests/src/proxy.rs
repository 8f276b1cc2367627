//! A fault-injecting TCP proxy for chaos tests.
//!
//! Chaos tests put a [`Proxy`] on every link they want to break (coordinator
//! to participant, client to coordinator, participant to coordinator): the
//! component under test is given the proxy's address instead of the real one,
//! and the test cuts, delays or redirects the link while traffic flows.
//!
//! Everything happens on loopback: a proxy only ever binds a 127.0.0.1 (or
//! other loopback) address, and [`Proxy::start_on`] rejects anything else.
//!
//! Guarantees:
//! - bytes are forwarded unchanged and in order in each direction, one
//!   upstream connection per accepted client connection (the upstream is the
//!   one set when the client was accepted);
//! - [`ProxyControl::cut`] closes every open connection, on both sides, as
//!   soon as the runtime runs their tasks (no I/O is waited for), and while
//!   cut every new connection is accepted and immediately dropped, so a
//!   client sees a connection that closes (end of file or reset) rather than
//!   a refused connect;
//! - [`ProxyControl::set_delay`] holds each chunk for the delay after it was
//!   read, per direction: latency is added, but chunks are not serialised on
//!   the delay (throughput is bounded only by the per-direction queue);
//! - dropping the [`Proxy`] stops accepting and closes every connection.
//!
//! Caveats:
//! - a cut closes connections with an ordinary close (FIN), or a reset if
//!   unread data was pending; it is not a silent black hole (packets dropped
//!   with the connection left open), which only a timeout would detect;
//! - a delay applies to chunks read after it was set; chunks already queued
//!   keep their deadline, and a shorter delay never reorders a direction;
//! - "chunks" are whatever one read returned, so message boundaries are not
//!   preserved (TCP never guarantees them anyway);
//! - the socket is released asynchronously when a proxy is dropped; use
//!   [`Proxy::stop`] to wait for it, and [`Proxy::start_on`] retries briefly
//!   while the port is still in use.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Size of one read.
const CHUNK: usize = 16 * 1024;
/// Chunks queued per direction before the reader waits for the writer.
const QUEUE: usize = 256;
/// How long [`Proxy::start_on`] retries while its address is still in use.
const REBIND_FOR: Duration = Duration::from_secs(5);

/// Cut state, published to every connection task.
#[derive(Clone, Copy, Debug, Default)]
struct CutState {
    /// Bumped by every cut; a connection accepted in an older generation
    /// closes.
    generation: u64,
    /// Whether new connections are refused.
    cut: bool,
}

/// State shared by the accept loop, connection tasks and control handles.
#[derive(Debug)]
struct Shared {
    addr: SocketAddr,
    state: watch::Sender<CutState>,
    upstream: Mutex<SocketAddr>,
    delay_nanos: AtomicU64,
    connections: AtomicU64,
    open: AtomicU64,
    bytes: AtomicU64,
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(Ordering::Relaxed))
    }

    fn upstream(&self) -> SocketAddr {
        *self.upstream.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A cloneable handle to a [`Proxy`]'s fault controls and counters.
///
/// Handles may outlive the proxy; their calls then have no effect.
#[derive(Clone, Debug)]
pub struct ProxyControl {
    shared: Arc<Shared>,
}

impl ProxyControl {
    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The proxy's address as an `http://` URL, for gRPC clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Closes every open connection (both sides) and refuses new ones
    /// (accepted, then dropped at once) until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.shared.state.send_modify(|s| {
            s.generation += 1;
            s.cut = true;
        });
    }

    /// Accepts connections again and removes any delay.
    pub fn heal(&self) {
        self.shared.delay_nanos.store(0, Ordering::Relaxed);
        self.shared.state.send_modify(|s| s.cut = false);
    }

    /// Whether the proxy is currently cut.
    pub fn is_cut(&self) -> bool {
        self.shared.state.borrow().cut
    }

    /// Holds every chunk read from now on, in either direction, for `delay`
    /// before writing it. `Duration::ZERO` removes the delay.
    pub fn set_delay(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_nanos.store(nanos, Ordering::Relaxed);
    }

    /// The current delay.
    pub fn delay(&self) -> Duration {
        self.shared.delay()
    }

    /// Sends connections accepted from now on to `upstream`; open ones keep
    /// their upstream.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().unwrap_or_else(PoisonError::into_inner) = upstream;
    }

    /// The upstream new connections go to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream()
    }

    /// Connections accepted so far, including those refused while cut.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Connections currently being forwarded (or connecting upstream).
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Bytes forwarded so far, both directions together.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }
}

/// A fault-injecting TCP proxy on a loopback port; see the [module
/// documentation](crate::proxy).
///
/// Dropping it stops accepting and closes every connection. Its controls are
/// available directly or through a cloneable [`ProxyControl`] from
/// [`control`](Self::control).
#[derive(Debug)]
pub struct Proxy {
    control: ProxyControl,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1, on a port chosen by the system,
    /// forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        Self::serve(listener, upstream)
    }

    /// Starts a proxy on `listen`, which must be a loopback address (for
    /// example the address of a proxy being brought back on the same port),
    /// forwarding to `upstream`.
    ///
    /// While `listen` is still in use (a previous proxy on it being torn
    /// down), binding is retried for a few seconds.
    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Proxy> {
        if !listen.ip().is_loopback() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("proxy must listen on loopback, not {listen}")));
        }
        let listener = crate::poll_for(REBIND_FOR, || async {
            match TcpListener::bind(listen).await {
                Ok(l) => Ok(Ok(l)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(e.to_string()),
                Err(e) => Ok(Err(e)),
            }
        })
        .await
        .map_err(|last| io::Error::new(io::ErrorKind::AddrInUse, last))??;
        Self::serve(listener, upstream)
    }

    fn serve(listener: TcpListener, upstream: SocketAddr) -> io::Result<Proxy> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            addr,
            state: watch::Sender::new(CutState::default()),
            upstream: Mutex::new(upstream),
            delay_nanos: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        tracing::debug!(%addr, %upstream, "proxy started");
        Ok(Proxy { control: ProxyControl { shared }, task: Some(task) })
    }

    /// A cloneable handle to the controls, for other tasks.
    pub fn control(&self) -> ProxyControl {
        self.control.clone()
    }

    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.control.addr()
    }

    /// The proxy's address as an `http://` URL, for gRPC clients.
    pub fn url(&self) -> String {
        self.control.url()
    }

    /// See [`ProxyControl::cut`].
    pub fn cut(&self) {
        self.control.cut();
    }

    /// See [`ProxyControl::heal`].
    pub fn heal(&self) {
        self.control.heal();
    }

    /// See [`ProxyControl::is_cut`].
    pub fn is_cut(&self) -> bool {
        self.control.is_cut()
    }

    /// See [`ProxyControl::set_delay`].
    pub fn set_delay(&self, delay: Duration) {
        self.control.set_delay(delay);
    }

    /// See [`ProxyControl::delay`].
    pub fn delay(&self) -> Duration {
        self.control.delay()
    }

    /// See [`ProxyControl::set_upstream`].
    pub fn set_upstream(&self, upstream: SocketAddr) {
        self.control.set_upstream(upstream);
    }

    /// See [`ProxyControl::upstream`].
    pub fn upstream(&self) -> SocketAddr {
        self.control.upstream()
    }

    /// See [`ProxyControl::connections`].
    pub fn connections(&self) -> u64 {
        self.control.connections()
    }

    /// See [`ProxyControl::open_connections`].
    pub fn open_connections(&self) -> u64 {
        self.control.open_connections()
    }

    /// See [`ProxyControl::bytes`].
    pub fn bytes(&self) -> u64 {
        self.control.bytes()
    }

    /// Stops the proxy and waits until its listening socket and every
    /// connection are closed, so that its port can be bound again at once.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Cancelled (or, impossibly, panicked): either way it is gone,
            // and with it the listener and the set of connection tasks.
            let _ = task.await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // The accept loop owns the listener and a `JoinSet` of the
            // connection tasks: aborting it drops both, which aborts them.
            task.abort();
        }
    }
}

/// Accepts connections until aborted; owns every connection task.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    let state = *shared.state.borrow();
                    if state.cut {
                        tracing::debug!(proxy = %shared.addr, %peer, "cut: refusing connection");
                        drop(client);
                        continue;
                    }
                    conns.spawn(connection(shared.clone(), client, state.generation));
                }
                Err(e) => {
                    // Typically out of file descriptors: back off rather than spin.
                    tracing::warn!(proxy = %shared.addr, error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            // Reap finished connections (disabled while there are none).
            Some(_) = conns.join_next() => {}
        }
    }
}

/// Counts an open connection for as long as it lives.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(shared.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Forwards one client connection until either side closes, an error, or a
/// cut of a later generation than `generation`.
async fn connection(shared: Arc<Shared>, client: TcpStream, generation: u64) {
    let _open = OpenGuard::new(&shared);
    let mut state = shared.state.subscribe();
    // `wait_for` checks the current value first, so a cut between accepting
    // and subscribing is not missed. An error (sender gone) cannot happen
    // while `shared` is alive, and would mean the proxy is gone anyway.
    let cut = async move {
        let _ = state.wait_for(|s| s.generation != generation).await;
    };
    tokio::select! {
        biased;
        () = cut => tracing::debug!(proxy = %shared.addr, "cut: connection closed"),
        result = pump(&shared, client) => {
            if let Err(e) = result {
                tracing::debug!(proxy = %shared.addr, error = %e, "proxied connection ended");
            }
        }
    }
    // Returning drops both sockets: the connection is closed on both sides.
}

/// Connects upstream and copies both directions until both are done.
async fn pump(shared: &Shared, client: TcpStream) -> io::Result<()> {
    let server = TcpStream::connect(shared.upstream()).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    tokio::try_join!(direction(shared, client_r, server_w), direction(shared, server_r, client_w))?;
    Ok(())
}

/// Copies one direction: a reader timestamps chunks with their release time
/// and queues them, a writer writes each at its time, then half-closes.
async fn direction<R, W>(shared: &Shared, mut reader: R, mut writer: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let read = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            let release = Instant::now() + shared.delay();
            if tx.send((release, buf[..n].to_vec())).await.is_err() {
                // The writer is gone (only after an error, reported there).
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((release, chunk)) = rx.recv().await {
            tokio::time::sleep_until(release).await;
            writer.write_all(&chunk).await?;
            shared.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        // End of file from the reader: pass the half-close on.
        writer.shutdown().await
    };
    tokio::try_join!(read, write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventually;

    /// Deadline for anything that should happen promptly.
    const PROMPT: Duration = Duration::from_secs(2);

    /// An echo server on 127.0.0.1:0 that first sends `tag` on every
    /// connection (so tests can tell upstreams apart), then echoes.
    async fn echo_server(tag: u8) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo server");
        let addr = listener.local_addr().expect("echo server address");
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut s, _)) = listener.accept().await {
                conns.spawn(async move {
                    if s.write_all(&[tag]).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, task)
    }

    /// Connects through `proxy` and returns the stream and the upstream's tag.
    async fn connect(proxy: &Proxy) -> (TcpStream, u8) {
        let mut s = tokio::time::timeout(PROMPT, TcpStream::connect(proxy.addr())).await.expect("connect in time").expect("connect");
        let mut tag = [0u8; 1];
        tokio::time::timeout(PROMPT, s.read_exact(&mut tag)).await.expect("tag in time").expect("read tag");
        (s, tag[0])
    }

    /// Sends `msg` and reads its echo.
    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(PROMPT, s.read_exact(&mut back)).await.expect("echo in time").expect("read echo");
        back
    }

    /// Asserts the connection is closed: a read returns end of file or an
    /// error before the deadline (data still in flight is skipped).
    async fn assert_closed(s: &mut TcpStream) {
        let closed = async {
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        };
        tokio::time::timeout(PROMPT, closed).await.expect("connection closed in time");
    }

    #[tokio::test]
    async fn bytes_pass_through_and_are_counted() {
        let (up, server) = echo_server(b'A').await;
        let proxy = Proxy::start(up).await.expect("start proxy");
        assert!(proxy.addr().ip().is_loopback());
        assert_eq!(proxy.url(), format!("http://{}", proxy.addr()));

        let (mut s, tag) = connect(&proxy).await;
        assert_eq!(tag, b'A');
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = s.split();
        let ((), echoed) = tokio::join!(
            async {
                w.write_all(&big).await.expect("write");
            },
            async {
                let mut back = vec![0u8; big.len()];
                tokio::time::timeout(PROMPT, r.read_exact(&mut back)).await.expect("echo in time").expect("read echo");
                back
            }
        );
        assert_eq!(echoed, big);
        assert_eq!(round_trip(&mut s, b"ping").await, b"ping");

        assert_eq!(proxy.connections(), 1);
        let expected = 1 + 2 * (big.len() as u64 + 4);
        let ctl = proxy.control();
        eventually("all bytes counted", PROMPT, || {
            let ctl = ctl.clone();
            async move { ctl.bytes() == expected }
        })
        .await;
        server.abort();
    }

    #[tokio::test]
    async fn cut_closes_and_refuses_then_heal_restores() {
        let (up, server) = echo_server(b'A').await;
        let proxy = Proxy::start(up).await.expect("start proxy");
        let (mut s, _) = connect(&proxy).await;
        assert_eq!(round_trip(&mut s, b"before").await, b"before");
        assert_eq!(proxy.open_connections(), 1);

        // Cut from another task, through a control handle.
        let ctl = proxy.control();
        tokio::spawn(async move { ctl.cut() }).await.expect("cut task");
        assert!(proxy.is_cut());
        assert_closed(&mut s).await;
        let ctl = proxy.control();
        eventually("connection gone", PROMPT, || {
            let ctl = ctl.clone();
            async move { ctl.open_connections() == 0 }
        })
        .await;

        // While cut: new connections are accepted then dropped, no data passes.
        let mut s2 = TcpStream::connect(proxy.addr()).await.expect("connect while cut");
        let _ = s2.write_all(b"lost").await;
        let mut buf = [0u8; 16];
        // End of file or a reset: either way, refused.
        if let Ok(n) = tokio::time::timeout(PROMPT, s2.read(&mut buf)).await.expect("closed in time") {
            assert_eq!(n, 0, "no data while cut");
        }
        assert_eq!(proxy.connections(), 2);

        proxy.heal();
        assert!(!proxy.is_cut());
        let (mut s3, tag) = connect(&proxy).await;
        assert_eq!(tag, b'A');
        assert_eq!(round_trip(&mut s3, b"after").await, b"after");
        server.abort();
    }

    #[tokio::test]
    async fn delay_adds_latency_each_way() {
        let (up, server) = echo_server(b'A').await;
        let proxy = Proxy::start(up).await.expect("start proxy");
        let (mut s, _) = connect(&proxy).await;
        let delay = Duration::from_millis(100);
        proxy.set_delay(delay);
        assert_eq!(proxy.delay(), delay);

        let started = std::time::Instant::now();
        assert_eq!(round_trip(&mut s, b"slow").await, b"slow");
        let took = started.elapsed();
        // Held once each way; lower bound only.
        assert!(took >= 2 * delay, "round trip took {took:?}, expected at least {:?}", 2 * delay);

        proxy.heal();
        assert_eq!(proxy.delay(), Duration::ZERO);
        assert_eq!(round_trip(&mut s, b"fast").await, b"fast");
        server.abort();
    }

    #[tokio::test]
    async fn set_upstream_switches_new_connections() {
        let (a, server_a) = echo_server(b'A').await;
        let (b, server_b) = echo_server(b'B').await;
        let proxy = Proxy::start(a).await.expect("start proxy");
        let (mut s1, tag) = connect(&proxy).await;
        assert_eq!(tag, b'A');

        proxy.set_upstream(b);
        assert_eq!(proxy.upstream(), b);
        let (mut s2, tag) = connect(&proxy).await;
        assert_eq!(tag, b'B');
        assert_eq!(round_trip(&mut s2, b"to b").await, b"to b");
        // The open connection keeps its upstream.
        assert_eq!(round_trip(&mut s1, b"to a").await, b"to a");
        server_a.abort();
        server_b.abort();
    }

    #[tokio::test]
    async fn failed_upstream_connect_closes_client() {
        // A port that was just free: nothing listens there.
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("address")
        };
        let proxy = Proxy::start(dead).await.expect("start proxy");
        let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
        assert_closed(&mut s).await;
    }

    #[tokio::test]
    async fn drop_closes_and_start_on_reuses_the_port() {
        let (up, server) = echo_server(b'A').await;
        let proxy = Proxy::start(up).await.expect("start proxy");
        let addr = proxy.addr();
        let (mut s, _) = connect(&proxy).await;
        drop(proxy);
        assert_closed(&mut s).await;

        let proxy = Proxy::start_on(addr, up).await.expect("restart on the same port");
        assert_eq!(proxy.addr(), addr);
        let (mut s, _) = connect(&proxy).await;
        assert_eq!(round_trip(&mut s, b"again").await, b"again");
        proxy.stop().await;
        let proxy = Proxy::start_on(addr, up).await.expect("restart after stop");
        assert_eq!(proxy.addr(), addr);

        let not_loopback: SocketAddr = "0.0.0.0:0".parse().expect("address");
        let err = Proxy::start_on(not_loopback, up).await.expect_err("non-loopback refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        server.abort();
    }
}
