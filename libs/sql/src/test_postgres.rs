//! A throwaway PostgreSQL server for tests: `initdb` in a temp dir and
//! `postgres` on a free loopback port, stopped on drop. PostgreSQL refuses
//! to run as root, so as root both run as the `postgres` user (through
//! `setpriv`, which execs rather than forks, so the child is the server).
//!
//! The server binaries come from `INFERMESH_PG_BIN` or the newest
//! `/usr/lib/postgresql/*/bin` (Debian's postgresql-15 package).

// Test support: a server that cannot start is a failed test, said loudly.
#![allow(clippy::expect_used, clippy::panic)]

pub use tempfile;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestPostgres {
    server: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TestPostgres {
    /// Starts a server; panics with what is missing when it cannot.
    pub fn start() -> TestPostgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new().prefix("infermesh-pg-").tempdir().expect("temp dir for postgres");
        let as_root = running_as_root();
        if as_root {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status();
            assert!(status.is_ok_and(|s| s.success()), "chown of the postgres data dir to the postgres user");
        }
        let data = dir.path().join("data");
        let initdb = run_as(as_root, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .output()
            .expect("running initdb");
        assert!(initdb.status.success(), "initdb failed: {}", String::from_utf8_lossy(&initdb.stderr));
        let port = free_port();
        let server = run_as(as_root, &bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(dir.path())
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting postgres");
        let mut postgres = TestPostgres { server, port, _dir: dir };
        postgres.wait_ready(&bin, as_root);
        postgres
    }

    /// A URL for a fresh, empty database on this server.
    pub fn fresh_database(&self) -> String {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!("test_{}_{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let created = Command::new(bin_dir().join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", &name])
            .output()
            .expect("running createdb");
        assert!(created.status.success(), "createdb failed: {}", String::from_utf8_lossy(&created.stderr));
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    fn wait_ready(&mut self, bin: &Path, as_root: bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.server.try_wait() {
                panic!("postgres exited during startup: {status}");
            }
            let ready = run_as(as_root, &bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "postgres did not accept connections within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // SIGINT is postgres's "fast shutdown"; a kill is the fallback.
        let stopped = Command::new("kill").args(["-INT", &self.server.id().to_string()]).status();
        if stopped.is_err() || self.server.wait().is_err() {
            let _ = self.server.kill();
        }
    }
}

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("INFERMESH_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|dir| dir.join("initdb").exists());
    versions.sort_by_key(|dir| dir.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()).unwrap_or(0));
    versions.pop().expect(
        "PostgreSQL server binaries not found: install Debian's postgresql-15 (scripts/setup.sh does) \
         or set INFERMESH_PG_BIN",
    )
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

fn run_as(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut command = Command::new("setpriv");
        command.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Test cases that each take a database URL (`async fn case(url: String)`),
/// run on SQLite (a test per case, in a temp dir) and on PostgreSQL (one
/// test: one throwaway server, a fresh database per case). Invoke it inside
/// the tests module that defines the cases.
#[macro_export]
macro_rules! on_sqlite_and_postgres {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let dir = $crate::test_postgres::tempfile::tempdir().unwrap();
                    super::$case(format!("sqlite://{}", dir.path().join("store.db").display())).await;
                }
            )*
        }

        #[tokio::test]
        async fn every_case_on_postgres() {
            let server = $crate::test_postgres::TestPostgres::start();
            $(
                eprintln!("postgres: {}", stringify!($case));
                $case(server.fresh_database()).await;
            )*
        }
    };
}
