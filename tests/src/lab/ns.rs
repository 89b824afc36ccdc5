//! Network namespace primitives: named namespaces under `/run/netns`, commands and long-running
//! processes started inside them with `nsenter --net=...`, and closures run on a thread that
//! joined a namespace.
//!
//! `ip netns exec` is deliberately not used: it unshares the mount namespace and remounts
//! `/sys`, which hides the host's bpffs (pins made there vanish). `nsenter --net` changes only the
//! network namespace. Every wait here is bounded.

use std::{
    ffi::OsStr,
    fs::File,
    io::{self, Read},
    os::{fd::AsRawFd, unix::fs::MetadataExt, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Mutex, OnceLock, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Directory holding the bind mounts of named network namespaces (what `ip netns` uses).
pub const NETNS_DIR: &str = "/run/netns";

/// Time limit of [`exec`] and of the `ip` / `ethtool` calls the lab makes.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the bind mount of the named namespace `ns`.
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Whether a named network namespace `ns` exists.
pub fn netns_exists(ns: &str) -> bool {
    netns_path(ns).exists()
}

/// Names of all named network namespaces, sorted.
pub fn list_netns() -> Result<Vec<String>> {
    let mut names = Vec::new();
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(e).context(format!("reading {NETNS_DIR}")),
    };
    for entry in dir {
        let entry = entry.with_context(|| format!("reading {NETNS_DIR}"))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Runs `cmd` to completion with a time limit, capturing stdout and stderr. The child is
/// killed when the limit passes. A non-zero exit is not an error here (see [`run_ok`]).
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = describe(cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting `{what}`"))?;
    let out_reader = pipe_reader(child.stdout.take());
    let err_reader = pipe_reader(child.stderr.take());
    let status = match wait_deadline(&mut child, timeout) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = wait_deadline(&mut child, Duration::from_secs(5));
            bail!("`{what}` did not finish within {timeout:?}; killed it");
        }
        Err(e) => return Err(e).with_context(|| format!("waiting for `{what}`")),
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output { status, stdout, stderr })
}

/// Like [`run`], but a non-zero exit status is an error that quotes the command's stderr.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = describe(cmd);
    let out = run(cmd, timeout)?;
    if !out.status.success() {
        bail!("`{what}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

fn pipe_reader<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Polls `child` until it exits or `timeout` passes (`Ok(None)`).
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// A `Command` that runs `argv` inside the network namespace `ns` (and only that namespace)
/// through `nsenter --net=/run/netns/NS`. nsenter execs the program, so the child's pid is the
/// program's pid.
pub fn ns_command<S: AsRef<OsStr>>(ns: &str, argv: &[S]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(ns).display())).arg("--");
    cmd.args(argv);
    cmd
}

/// Runs `argv` in namespace `ns` with [`DEFAULT_EXEC_TIMEOUT`]; a non-zero exit is an error
/// quoting stderr. Returns the output (stdout is usually what callers want).
pub fn exec<S: AsRef<OsStr>>(ns: &str, argv: &[S]) -> Result<Output> {
    exec_timeout(ns, argv, DEFAULT_EXEC_TIMEOUT)
}

/// [`exec`] with an explicit time limit.
pub fn exec_timeout<S: AsRef<OsStr>>(ns: &str, argv: &[S], timeout: Duration) -> Result<Output> {
    if !netns_exists(ns) {
        bail!("network namespace {ns} does not exist");
    }
    run_ok(&mut ns_command(ns, argv), timeout)
}

/// How [`spawn_with`] starts a process.
#[derive(Debug, Clone, Default)]
pub struct SpawnOpts {
    /// File receiving the process's stdout and stderr (created/truncated); `None` discards them.
    pub log: Option<PathBuf>,
    /// Leave the process running when the spawning thread exits (no `PR_SET_PDEATHSIG`). Used
    /// for labs that outlive the command creating them (`cargo xtask lab up --servers`).
    pub outlive_parent: bool,
}

/// Starts `argv` in namespace `ns`, output discarded. The returned guard kills it on drop; it
/// is also killed (SIGKILL) when this process exits, however it exits.
pub fn spawn<S: AsRef<OsStr>>(ns: &str, argv: &[S]) -> Result<Proc> {
    spawn_with(ns, argv, &SpawnOpts::default())
}

/// [`spawn`] with options (log file, lifetime).
pub fn spawn_with<S: AsRef<OsStr>>(ns: &str, argv: &[S], opts: &SpawnOpts) -> Result<Proc> {
    if !netns_exists(ns) {
        bail!("network namespace {ns} does not exist");
    }
    let mut cmd = ns_command(ns, argv);
    let label = describe(&cmd);
    cmd.stdin(Stdio::null());
    match &opts.log {
        Some(path) => {
            let file = File::create(path)
                .with_context(|| format!("creating log file {}", path.display()))?;
            let file2 = file.try_clone().context("duplicating log file handle")?;
            cmd.stdout(file).stderr(file2);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    if !opts.outlive_parent {
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = if opts.outlive_parent { cmd.spawn() } else { spawn_from_keeper(cmd) }
        .with_context(|| format!("starting `{label}`"))?;
    Ok(Proc { child: Some(child), label, log: opts.log.clone(), ns: ns.to_owned() })
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from one thread that lives as long as the process. `PR_SET_PDEATHSIG` fires
/// when the *thread* that forked the child exits, so children forked by a test's own thread
/// would die with that test even if a shared lab outlives it; forking from this keeper thread
/// ties them to the process instead.
fn spawn_from_keeper(cmd: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("lab-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the lab's spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the lab's spawner thread is gone"))?;
    reply_rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| io::Error::other("the lab's spawner thread did not answer within 30 s"))?
}

/// A process started in a namespace. Dropping the guard kills it (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    label: String,
    log: Option<PathBuf>,
    ns: String,
}

impl Proc {
    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Namespace the process runs in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The command line, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Log file holding stdout and stderr, if one was requested.
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The log file's contents (empty if there is none).
    pub fn log_text(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// `Some(status)` if the process has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().with_context(|| format!("checking `{}`", self.label)),
            None => bail!("`{}` was detached", self.label),
        }
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILLs. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        let Some(child) = self.child.as_mut() else { bail!("`{}` was detached", self.label) };
        if child.try_wait()?.is_none() {
            // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            if let Some(status) = wait_deadline(child, grace)? {
                return Ok(status);
            }
            let _ = child.kill();
        }
        wait_deadline(child, Duration::from_secs(10))?
            .with_context(|| format!("`{}` did not exit after SIGKILL", self.label))
    }

    /// Gives up ownership: the process keeps running after the guard is gone.
    pub fn detach(mut self) {
        self.child = None;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = wait_deadline(child, Duration::from_secs(5));
        }
    }
}

