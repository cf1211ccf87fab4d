"""A throwaway one-machine "cluster" for the cluster-launcher end-to-end test.

``ray up`` / ``ray submit`` / ``ray down`` with the local provider talk to the head over
ssh, even when the head is this machine. This harness makes that possible without
touching anything of the user's:

* an ssh key pair and a host key generated into a temp dir;
* Debian's sshd bound to 127.0.0.1 on a free port, key-only login for the current user,
  no PAM, its own pid file and log (``apt-get install -y openssh-server rsync
  netcat-openbsd``); the launcher reaches that port through ``ssh_proxy_command: nc``
  because the cluster YAML's ``auth`` section has no port field;
* sshd's ``SetEnv HOME=<temp home>`` gives every remote session a throwaway home. Ray runs
  each remote command as ``bash --login -c -i 'source ~/.bashrc; ...'``, so the temp
  home's ``.bashrc`` puts the project's venv first on PATH and exports the test's
  environment. The user's own ``~/.bashrc`` is never read or written, and everything
  Ray's launcher puts in ``~`` (``ray_bootstrap_config.yaml``, the bootstrap key,
  ``~/.ray/auth_token``, the file_mounts copy of the project) lands in the temp home;
* ``RAY_TMPDIR`` (set for the local CLI and in the remote environment) moves Ray's session
  dir and the local provider's ``cluster-<name>.state`` file into the temp dir;
* where ``unshare`` works (root on Linux), sshd runs as the init of a new PID namespace
  with its own /proc. Every Ray process that the cluster starts lives in that namespace,
  so the ``ray stop`` that ``ray up`` and ``ray down`` run on the head only sees (and only
  stops) this cluster's processes, and killing sshd at teardown takes down anything left.
  Without ``unshare`` the harness still works, but ``ray stop`` on the head then stops
  every Ray process on the host: do not run it next to other Ray tests;
* the project is mounted from a snapshot made with the config's own rsync rules
  (``snapshot_project``), so the launcher's file-mount hash skips ``.venv/``;
* free ports for the head (GCS, dashboard, dashboard agent, Ray client server) are
  substituted into ``head_start_ray_commands`` of a rendered copy of the committed
  config; each substitution is checked, so the committed file is what runs.

Used by ``tests/test_cluster_e2e.py``; usable by hand::

    with LocalCluster(REPO / "sweeps/cluster-local.yaml", workdir) as c:
        c.up(); c.submit("sweeps/temperature.py", "--preset", "smoke"); c.down()
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SSHD = "/usr/sbin/sshd"

# Flags of `ray start --head` in the committed local config that bind a fixed port.
PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
)


def missing_tools() -> list[str]:
    """Executables the harness needs that this machine lacks (empty when ready)."""
    need = {SSHD: Path(SSHD).exists()}
    for tool in ("ssh", "ssh-keygen", "rsync", "nc"):
        need[tool] = shutil.which(tool) is not None
    return [name for name, ok in need.items() if not ok]


def unshare_works() -> bool:
    """True when this process may create a PID namespace with its own /proc."""
    if shutil.which("unshare") is None:
        return False
    try:
        proc = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"],
            capture_output=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def free_port(avoid: set[int] = frozenset(), low: int = 20000, high: int = 60000) -> int:
    """A TCP port free on 127.0.0.1 right now, outside Ray's worker range 10002-19999."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if low <= port < high and port not in avoid:
            return port
    raise RuntimeError("no free port found")


