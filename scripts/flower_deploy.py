#!/usr/bin/env python3
"""fedng on Flower's deployment engine over loopback, with TLS and SuperNode authentication.

    python scripts/flower_deploy.py --nodes 3 --rounds 3 [--kill-node-after-round 1] [--keep DIR]

1. Generates, for this run only, a CA, a server certificate for 127.0.0.1, and one EC P-384 key
   per SuperNode (plus one that is never registered).
2. Starts a SuperLink on 127.0.0.1 with TLS, SuperNode authentication and no runtime dependency
   installation; registers the SuperNodes' public keys with `flwr supernode register`.
3. Starts the N registered SuperNodes (node i serves partition-id i) and the unregistered one,
   which must be refused.
4. Runs examples/flower-digits with `flwr run`, polls `flwr ls --format json` until the run is
   finished (`flwr run` exits 0 even when a run fails), optionally kills one SuperNode once a
   round has completed.
5. Stops every process it started, by process group and then by PID (every process whose
   environment carries this run's tag), also on failure or Ctrl-C.

Prints a JSON report: status, wall times, whether the unregistered node was refused, the history
and the path of the final model. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

try:  # flwr's own dependency; the script needs the flower extra anyway
    import flwr
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
except ImportError as _err:
    sys.exit(
        f"flower_deploy.py needs Flower 1.41 (Python >= 3.11): pip install 'fedng[flower]' ({_err})"
    )

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower-digits"
HOST = "127.0.0.1"
CONNECTION = "fedng"
TAG = "FEDNG_FLOWER_DEPLOY_TAG"
BIN = Path(sys.executable).parent


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it, valid for one day.

    Returns:
        (CA certificate, server certificate, server key) paths (PEM).
    """
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedng deploy CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return (
        _pem(folder / "ca.crt", ca.public_bytes(pem)),
        _pem(folder / "server.pem", cert.public_bytes(pem)),
        _pem(
            folder / "server.key",
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        ),
    )


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC P-384 key pair in OpenSSH format: (private key, public key) paths."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return _pem(folder / name, priv), _pem(folder / f"{name}.pub", pub)


def free_port() -> int:
    """A port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], limit: float) -> None:
    """Waits until 127.0.0.1:`port` accepts connections (or `proc` dies / `limit` s pass)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r:.80} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {limit} s")


class Processes:
    """Every process this run starts: each in its own process group, all tagged in their
    environment so that children that leave the group are found (and stopped) by PID too."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.env = env
        self.tag = env[TAG]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.folder,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, grace: float = 5.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds."""
        proc = self.procs[name]
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        with _quiet():
            os.killpg(proc.pid, signal.SIGKILL)  # children left in the group

    def tagged(self) -> list[int]:
        """PIDs of live processes carrying this run's tag (the processes and their children)."""
        found = []
        needle = f"{TAG}={self.tag}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return sorted(found)

    def stop_all(self) -> list[int]:
        """Stops everything; returns the PIDs still alive afterwards (should be none)."""
        for name in reversed(list(self.procs)):
            self.stop(name)
        for _ in range(20):
            left = self.tagged()
            if not left:
                return []
            for pid in left:
                with _quiet():
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.25)
        return self.tagged()


def _quiet() -> suppress:
    """Ignores a process that is already gone (or not ours to signal)."""
    return suppress(ProcessLookupError, PermissionError)


