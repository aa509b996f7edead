"""What a Kubernetes Service does with deploy/kubernetes, rehearsed with real processes on loopback ports.

There is no cluster here: kube-proxy is played by haproxy in TCP mode (each connection to one endpoint, kept-alive
requests follow it, nothing retried), the endpoints controller by haproxy's health check on the manifest's
readiness path, and the pods by the real service started with the manifest's settings.

- :func:`rehearse_rebalancing`: an indexer on one kept-alive connection while the autoscaler adds a replica.
  The service retires connections (``EMBEDDING_CONNECTION_MAX_AGE_S``, ``EMBEDDING_CONNECTION_MAX_REQUESTS``),
  so the indexer's next connection may reach the new replica; without that it stays on the first one forever.
- :func:`rehearse_all_shedding`: every replica over its memory limit at once. With the manifest's readiness
  path clients get 503 with ``Retry-After``; with ``/ready`` (503 while shedding) every endpoint leaves the
  Service and they get a closed connection and no answer.
- :class:`PodSandbox`: a container of the rendered Deployment (``kubectl kustomize``) run as the pod would run
  it, in bubblewrap: as the pod's user and groups with no capability, on a read-only root (this machine's,
  standing in for the image) with only the Deployment's volumes writable, with the image's entrypoint and
  environment (the Dockerfile's) and the container's args, settings and env (``$(VAR)`` expanded as the
  kubelet does). What cannot be the same here is said where it differs: the image's paths are this
  checkout's (its virtual environment, the bundled model instead of the baked one), the port is a free one,
  ``emptyDir`` volumes are directories without their size limit.

tests/e2e/test_kubernetes_rehearsal.py runs both; tests/e2e/test_pod_sandbox.py runs the pod's sandbox.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests
import yaml

from loadtest.rehearsal import SERVICE_PROXY_CONFIG, Balancer, main_container
from loadtest.service import BUNDLED_MODEL, ROOT, ServiceProcess


def readiness_path() -> str:
    """The path of the manifest's readiness probe: what decides whether a pod is among the Service's endpoints."""
    path: str = main_container()["readinessProbe"]["httpGet"]["path"]
    return path


def _replica_of(balancer: Balancer) -> Counter[str]:
    """Connections per replica, from haproxy's log (one line each, written when the connection closes)."""
    return Counter(row[0].split("/")[1] for row in balancer.requests_log())


def _embedded(service: ServiceProcess) -> float:
    """``POST /embed`` requests the replica answered with 200."""
    return service.metric("embedding_requests_total", route="/embed", code="200") or 0.0


def rehearse_rebalancing(work: Path, env: dict[str, str], before: int = 20, seconds: float = 12.0) -> dict[str, Any]:
    """One indexer on one ``requests.Session`` (kept alive) sends ``before`` requests while replica ``a`` is the
    Service's only endpoint; then replica ``b`` joins (the autoscaler's new pod, ready) and the indexer goes on
    for ``seconds``. What each replica answered before and after, and the connections the indexer opened."""
    work.mkdir(parents=True, exist_ok=True)
    a, b = ServiceProcess(work / "pod-a.log", env).start(), ServiceProcess(work / "pod-b.log", env).start()
    started: list[ServiceProcess | Balancer] = [a, b]
    try:
        a.wait_ready()
        b.wait_ready()
        balancer = Balancer(work, a.port, b.port, SERVICE_PROXY_CONFIG, readiness=readiness_path())
        started.append(balancer)
        balancer.remove("b")  # not scaled out yet
        if balancer.wait_up("a", 10) is None:
            raise RuntimeError("haproxy never saw replica a ready")
        texts = [f"passage {i} of a document an indexer sends" for i in range(8)]
        statuses: Counter[int] = Counter()
        with requests.Session() as indexer:

            def send() -> None:
                answer = indexer.post(f"{balancer.url}/embed", json={"inputs": texts}, timeout=60)
                statuses[answer.status_code] += 1

            for _ in range(before):
                send()
            answered_before = {"a": _embedded(a), "b": _embedded(b)}
            balancer.add("b")
            if balancer.wait_up("b", 10) is None:
                raise RuntimeError("haproxy never saw replica b ready")
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                send()
        time.sleep(0.5)  # haproxy logs a connection when it closes
        answered_after = {"a": _embedded(a) - answered_before["a"], "b": _embedded(b) - answered_before["b"]}
        return {
            "env": env,
            "statuses": dict(statuses),
            "answered_before": answered_before,
            "answered_after": answered_after,
            "connections": dict(_replica_of(balancer)),
        }
    finally:
        for part in reversed(started):
            part.terminate()


