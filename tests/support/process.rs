//! Child processes for the process-level tests: the built runnel binary and its peers.
//!
//! Every child is started with a cleared environment plus `PATH` and the variables the
//! test names, so nothing from the developer's shell (a stray `RUNNEL_*` variable, which
//! runnel rejects) changes what is tested. Invariant: a child never outlives the value
//! that owns it; `Drop` kills and reaps it, so a failing test leaves nothing running.
//! Output lines are collected by background threads; tests wait for a line with a
//! deadline (woken by each new line, never by a fixed sleep), and a test that panics
//! gets the child's last lines printed.

use std::{
    ffi::OsStr,
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long runnel may take from spawn to its "listening" line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A started child process, killed on drop.
pub struct Process {
    name: String,
    child: Child,
    output: Arc<Output>,
    status: Option<ExitStatus>,
}

/// The built runnel binary, started by a test.
pub struct Runnel {
    process: Process,
}

/// What runnel's "listening" log line says.
#[derive(Clone, Copy, Debug)]
pub struct Listening {
    pub listen: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

/// How a process that ran to its end finished.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Process {
    /// Starts `command` with stdin closed and stdout and stderr captured by line.
    pub fn spawn(name: &str, command: Command) -> Process {
        let (process, stdout) = Process::start(name, command);
        collect(stdout, Stream::Stdout, process.output.clone());
        process
    }

    /// Starts `command` with stdin closed and stderr captured by line; the caller reads
    /// stdout (a download) itself.
    pub fn spawn_raw_stdout(name: &str, command: Command) -> (Process, ChildStdout) {
        let (process, stdout) = Process::start(name, command);
        process
            .output
            .state
            .lock()
            .expect("output lock")
            .stdout_closed = true;
        (process, stdout)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.output
            .state
            .lock()
            .expect("output lock")
            .stderr
            .clone()
    }

    /// The stdout lines so far.
    pub fn stdout(&self) -> Vec<String> {
        self.output
            .state
            .lock()
            .expect("output lock")
            .stdout
            .clone()
    }

    /// Waits until a stderr line satisfies `found` and returns it; `None` when the
    /// deadline passes or the child closes stderr first.
    pub fn wait_for_stderr(
        &self,
        timeout: Duration,
        mut found: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        let mut state = self.output.state.lock().expect("output lock");
        loop {
            if let Some(line) = state.stderr[seen..].iter().find(|line| found(line)) {
                return Some(line.clone());
            }
            seen = state.stderr.len();
            let now = Instant::now();
            if state.stderr_closed || now >= deadline {
                return None;
            }
            state = self.output.wait(state, deadline);
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`) with the `kill` command, so the
    /// tests need no `unsafe` and no libc.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap_or_else(|e| panic!("kill -{signal} {}: {e}", self.name));
        assert!(
            status.success(),
            "kill -{signal} {} ({}) failed: {status}",
            self.name,
            self.pid()
        );
    }

    /// The exit status, if the child has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("{}: wait: {e}", self.name));
        }
        self.status
    }

    /// Waits for the child to exit, polling until `timeout`; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// Waits for the exit and for both streams to be read to their end.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = self
            .wait_exit(timeout)
            .unwrap_or_else(|| panic!("{} still running after {timeout:?}", self.name));
        let mut state = self.output.state.lock().expect("output lock");
        while !(state.stdout_closed && state.stderr_closed) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "{}: output still open after exit",
                self.name
            );
            state = self.output.wait(state, deadline);
        }
        Finished {
            status,
            stdout: state.stdout.clone(),
            stderr: state.stderr.clone(),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            let state = self.output.state.lock().unwrap_or_else(|e| e.into_inner());
            let tail = state.stderr.len().saturating_sub(TAIL);
            eprintln!(
                "--- {} (pid {}) stderr, last {} lines:",
                self.name,
                self.child.id(),
                TAIL
            );
            for line in &state.stderr[tail..] {
                eprintln!("{line}");
            }
            eprintln!("--- end of {} stderr", self.name);
        }
    }
}

impl Runnel {
    /// Starts the runnel binary with `args` and only `PATH` plus `vars` in its environment.
    pub fn spawn(args: &[&str], vars: &[(&str, &str)]) -> Runnel {
        Runnel {
            process: Process::spawn("runnel", runnel_command(args, vars)),
        }
    }

    /// Starts `runnel` (serve) and waits for its "listening" line.
    pub fn serve(vars: &[(&str, &str)]) -> (Runnel, Listening) {
        let runnel = Runnel::spawn(&[], vars);
        let listening = runnel.listening(START_TIMEOUT);
        (runnel, listening)
    }

    /// Waits for the JSON log line whose message is "listening" and reads its addresses;
    /// panics, with what runnel printed, if it does not come before `timeout`.
    pub fn listening(&self, timeout: Duration) -> Listening {
        let line = self.wait_for_stderr(timeout, |line| {
            serde_json::from_str::<Value>(line)
                .is_ok_and(|v| field(&v, "message").and_then(Value::as_str) == Some("listening"))
        });
        let Some(line) = line else {
            panic!(
                "runnel did not log \"listening\" within {timeout:?}; stderr:\n{}",
                self.stderr().join("\n")
            );
        };
        let v: Value = serde_json::from_str(&line).expect("checked above");
        let addr = |key: &str| -> Option<SocketAddr> {
            let text = field(&v, key)?.as_str()?;
            Some(
                text.parse()
                    .unwrap_or_else(|e| panic!("{key} {text:?} in {line}: {e}")),
            )
        };
        let listen = addr("listen.addr").unwrap_or_else(|| panic!("no listen.addr in {line}"));
        Listening {
            listen,
            metrics: addr("metrics.addr"),
        }
    }
}

impl Deref for Runnel {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Runnel {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// The command that starts the built runnel binary with a cleared environment.
pub fn runnel_command(args: &[&str], vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_runnel"));
    command.args(args);
    clean_env(&mut command, vars);
    command
}

/// Runs runnel to its end (a start-up failure, `check`), within `timeout`.
pub fn run_to_exit(args: &[&str], vars: &[(&str, &str)], timeout: Duration) -> Finished {
    Runnel::spawn(args, vars).process.finish(timeout)
}

/// Clears `command`'s environment, then sets `PATH` (as the test runs with) and `vars`.
pub fn clean_env<K: AsRef<OsStr>, V: AsRef<OsStr>>(command: &mut Command, vars: &[(K, V)]) {
    command.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    for (key, value) in vars {
        command.env(key, value);
    }
}

/// Finds a peer program: the path in `$var` if set, else `name` on `PATH`. When it is
/// missing, a CI run (`CI=true`) fails; elsewhere the test prints a loud note and the
/// caller returns early.
pub fn peer(var: &str, name: &str) -> Option<PathBuf> {
    let found = match std::env::var_os(var) {
        Some(path) => Some(PathBuf::from(path)).filter(|p| p.is_file()),
        None => on_path(name),
    };
    if found.is_none() {
        missing_peer(&format!(
            "{name} (set {var}, or put {name} on PATH; `bash tests/run.sh` installs it)"
        ));
    }
    found
}

/// Reports a missing peer: a panic under `CI=true`, a loud note otherwise.
pub fn missing_peer(what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("peer missing under CI=true: {what}");
    }
    eprintln!(
        "\n!!! SKIPPED: peer missing: {what}\n!!! run `bash tests/run.sh` to install the peers\n"
    );
}

/// One HTTP/1.1 GET to `addr` (metrics, Envoy's admin API), on a connection closed
/// after it: the status and the body (de-chunked). Envoy refuses HTTP/1.0.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("not an HTTP response: {head:?}")))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_owned()));
    }
    let mut rest = body;
    let mut decoded = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| invalid(format!("bad chunk in {body:?}")))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16)
            .map_err(|e| invalid(format!("bad chunk size {size:?}: {e}")))?;
        if size == 0 {
            return Ok((status, decoded));
        }
        let chunk = after
            .get(..size)
            .ok_or_else(|| invalid(format!("short chunk in {body:?}")))?;
        decoded.push_str(chunk);
        rest = after[size..].strip_prefix("\r\n").unwrap_or(&after[size..]);
    }
}

/// A directory under the system temporary directory, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("runnel-test-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A field of a JSON log line: at the top level (flattened events) or under `fields`
/// or `span`, as tracing-subscriber lays them out.
pub fn field<'a>(line: &'a Value, key: &str) -> Option<&'a Value> {
    line.get(key)
        .or_else(|| line.get("fields").and_then(|f| f.get(key)))
        .or_else(|| line.get("span").and_then(|s| s.get(key)))
}

const POLL: Duration = Duration::from_millis(10);
const TAIL: usize = 40;

#[derive(Default)]
struct Output {
    state: Mutex<Lines>,
    changed: Condvar,
}

impl Output {
    /// Waits for a change to the output, or until `deadline`.
    fn wait<'a>(&self, state: MutexGuard<'a, Lines>, deadline: Instant) -> MutexGuard<'a, Lines> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.changed
            .wait_timeout(state, left)
            .expect("output lock")
            .0
    }
}

#[derive(Default)]
struct Lines {
    stdout: Vec<String>,
    stderr: Vec<String>,
    stdout_closed: bool,
    stderr_closed: bool,
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

impl Process {
    fn start(name: &str, mut command: Command) -> (Process, ChildStdout) {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {command:?}: {e}"));
        let output = Arc::new(Output::default());
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        collect(stderr, Stream::Stderr, output.clone());
        (
            Process {
                name: name.to_owned(),
                child,
                output,
                status: None,
            },
            stdout,
        )
    }
}

fn collect(pipe: impl Read + Send + 'static, stream: Stream, output: Arc<Output>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        // Lines are read as bytes so a stray non-UTF-8 byte cannot end the capture.
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            buf.clear();
            let mut state = output.state.lock().expect("output lock");
            match stream {
                Stream::Stdout => state.stdout.push(line),
                Stream::Stderr => state.stderr.push(line),
            }
            output.changed.notify_all();
        }
        let mut state = output.state.lock().expect("output lock");
        match stream {
            Stream::Stdout => state.stdout_closed = true,
            Stream::Stderr => state.stderr_closed = true,
        }
        output.changed.notify_all();
    });
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