def render_local_config(
    source: Path,
    dest: Path,
    *,
    cluster_name: str,
    ssh_user: str,
    ssh_private_key: Path,
    ssh_port: int,
    project_dir: Path,
    ports: dict[str, int],
) -> dict:
    """Write a copy of the committed local-provider config with this machine's values.

    Changes only the fields that the config documents as "change me": the cluster name,
    ``auth`` (user, key, and a proxy command for the non-standard ssh port), the
    project's file mount, and the fixed ports of ``head_start_ray_commands``.
    """
    config = yaml.safe_load(source.read_text())
    config["cluster_name"] = cluster_name
    config["auth"] = {
        "ssh_user": ssh_user,
        "ssh_private_key": str(ssh_private_key),
        "ssh_proxy_command": f"nc 127.0.0.1 {ssh_port}",
    }
    mounts = config.get("file_mounts") or {}
    assert "~/kd" in mounts, f"{source}: expected a file mount of the project at ~/kd"
    mounts["~/kd"] = str(project_dir)
    config["file_mounts"] = mounts

    commands = []
    seen = set()
    for command in config["head_start_ray_commands"]:
        for flag, port in ports.items():
            pattern = re.compile(rf"({re.escape(flag)}=)\d+")
            command, n = pattern.subn(rf"\g<1>{port}", command)
            if n:
                seen.add(flag)
        commands.append(command)
    missing = set(ports) - seen
    assert not missing, f"{source}: head_start_ray_commands lack {sorted(missing)}"
    config["head_start_ray_commands"] = commands
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def snapshot_project(config_path: Path, project_dir: Path, dest: Path) -> None:
    """Copy the project as the config's file mount would: its rsync excludes and filters.

    The launcher hashes every file under a file mount's local path (``.venv/`` and
    ``.git/`` included: its hash ignores ``rsync_exclude``), which for a checkout with
    its venv inside costs ~15 s per ``ray up`` here. Mounting this snapshot instead
    keeps the hash to the files that are actually synced.
    """
    config = yaml.safe_load(Path(config_path).read_text())
    rules = [f"--exclude={p}" for p in config.get("rsync_exclude") or []]
    rules += [f"--filter=dir-merge,- {f}" for f in config.get("rsync_filter") or []]
    subprocess.run(["rsync", "-a", *rules, f"{project_dir}/", f"{dest}/"], check=True)