def rehearse_all_shedding(work: Path, readiness: list[str]) -> dict[str, Any]:
    """One replica (the only one: all replicas) whose memory is above its limit from the start, behind a Service
    whose endpoints follow each of ``readiness`` in turn: what a client sending ``POST /embed`` gets."""
    work.mkdir(parents=True, exist_ok=True)
    # A limit far below any RSS: the replica sheds from its first monitor pass on, and stays shedding.
    env = {"EMBEDDING_MEMORY_LIMIT_BYTES": "50MB", "EMBEDDING_MONITOR_INTERVAL_S": "1"}
    pod = ServiceProcess(work / "pod.log", env).start()
    seen: dict[str, Any] = {}
    try:
        pod.wait_ready(path="/health")  # loaded: /ready is 503 while it sheds
        _wait(lambda: _status(f"{pod.url}/ready") == 503, "the replica to shed")
        for i, path in enumerate(readiness):
            (work / f"service-{i}").mkdir()
            balancer = Balancer(work / f"service-{i}", pod.port, pod.port, SERVICE_PROXY_CONFIG, readiness=path)
            try:
                balancer.remove("b")  # one endpoint
                time.sleep(2.0)  # several health checks: the endpoint is in or out by now
                try:
                    answer = requests.post(f"{balancer.url}/embed", json={"inputs": ["a query"]}, timeout=30)
                    seen[path] = {
                        "status": answer.status_code,
                        "retry_after": answer.headers.get("Retry-After"),
                        "connection": answer.headers.get("Connection"),
                        "error": answer.json().get("error"),
                    }
                except requests.ConnectionError as error:
                    seen[path] = {"status": None, "error": f"{type(error).__name__}: {error}"}
                seen[path]["endpoint"] = balancer.server("a")["status"]
            finally:
                balancer.terminate()
        return seen
    finally:
        pod.terminate()


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return 0


