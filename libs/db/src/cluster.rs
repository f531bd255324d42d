//! A private PostgreSQL cluster run from the server binaries: the local
//! platform starts one when no server answers, and tests that must restart
//! PostgreSQL run their own so that other tests are not disturbed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A cluster under a folder of its own.
pub struct PrivateCluster {
    bin: PathBuf,
    data: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    port: u16,
    run_as: Option<String>,
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Whether this process runs as root (initdb and postgres refuse to).
pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PrivateCluster {
    /// A cluster with its data under `base/data`, listening on
    /// `127.0.0.1:port`; created (`initdb`, trust authentication, user
    /// `postgres`) when `base` holds none. Under root the server runs as the
    /// `postgres` account.
    pub fn prepare(base: &Path, port: u16, install: bool) -> anyhow::Result<Self> {
        let bin = server_binaries(install)?;
        let data = base.join("data");
        let socket = base.join("socket");
        std::fs::create_dir_all(&socket)?;
        let run_as = is_root().then(|| "postgres".to_owned());
        if let Some(user) = &run_as {
            let status = Command::new("chown").args(["-R", user, path_str(base)]).status()?;
            anyhow::ensure!(status.success(), "chown {} failed (does the `{user}` account exist?)", base.display());
        }
        let cluster = PrivateCluster { log: base.join("server.log"), bin, data, socket, port, run_as };
        if !cluster.data.join("PG_VERSION").exists() {
            cluster.run(
                "initdb",
                &[
                    "-D",
                    path_str(&cluster.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
            )?;
        }
        Ok(cluster)
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(program);
        let output = match &self.run_as {
            Some(user) => Command::new("runuser").args(["-u", user, "--"]).arg(&program).args(args).output()?,
            None => Command::new(&program).args(args).output()?,
        };
        anyhow::ensure!(
            output.status.success(),
            "{} exited with {}: {}",
            program.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }

    /// The superuser URL.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.data.join("postmaster.pid").exists() && self.run("pg_ctl", &["-D", path_str(&self.data), "status"]).is_ok()
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> anyhow::Result<()> {
        let options =
            format!("-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on", self.port, path_str(&self.socket));
        self.run(
            "pg_ctl",
            &["-D", path_str(&self.data), "-o", &options, "-l", path_str(&self.log), "-w", "-t", "60", "start"],
        )
        .map_err(|e| e.context(format!("pg_ctl start (see {})", self.log.display())))
    }

    /// Stops the server (`fast`: open transactions are rolled back).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.run("pg_ctl", &["-D", path_str(&self.data), "-m", "fast", "-w", "stop"])
    }

    /// The server log, for error messages.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin`, installed with apt when
/// missing, `install` is set and we are root.
pub fn server_binaries(install: bool) -> anyhow::Result<PathBuf> {
    fn find() -> Option<PathBuf> {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
            .collect();
        versions.sort();
        versions.pop()
    }
    if let Some(bin) = find() {
        return Ok(bin);
    }
    if !install || !is_root() {
        anyhow::bail!("PostgreSQL server binaries are missing: install the `postgresql` package, or set SOCLE_PG_URL");
    }
    println!("installing PostgreSQL with apt-get");
    let ok = Command::new("apt-get").arg("update").status()?.success()
        && Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "postgresql"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?
            .success();
    anyhow::ensure!(ok, "apt-get install postgresql failed");
    find().ok_or_else(|| anyhow::anyhow!("postgresql installed but initdb/pg_ctl not found under /usr/lib/postgresql"))
}
