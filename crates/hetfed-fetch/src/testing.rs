//! A loopback HTTP mirror for tests: serves in-memory files on 127.0.0.1 with `Range` support,
//! counts requests, and can cut a connection part-way or delay a response. It stops when dropped,
//! and serves no connection after [`Mirror::LIFETIME`]; every connection has read and write
//! timeouts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One request the mirror received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The path without the leading `/`.
    pub path: String,
    /// The first byte asked for by a `Range: bytes=N-` header.
    pub range_start: Option<u64>,
}

#[derive(Default)]
struct State {
    files: BTreeMap<String, Vec<u8>>,
    requests: Vec<Request>,
    /// path → (bytes of the body sent before the cut, how many more responses to cut)
    cuts: BTreeMap<String, (usize, u32)>,
    delay: Duration,
    /// Paths whose responses ignore `Range` (always 200, the whole file).
    no_range: Vec<String>,
}

/// The mirror; see the module docs.
pub struct Mirror {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Mirror {
    /// The longest a mirror runs.
    pub const LIFETIME: Duration = Duration::from_secs(600);

    /// Starts a mirror on an ephemeral port of 127.0.0.1, serving nothing yet.
    pub fn start() -> std::io::Result<Mirror> {
        // A blocking accept (no polling delay per connection: a derived file can read thousands
        // of upstream files); `drop` wakes it with a connection of its own.
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            loop {
                let accepted = listener.accept();
                if sp.load(Ordering::SeqCst) || t0.elapsed() >= Self::LIFETIME {
                    break;
                }
                match accepted {
                    Ok((stream, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || {
                            let _ = serve(stream, &st);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Mirror { addr, state, stop, thread: Some(thread) })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `bytes` at `/path`.
    pub fn put(&self, path: &str, bytes: Vec<u8>) {
        self.state.lock().unwrap().files.insert(path.trim_start_matches('/').to_string(), bytes);
    }

    /// Stops serving `/path` (404).
    pub fn remove(&self, path: &str) {
        self.state.lock().unwrap().files.remove(path.trim_start_matches('/'));
    }

    /// Serves every file under `dir` at `/<prefix>/<relative path>` (no prefix when empty), except
    /// files for which `skip` holds (given the relative path).
    pub fn serve_dir(&self, prefix: &str, dir: &Path, skip: impl Fn(&str) -> bool) -> std::io::Result<usize> {
        let mut stack = vec![dir.to_path_buf()];
        let mut n = 0;
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let p = e?.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let rel = p.strip_prefix(dir).expect("under dir").to_string_lossy().replace('\\', "/");
                if skip(&rel) {
                    continue;
                }
                let key = if prefix.is_empty() { rel } else { format!("{}/{rel}", prefix.trim_matches('/')) };
                self.put(&key, std::fs::read(&p)?);
                n += 1;
            }
        }
        Ok(n)
    }

    /// The next `times` responses for `/path` send the headers and only `after` bytes of the body,
    /// then close the connection.
    pub fn cut(&self, path: &str, after: usize, times: u32) {
        self.state.lock().unwrap().cuts.insert(path.trim_start_matches('/').to_string(), (after, times));
    }

    /// Every response waits this long before its body (so concurrent clients overlap).
    pub fn delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    /// Responses for `/path` ignore `Range` headers (a server without range support).
    pub fn ignore_range(&self, path: &str) {
        self.state.lock().unwrap().no_range.push(path.trim_start_matches('/').to_string());
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// How many requests asked for `/path`.
    pub fn count(&self, path: &str) -> usize {
        let path = path.trim_start_matches('/');
        self.state.lock().unwrap().requests.iter().filter(|r| r.path == path).count()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept; should that fail, leave the thread rather than hang.
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).is_err() {
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
    let mut range_start = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                range_start =
                    v.trim().strip_prefix("bytes=").and_then(|r| r.split('-').next()).and_then(|s| s.parse().ok());
            }
        }
    }
    let (body, cut, delay, ranged) = {
        let mut s = state.lock().unwrap();
        s.requests.push(Request { path: path.clone(), range_start });
        let body = s.files.get(&path).cloned();
        let cut = match s.cuts.get_mut(&path) {
            Some((after, times)) if *times > 0 => {
                *times -= 1;
                Some(*after)
            }
            _ => None,
        };
        let ranged = !s.no_range.contains(&path);
        (body, cut, s.delay, ranged)
    };
    let mut out = stream;
    let Some(body) = body else {
        let msg = b"not found";
        write!(out, "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", msg.len())?;
        return out.write_all(msg);
    };
    std::thread::sleep(delay);
    let len = body.len() as u64;
    let (head, from) = match range_start.filter(|_| ranged) {
        Some(s) if s >= len => {
            return write!(out, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
        Some(s) => (
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{len}\r\nContent-Length: {}\r\n",
                len - 1,
                len - s
            ),
            s as usize,
        ),
        None => (format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n"), 0),
    };
    write!(out, "{head}Accept-Ranges: bytes\r\nConnection: close\r\n\r\n")?;
    let rest = &body[from..];
    match cut {
        Some(after) => {
            out.write_all(&rest[..after.min(rest.len())])?;
            out.flush()?;
            out.shutdown(std::net::Shutdown::Both)
        }
        None => out.write_all(rest),
    }
}