class LocalCluster:
    """sshd on 127.0.0.1 plus a rendered local-provider config; see the module doc."""

    def __init__(
        self,
        config: Path,
        workdir: Path | None = None,
        *,
        env: dict[str, str] | None = None,
        project_dir: Path = REPO,
        venv_bin: Path | None = None,
        isolate: bool | None = None,
        log=print,
    ):
        self.source_config = Path(config)
        # Unix socket paths (Ray's session dir, ssh control sockets) must stay short.
        self.root = Path(tempfile.mkdtemp(prefix="kdc-", dir="/tmp"))
        self.workdir = Path(workdir) if workdir else self.root  # logs go here
        self.project_dir = Path(project_dir)
        self.venv_bin = Path(venv_bin) if venv_bin else Path(sys.executable).parent
        self.remote_env = dict(env or {})
        self.isolate = unshare_works() if isolate is None else isolate
        self.log = log
        self.user = getpass.getuser()
        self.cluster_name = f"kd-e2e-{uuid.uuid4().hex[:8]}"
        self.home = self.root / "home"
        self.ray_tmp = self.root / "rt"
        self.key = self.root / "id_ed25519"
        self.config = self.root / "cluster-local.yaml"
        self.sshd_proc: subprocess.Popen | None = None
        self.ssh_port = 0
        self.ports: dict[str, int] = {}
        self.timings: dict[str, float] = {}

    # -- lifecycle --------------------------------------------------------------------
    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"missing tools: {missing} (apt-get install -y "
                               "openssh-server openssh-client rsync netcat-openbsd)")
        self.home.mkdir()
        self.ray_tmp.mkdir()
        self._keys()
        self._bashrc()
        used: set[int] = set()
        self.ssh_port = free_port(used)
        used.add(self.ssh_port)
        for flag in PORT_FLAGS:
            self.ports[flag] = free_port(used)
            used.add(self.ports[flag])
        self._start_sshd()
        snapshot = self.root / "project"
        snapshot_project(self.source_config, self.project_dir, snapshot)
        render_local_config(
            self.source_config, self.config,
            cluster_name=self.cluster_name, ssh_user=self.user,
            ssh_private_key=self.key, ssh_port=self.ssh_port,
            project_dir=snapshot, ports=self.ports,
        )

    def _keys(self) -> None:
        for name in ("id_ed25519", "host_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"kd-e2e-{name}",
                 "-f", str(self.root / name)],
                check=True,
            )
        (self.root / "authorized_keys").write_text(
            (self.root / "id_ed25519.pub").read_text())
        os.chmod(self.root / "authorized_keys", 0o600)

    def _bashrc(self) -> None:
        """The temp home's .bashrc: the venv first on PATH, then the test's env."""
        env = {
            "RAY_TMPDIR": str(self.ray_tmp),
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            **self.remote_env,
        }
        lines = [
            "# Written by tests/cluster_harness.py for one test run; deleted with it.",
            f"export PATH={_q(str(self.venv_bin))}:$PATH",
            *(f"export {k}={_q(v)}" for k, v in env.items()),
            f"cd {_q(str(self.home))}",
        ]
        (self.home / ".bashrc").write_text("\n".join(lines) + "\n")

    def _start_sshd(self) -> None:
        mkdir_run = Path("/run/sshd")
        if os.geteuid() == 0 and not mkdir_run.exists():
            mkdir_run.mkdir(parents=True, exist_ok=True)  # privilege-separation dir
        cfg = self.root / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.ssh_port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.root / 'host_ed25519'}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            f"AllowUsers {self.user}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the temp dir sits under world-writable /tmp
            "PrintMotd no",
            "PrintLastLog no",
            "MaxSessions 64",
            "MaxStartups 64",
            f"SetEnv HOME={self.home}",
            "Subsystem sftp internal-sftp",
            "",
        ]))
        cmd = [SSHD, "-D", "-e", "-f", str(cfg)]
        if self.isolate:
            cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] + cmd
        self.sshd_log = open(self.root / "sshd.log", "wb")
        self.sshd_proc = subprocess.Popen(
            cmd, stdout=self.sshd_log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            probe = subprocess.run(self._ssh_cmd("echo $HOME"), capture_output=True,
                                   text=True, timeout=30)
            if probe.returncode == 0:
                assert probe.stdout.strip() == str(self.home), probe.stdout
                return
            if self.sshd_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"sshd did not come up: {probe.stderr}\n"
                    f"{(self.root / 'sshd.log').read_text(errors='replace')}")
            time.sleep(0.3)

    def _ssh_cmd(self, remote: str) -> list[str]:
        return [
            "ssh", "-i", str(self.key), "-p", str(self.ssh_port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            f"{self.user}@127.0.0.1", remote,
        ]

    def ssh(self, remote: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a command on the head the way Ray's launcher does (login shell + bashrc)."""
        wrapped = f"bash --login -c -i {_q('source ~/.bashrc; ' + remote)}"
        return subprocess.run(self._ssh_cmd(wrapped), capture_output=True, text=True,
                              timeout=timeout)

    # -- the launcher -----------------------------------------------------------------
    def local_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # TMPDIR: the launcher's config cache (ray-config-<hash>) lands in the temp dir.
        env.update(RAY_TMPDIR=str(self.ray_tmp), TMPDIR=str(self.root),
                   RAY_USAGE_STATS_ENABLED="0")
        return env

    def ray(self, *args: str, timeout: float = 900, check: bool = True):
        """Run the local `ray` CLI of this venv against the rendered config."""
        cmd = [str(self.venv_bin / "ray"), *args]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=self.project_dir, env=self.local_env(),
                              capture_output=True, text=True, timeout=timeout)
        self.timings[args[0]] = self.timings.get(args[0], 0.0) + time.monotonic() - t0
        out = proc.stdout + proc.stderr
        with (self.workdir / f"ray-{args[0]}.log").open("a") as f:  # kept after close()
            f.write(out)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`ray {' '.join(args)}` failed ({proc.returncode}):\n"
                               f"{out[-6000:]}")
        return proc

    def up(self):
        return self.ray("up", "-y", "--no-config-cache", str(self.config))

    def submit(self, script: str | Path, *script_args: str, timeout: float = 900):
        return self.ray("submit", "--no-config-cache", str(self.config), str(script),
                        "--", *script_args, timeout=timeout)

    def down(self):
        return self.ray("down", "-y", str(self.config), timeout=300)

    # -- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        """Stop sshd (and with it the PID namespace), kill strays, remove the temp dir."""
        if self.sshd_proc is not None and self.sshd_proc.poll() is None:
            try:
                os.killpg(self.sshd_proc.pid, signal.SIGTERM)
                self.sshd_proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.sshd_proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if getattr(self, "sshd_log", None):
            self.sshd_log.close()
        self._kill_strays()
        # The launcher's ssh ControlMaster sockets: /tmp/ray_ssh_<user>/<cluster hash>.
        digest = hashlib.sha256(self.cluster_name.encode()).hexdigest()[:10]
        for control_dir in Path("/tmp").glob(f"ray_ssh_*/{digest}"):
            shutil.rmtree(control_dir, ignore_errors=True)
            try:
                control_dir.parent.rmdir()  # only if no other cluster uses it
            except OSError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def stray_pids(self) -> list[int]:
        """Processes whose command line names this harness's temp dir (Ray's own)."""
        mine = str(self.root)
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if mine.encode() in cmdline:
                pids.append(int(entry.name))
        return pids

    def _kill_strays(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.stray_pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)


def _q(s: str) -> str:
    import shlex

    return shlex.quote(s)