def flwr(
    env: dict[str, str], *args: str, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Runs the `flwr` CLI of this environment."""
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def flwr_json(env: dict[str, str], *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """`flwr ... --format json`, parsed; raises with the CLI's output when it is not JSON."""
    res = flwr(env, *args, "--format", "json", timeout=timeout)
    try:
        out: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(
            f"flwr {' '.join(args)}: {res.stdout[-800:]}{res.stderr[-800:]}"
        ) from None
    return out


def run_status(env: dict[str, str], run_id: int) -> dict[str, Any]:
    """The run's entry of `flwr ls --run-id ID --format json`."""
    out = flwr_json(env, "ls", CONNECTION, "--run-id", str(run_id))
    runs = out.get("runs") or []
    return dict(runs[0]) if runs else {}


def _env(workdir: Path) -> dict[str, str]:
    """The environment of every process of a run: its own FLWR_HOME, no telemetry, one thread,
    this environment's bin first (flower-superexec), and the run's tag."""
    return {
        **os.environ,
        "FLWR_HOME": str(workdir / "flwr_home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec & co.
        TAG: uuid.uuid4().hex,
    }


def connect(env: dict[str, str], port: int, security: str) -> None:
    """Writes the `flwr` CLI's connection to the run's SuperLink ($FLWR_HOME/config.toml)."""
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{HOST}:{port}"\n{security}\n'
    )


def wait_run(
    env: dict[str, str], run_id: int, limit: float, tick: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Polls `flwr ls` until the run is finished (or `limit` s); calls `tick` every second."""
    deadline = time.monotonic() + limit
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = run_status(env, run_id)
        if str(status.get("status", "")).startswith("finished"):
            break
        if tick is not None:
            tick()
        time.sleep(1.0)
    return status


def outcome(ckpt: Path) -> dict[str, Any]:
    """The run's history (None if it wrote none) and the path of its final model."""
    history = ckpt / "history.json"
    return {
        "history": json.loads(history.read_text()) if history.exists() else None,
        "model": str(ckpt / "model.pt"),
    }


def deploy(
    workdir: Path,
    *,
    nodes: int = 3,
    rounds: int = 3,
    algorithm: str = "fedng",
    seed: int = 0,
    timeout: float = 120.0,
    kill_node_after_round: int | None = None,
    intruder: bool = True,
    run_limit: float = 900.0,
    secagg: bool = False,
) -> dict[str, Any]:
    """Runs the whole deployment in `workdir`; see the module docstring (with `secagg`, the
    SecAgg+ components: `secure_app`).

    Returns:
        The report (also what `main` prints).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    keys = workdir / "keys"
    keys.mkdir(exist_ok=True)
    ckpt = workdir / "checkpoint"
    env = _env(workdir)
    ca, cert, key = make_tls(keys)
    node_keys = [make_node_key(keys, f"node{i}") for i in range(nodes)]
    port = free_port()
    connect(env, port, f'root-certificates = "{ca}"')
    procs = Processes(workdir, env)
    report: dict[str, Any] = {"nodes": nodes, "rounds": rounds, "algorithm": algorithm}
    t0 = time.monotonic()
    try:
        link = procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile", str(ca),
                "--ssl-certfile", str(cert),
                "--ssl-keyfile", str(key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", HOST,
                "--port", str(port),
                "--database", str(workdir / "superlink.db"),
            ],
        )  # fmt: skip
        wait_port(port, link, 60.0)
        for i, (_, pub) in enumerate(node_keys):
            reg = flwr_json(env, "supernode", "register", str(pub), CONNECTION)
            if not reg.get("success", True):
                raise RuntimeError(f"registering node {i} failed: {reg}")
        for i, (priv, _) in enumerate(node_keys):
            procs.start(f"supernode{i}", _supernode(port, ca, priv, i, nodes))
        if intruder:
            priv, _ = make_node_key(keys, "intruder")
            procs.start("intruder", _supernode(port, ca, priv, 0, nodes))
        online = _wait_nodes(env, nodes, 120.0)
        report["startup_s"] = round(time.monotonic() - t0, 1)
        report["registered_online"] = online
        overrides = (
            f"num-server-rounds={rounds} algorithm='{algorithm}' seed={seed} timeout={timeout}"
            f" checkpoint-dir='{ckpt}' task-args.num_clients={nodes}"
        )
        t1 = time.monotonic()
        app = secure_app(workdir) if secagg else APP
        started = flwr_json(env, "run", str(app), CONNECTION, "--run-config", overrides)
        run_id = int(started["run-id"])
        report["run_id"] = run_id

        def kill_one() -> None:
            done = _rounds_done(ckpt)
            due = kill_node_after_round is not None and done >= kill_node_after_round
            if due and "killed" not in report:
                procs.stop(f"supernode{nodes - 1}", grace=0.0)
                report["killed"] = {"node": nodes - 1, "after_round": done}

        report["status"] = wait_run(env, run_id, run_limit, kill_one)
        report["run_s"] = round(time.monotonic() - t1, 1)
        if intruder:
            report["intruder"] = _intruder_verdict(procs)
        report.update(outcome(ckpt))
    finally:
        report["left_running"] = procs.stop_all()
        report["total_s"] = round(time.monotonic() - t0, 1)
    return report


def secure_app(workdir: Path) -> Path:
    """A copy of the app whose components are the SecAgg+ ones (`fedng.flower.apps`
    `secure_server_app` / `secure_client_app`): FedNG's summable rounds under secure
    aggregation."""
    app = workdir / "app-secagg"
    shutil.copytree(APP, app, dirs_exist_ok=True)
    toml = app / "pyproject.toml"
    text = toml.read_text()
    for part in ("server", "client"):
        text = text.replace(f"fedng.flower.apps:{part}_app", f"fedng.flower.apps:secure_{part}_app")
    toml.write_text(text.replace('name = "fedng-digits"', 'name = "fedng-digits-secagg"'))
    return app


def simulate_engine(
    workdir: Path,
    *,
    nodes: int = 3,
    rounds: int = 3,
    algorithm: str = "fedng",
    seed: int = 0,
    run_limit: float = 900.0,
    secagg: bool = False,
) -> dict[str, Any]:
    """The same app on Flower's simulation engine (Ray; `flwr[simulation]`): a simulation
    SuperLink on 127.0.0.1 without dependency installation, `flwr run` with `num-supernodes`,
    the outcome from `flwr ls`, every process stopped. With `secagg`, the SecAgg+ components
    (`secure_app`). Returns the report."""
    workdir.mkdir(parents=True, exist_ok=True)
    app = secure_app(workdir) if secagg else APP
    # Ray's own servers on 127.0.0.1 too (its node address is otherwise the host's interface)
    env = {**_env(workdir), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    port = free_port()
    connect(env, port, "insecure = true")
    ckpt = workdir / "checkpoint"
    procs = Processes(workdir, env)
    report: dict[str, Any] = {
        "engine": "simulation",
        "nodes": nodes,
        "rounds": rounds,
        "secagg": secagg,
    }
    t0 = time.monotonic()
    try:
        link = procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"), "--insecure", "--simulation",
                "--disable-runtime-dependency-installation",
                "--host", HOST, "--port", str(port),
            ],
        )  # fmt: skip
        wait_port(port, link, 60.0)
        overrides = (
            f"num-server-rounds={rounds} algorithm='{algorithm}' seed={seed}"
            f" checkpoint-dir='{ckpt}' task-args.num_clients={nodes}"
        )
        started = flwr_json(
            env, "run", str(app), CONNECTION, "--run-config", overrides,
            "--federation-config", f"num-supernodes={nodes}",
        )  # fmt: skip
        report["status"] = wait_run(env, int(started["run-id"]), run_limit)
        report.update(outcome(ckpt))
    finally:
        report["left_running"] = procs.stop_all()
        report["total_s"] = round(time.monotonic() - t0, 1)
    return report


def _supernode(port: int, ca: Path, key: Path, pid: int, nodes: int) -> list[str]:
    return [
        str(BIN / "flower-supernode"),
        "--superlink", f"{HOST}:{port}",
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key),
        "--node-config", f"partition-id={pid} num-partitions={nodes}",
        "--host", HOST,
        "--port", str(free_port()),
        "--max-retries", "3",
    ]  # fmt: skip


def _wait_nodes(env: dict[str, str], nodes: int, limit: float) -> int:
    """Waits until `nodes` SuperNodes are online (`flwr supernode ls`); returns how many are."""
    deadline = time.monotonic() + limit
    online = 0
    while time.monotonic() < deadline:
        out = flwr_json(env, "supernode", "ls", CONNECTION)
        online = sum(
            1 for n in out.get("nodes", []) if str(n.get("status", "")).lower() == "online"
        )
        if online >= nodes:
            return online
        time.sleep(1.0)
    raise TimeoutError(f"only {online} of {nodes} SuperNodes online after {limit} s")


def _rounds_done(ckpt: Path) -> int:
    try:
        return len(json.loads((ckpt / "history.json").read_text())["rounds"]) - 1
    except (OSError, ValueError, KeyError):
        return 0


def _intruder_verdict(procs: Processes) -> dict[str, Any]:
    """Whether the unregistered SuperNode was refused: the SuperLink denied its activation (no
    registered key) and it exited with an error."""
    proc = procs.procs["intruder"]
    with suppress(subprocess.TimeoutExpired):
        proc.wait(30.0)
    denied = [
        ln.split("exception:")[-1].strip()
        for ln in procs.log("superlink").splitlines()
        if "activate-node" in ln and "ApiError" in ln
    ]
    code = proc.poll()
    return {"refused": bool(denied) and code not in (None, 0), "exit_code": code, "denied": denied}


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so every started process is stopped."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--algorithm", default="fedng")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a round waits")
    p.add_argument("--kill-node-after-round", type=int, default=None)
    p.add_argument("--no-intruder", action="store_true", help="skip the unregistered node")
    p.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temp)")
    p.add_argument(
        "--simulation", action="store_true", help="Flower's simulation engine (needs Ray) instead"
    )
    p.add_argument("--secagg", action="store_true", help="FedNG under SecAgg+ (secure aggregation)")
    a = p.parse_args(argv)
    folder = a.keep or Path(tempfile.mkdtemp(prefix="fedng-flower-"))
    try:
        if a.simulation:
            report = simulate_engine(
                folder,
                nodes=a.nodes,
                rounds=a.rounds,
                algorithm=a.algorithm,
                seed=a.seed,
                secagg=a.secagg,
            )
        else:
            report = deploy(
                folder,
                nodes=a.nodes,
                rounds=a.rounds,
                algorithm=a.algorithm,
                seed=a.seed,
                timeout=a.timeout,
                kill_node_after_round=a.kill_node_after_round,
                intruder=not a.no_intruder,
                secagg=a.secagg,
            )
    finally:
        if a.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    hist = report.pop("history", None)
    if hist is not None:
        report["metrics"] = [r["metric"] for r in hist["rounds"]]
        report["rejected"] = [r["rejected"] for r in hist["rounds"]]
    print(json.dumps(report, indent=1))
    ok = report.get("status", {}).get("status") == "finished:completed"
    return 0 if ok and not report["left_running"] else 1


if __name__ == "__main__":
    sys.exit(main())