/// Runs `f` on a new thread that first joined the network namespace `ns` (`setns` with
/// `CLONE_NEWNET`); sockets created in `f` live in that namespace. Returns `f`'s result; a panic
/// in `f` is resumed on the caller's thread.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let file = File::open(netns_path(ns))
        .with_context(|| format!("opening network namespace {ns} ({NETNS_DIR}/{ns})"))?;
    thread::scope(|s| {
        let handle = s.spawn(move || -> io::Result<T> {
            // SAFETY: setns on this (fresh) thread only; the fd is valid for the call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            drop(file);
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r.with_context(|| format!("entering network namespace {ns}")),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Writes sysctls of namespace `ns` through `/proc/sys` from a thread inside it. Keys are
/// `/proc/sys`-relative paths such as `net/ipv4/ip_forward`.
pub fn sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    in_netns(ns, || -> Result<()> {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key);
            std::fs::write(&path, value)
                .with_context(|| format!("writing {value} to {} in {ns}", path.display()))?;
        }
        Ok(())
    })?
}

/// Creates the named network namespace `ns` (`ip netns add`).
pub fn add_netns(ns: &str) -> Result<()> {
    run_ok(Command::new("ip").args(["netns", "add", ns]), DEFAULT_EXEC_TIMEOUT)
        .map(drop)
        .with_context(|| format!("creating network namespace {ns}"))
}

/// Kills (SIGKILL) every process whose network namespace is `ns`, except this process, and
/// returns their pids. Processes in a namespace the caller created are the caller's.
pub fn kill_netns_processes(ns: &str) -> Result<Vec<u32>> {
    let meta = std::fs::metadata(netns_path(ns))
        .with_context(|| format!("stat of network namespace {ns}"))?;
    let me = std::process::id();
    let mut killed = Vec::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else { continue };
        if m.ino() == meta.ino() && m.dev() == meta.dev() {
            // SAFETY: plain kill(2).
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
                killed.push(pid);
            }
        }
    }
    // Bounded wait until they are gone, so the namespace really goes away.
    let deadline = Instant::now() + Duration::from_secs(5);
    while killed.iter().any(|p| Path::new(&format!("/proc/{p}/ns/net")).exists())
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
    Ok(killed)
}

/// Kills the processes inside `ns` and deletes it (`ip netns del`). Missing namespaces are fine.
pub fn del_netns(ns: &str) -> Result<()> {
    if !netns_exists(ns) {
        return Ok(());
    }
    kill_netns_processes(ns)?;
    run_ok(Command::new("ip").args(["netns", "del", ns]), DEFAULT_EXEC_TIMEOUT)
        .map(drop)
        .with_context(|| format!("deleting network namespace {ns}"))
}

/// Runs `ip -n NS ARGS...` (or plain `ip ARGS...` when `ns` is `None`), failing with stderr.
pub fn ip(ns: Option<&str>, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args);
    run_ok(&mut cmd, DEFAULT_EXEC_TIMEOUT).map(drop)
}