def _wait(condition: Any, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for {what}")
        time.sleep(0.2)


# --- the pod's sandbox ---------------------------------------------------------------------------------------

KUSTOMIZE = ROOT / "deploy" / "kubernetes"


class KubeLoader(yaml.SafeLoader):
    """YAML 1.1 reads a bare ``=`` (an AlertmanagerConfig's matchType, as kustomize writes it and Kubernetes'
    YAML 1.2 reader takes it) as its 'value' tag: a string here."""


KubeLoader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def render_dir(kustomization: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize`` renders of the kustomization in ``kustomization`` (offline)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is needed to render the manifests (kubectl kustomize works offline)")
    out = subprocess.run([kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.load_all(out.stdout, Loader=KubeLoader) if doc]


def render(components: tuple[str, ...] | list[str], settings: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The base with ``components`` (and ``settings`` merged into its ConfigMap), as an overlay that lists them
    renders it."""
    with tempfile.TemporaryDirectory() as directory:
        here = Path(directory)
        overlay: dict[str, Any] = {  # kustomize takes relative paths only
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(KUSTOMIZE / "base", here)],
            # The startup probe's budget last, from the settings as merged here (as overlays/example lists it).
            "components": [
                os.path.relpath(KUSTOMIZE / "components" / name, here) for name in (*components, "startup-budget")
            ],
        }
        if settings:
            literals = [f"{k}={v}" for k, v in settings.items()]
            overlay["configMapGenerator"] = [
                {"name": "embedding-service-config", "behavior": "merge", "literals": literals}
            ]
        (here / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
        return render_dir(here)


def image_environment() -> dict[str, str]:
    """The runtime stage's ``ENV`` of the Dockerfile, with this checkout's paths for the image's: the virtual
    environment's bin first on PATH, and the bundled model for the baked one."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    runtime = dockerfile[dockerfile.rindex("\nFROM ") :]
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", runtime, re.MULTILINE):
        for key, value in re.findall(r"(\w+)=(\S*)", block.replace("\\\n", " ")):
            env[key] = value
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
    env["EMBEDDING_MODEL"] = BUNDLED_MODEL
    return {k: v for k, v in env.items() if "${" not in v}  # build arguments (the build's sha, its label)


def dockerfile_instruction(name: str) -> str:
    """The argument of the Dockerfile's last ``name`` instruction (the runtime stage's): USER, WORKDIR, ..."""
    return str(re.findall(rf"^{name} (.+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)[-1]).strip()


def entrypoint() -> list[str]:
    """The Dockerfile's ENTRYPOINT (exec form)."""
    import json

    return list(json.loads(dockerfile_instruction("ENTRYPOINT")))


def expand(value: str, env: dict[str, str]) -> str:
    """``$(VAR)`` as the kubelet expands it in env values and args: from the variables defined before;
    unknown ones stay as written, ``$$`` is a literal ``$``."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


class PodSandbox(ServiceProcess):
    """One container of a rendered Deployment, run as the pod runs it (see the module's docstring)."""

    def __init__(self, objects: list[dict[str, Any]], container: str, volumes: dict[str, Path], log_path: Path):
        super().__init__(log_path)
        (deployment,) = (o for o in objects if o["kind"] == "Deployment")
        self.pod = deployment["spec"]["template"]["spec"]
        (self.container,) = (
            c for c in self.pod["containers"] + self.pod.get("initContainers", []) if c["name"] == container
        )
        self.maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
        self.volumes = volumes

    def environment(self) -> dict[str, str]:
        """The image's environment, then the container's envFrom and env in order, as the kubelet builds it
        (an optional Secret that is not there adds nothing); the port is a free one."""
        env = image_environment()
        for source in self.container.get("envFrom", []):
            env.update(self.maps[source["configMapRef"]["name"]])
        for var in self.container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
            elif not var["valueFrom"].get("secretKeyRef", {}).get("optional"):
                raise ValueError(f"{var['name']} needs a Secret, which the rehearsal does not have")
        env["EMBEDDING_PORT"] = str(self.port)
        return env

    def command(self) -> list[str]:
        env = self.environment()
        security = {**self.pod.get("securityContext", {}), **self.container.get("securityContext", {})}
        uid, gid = str(security["runAsUser"]), str(security["runAsGroup"])
        groups = [str(security["fsGroup"])] if "fsGroup" in security else []
        if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation", True):
            raise ValueError("the container's root is writable or it may escalate privileges")
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise RuntimeError("bubblewrap is needed for the pod's sandbox: make system-deps installs it")
        args = [bwrap, *_image_root(), "--proc", "/proc", "--dev", "/dev"]
        args += ["--perms", "1777", "--tmpfs", "/dev/shm"]  # noqa: S108  (every container runtime gives one)
        args += _reachable([Path(sys.base_prefix), Path(sys.prefix), ROOT], int(uid))
        declared = {v["name"]: v for v in self.pod.get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            if "emptyDir" not in declared[mount["name"]]:
                raise ValueError(f"volume {mount['name']} is not an emptyDir: the rehearsal has only those")
            source = self.volumes[mount["name"]]
            args += ["--ro-bind" if mount.get("readOnly") else "--bind", str(source), mount["mountPath"]]
        # What stands in for the image's files but lies under a volume's mount point here (a checkout in /tmp) is
        # bound again over it, read-only: in the image it is elsewhere (/opt/venv).
        mounted = [Path(m["mountPath"]) for m in self.container.get("volumeMounts", [])]
        for path in {p.resolve() for p in (Path(sys.base_prefix), Path(sys.prefix), ROOT)}:
            if any(path.is_relative_to(point) for point in mounted):
                args += ["--ro-bind", str(path), str(path)]
        args += ["--remount-ro", "/"]  # the root, with the mount points the volumes needed, read-only
        workdir = dockerfile_instruction("WORKDIR")
        args += ["--unshare-pid", "--as-pid-1", "--die-with-parent", "--chdir", workdir, "--clearenv"]
        for key, value in env.items():
            args += ["--setenv", key, value]
        if os.geteuid() == 0:  # drop to the pod's user, groups and no capability, as the runtime does
            setpriv = ["setpriv", "--reuid", uid, "--regid", gid, "--groups", ",".join(groups) or gid]
            args += [*setpriv, "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        else:  # an unprivileged user namespace that maps this user to the pod's
            args[1:1] = ["--unshare-user", "--uid", uid, "--gid", gid]
        return [*args, *entrypoint(), *(expand(a, env) for a in self.container.get("args", []))]

    def run(self, timeout_s: float = 120) -> int:
        """Run to its end (an init container); its exit code."""
        with self.log_path.open("wb") as log:
            return subprocess.run(
                self.command(), check=False, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s
            ).returncode

    def start(self) -> PodSandbox:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def processes(self) -> list[dict[str, Any]]:
        """The container's processes: pid, name, real and effective uid, groups."""
        import psutil

        assert self.proc is not None
        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            uids = child.uids()
            found.append({"pid": child.pid, "name": child.name(), "uid": [uids.real, uids.effective],
                          "gids": list(child.gids())})  # fmt: skip
        return found

    def _stop(self) -> None:
        """SIGTERM to the container's first process (gunicorn's master), as the kubelet signals PID 1."""
        import psutil

        assert self.proc is not None
        try:
            first = psutil.Process(self.proc.pid).children() or [psutil.Process(self.proc.pid)]
        except psutil.NoSuchProcess:  # it exited already
            first = []
        for process in first:
            process.send_signal(signal.SIGTERM)


def _image_root() -> list[str]:
    """bubblewrap's arguments for a root that stands in for the image's: this machine's top-level directories
    bound read-only into a fresh root, where mount points for the volumes can be made (as a container runtime
    makes them), which is itself made read-only once they are."""
    args: list[str] = []
    for entry in sorted(Path("/").iterdir()):
        if entry.name in ("proc", "dev"):
            continue
        if entry.is_symlink():
            args += ["--symlink", os.readlink(entry), str(entry)]
        else:
            args += ["--ro-bind", str(entry), str(entry)]
    return args


def empty_dir(path: Path) -> Path:
    """A directory as the kubelet makes an ``emptyDir``: empty, writable by every user."""
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


def _reachable(paths: list[Path], uid: int) -> list[str]:
    """bubblewrap's arguments that let ``uid`` reach ``paths`` (the interpreter, the virtual environment, this
    checkout) where a parent directory shuts others out (a home directory of mode 0700): a read-only tmpfs over
    that parent, with only these paths bound into it."""
    args: list[str] = []
    covered: set[Path] = set()
    for path in (p.resolve() for p in paths):
        closed = next((a for a in reversed(path.parents) if a != Path("/") and not os.stat(a).st_mode & 0o001), None)
        if closed is None or uid == os.stat(closed).st_uid:
            continue
        if closed not in covered:
            args += ["--tmpfs", str(closed)]
            covered.add(closed)
        for parent in reversed(path.relative_to(closed).parents):
            if parent != Path("."):
                args += ["--perms", "0755", "--dir", str(closed / parent)]
        args += ["--ro-bind", str(path), str(path)]
    return args + [arg for closed in covered for arg in ("--remount-ro", str(closed))]
