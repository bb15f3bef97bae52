"""``make docker-test``: build fedsim's image and run a deployment of it (opt-in; needs a
Docker engine, and root with debootstrap when no base image is given).

1. The base image: ``BASE_IMAGE`` when set, else ``fedsim-base:bookworm``, made once from
   Debian's packages (``debootstrap --variant=minbase --include=python3,python3-venv,
   python3-pip bookworm``, then ``docker import``), so that nothing is pulled from a registry.
2. The wheels: ``docker/wheels`` gets fedsim's dependencies with ``pip wheel`` (pip's own
   configuration decides where torch's CPU wheel comes from), so the image builds offline.
3. The image ``fedsim:docker-test`` from ``docker/Dockerfile`` with that base and those wheels.
4. ``docker/compose.host.yaml`` (the compose file with host networking: SuperLink and
   SuperNodes on 127.0.0.1, free ports) as project ``fedsim-docker-test``.
5. ``fedsim deploy`` of the quickstart (3 clients) from this machine; its metrics rows must
   equal those of the in-process simulation of the same config.
6. ``compose down`` of that project (its containers; host networking makes no network);
   images are kept. Then ``benchmarks/results/docker.json`` records the run.

Usage: python docker/docker_test.py [--rounds 3] [--out benchmarks/results/docker.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedsim.bench import environment
from fedsim.config import load_config
from fedsim.loopback import free_port, wait_for_port
from fedsim.outputs.results import RunDir
from fedsim.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "docker" / "wheels"
BASE = "fedsim-base:bookworm"
IMAGE = "fedsim:docker-test"
PROJECT = "fedsim-docker-test"
NUM_NODES = 3


def sh(*command: str, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def has_image(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def base_image() -> str:
    """``BASE_IMAGE``, else the Debian base made from packages (once)."""
    if os.environ.get("BASE_IMAGE"):
        return os.environ["BASE_IMAGE"]
    if has_image(BASE):
        return BASE
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        sys.exit("no BASE_IMAGE given, and making one from Debian's packages needs root and debootstrap "
                 "(apt-get install debootstrap)")
    mirror = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
    with tempfile.TemporaryDirectory(prefix="fedsim-rootfs-") as rootfs:
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip", "bookworm", rootfs, mirror)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        sh("docker", "import", "-", BASE, stdin=tar.stdout)
        if tar.wait() != 0:
            sys.exit("tar of the Debian root file system failed")
    return BASE


def wheels() -> None:
    """fedsim's dependencies (and the build backend) as wheels in docker/wheels."""
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(WHEELS), str(ROOT), "setuptools", "wheel")
    for own in WHEELS.glob("fedsim-*.whl"):  # the image installs fedsim from the sources
        own.unlink()


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    sys.exit("neither `docker compose` nor `docker-compose` is installed")


def rows_without_wall_time(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in RunDir.open(path).rows()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "docker.json"))
    args = parser.parse_args()
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        sys.exit("no Docker engine answers (start dockerd, or set DOCKER_HOST)")
    t0 = time.monotonic()
    base = base_image()
    wheels()
    t_build = time.monotonic()
    sh("docker", "build", "-q", "-f", str(ROOT / "docker" / "Dockerfile"), "--build-arg", f"BASE_IMAGE={base}",
       "--build-arg", "WHEELS=docker/wheels", "-t", IMAGE, str(ROOT))
    build_s = time.monotonic() - t_build
    size = int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE], capture_output=True,
                              text=True, check=True).stdout)
    overrides = [f"partition.num_clients={NUM_NODES}", f"rounds={args.rounds}", "output.plots=false"]
    compose = [*compose_command(), "-p", PROJECT, "-f", str(ROOT / "docker" / "compose.host.yaml")]
    with tempfile.TemporaryDirectory(prefix="fedsim-docker-test-") as tmp:
        runs = Path(tmp, "runs")
        runs.mkdir()
        port = free_port()
        env = {**os.environ, "FEDSIM_IMAGE": IMAGE, "FEDSIM_RUNS": str(runs), "FEDSIM_SUPERLINK_PORT": str(port),
               **{f"FEDSIM_NODE_PORT_{i}": str(free_port()) for i in range(NUM_NODES)}}
        t_up = time.monotonic()
        sh(*compose, "up", "-d", env=env)
        try:
            wait_for_port(port, timeout=120)
            up_s = time.monotonic() - t_up
            t_run = time.monotonic()
            deploy = [str(Path(sys.executable).parent / "fedsim"), "deploy", str(ROOT / "configs" / "quickstart.yaml"),
                      "--superlink", f"127.0.0.1:{port}", *[a for o in [*overrides, "output.dir=/app/runs"]
                                                             for a in ("--set", o)]]
            sh(*deploy, timeout=1800)
            run_s = time.monotonic() - t_run
        finally:
            logs = subprocess.run([*compose, "logs", "--no-color"], env=env, capture_output=True, text=True).stdout
            Path(tmp, "compose.log").write_text(logs)
            sh(*compose, "down", "--timeout", "20", env=env)
        [deployed] = list(runs.iterdir())
        simulated, _ = run_experiment(load_config(ROOT / "configs" / "quickstart.yaml", [
            *overrides, "sim.backend=inprocess", f"output.dir={Path(tmp, 'sim')}"]))
        rows, expected = rows_without_wall_time(deployed), rows_without_wall_time(simulated)
        deployed_summary = RunDir.open(deployed).summary()
    equal = rows == expected
    result = {
        "command": "make docker-test", "environment": environment(), "base_image": base, "image": IMAGE,
        "image_size_mb": round(size / 2**20, 1), "build_s": round(build_s, 1), "compose_up_s": round(up_s, 1),
        "deploy_s": round(run_s, 1), "total_s": round(time.monotonic() - t0, 1), "rounds": args.rounds,
        "clients": NUM_NODES, "final_accuracy": deployed_summary.get("final_accuracy"),
        "rows_equal_simulation": equal,
    }
    print(json.dumps(result, indent=2))
    if not equal:
        sys.exit(f"the deployed run's rows differ from the simulation's:\n{rows}\n{expected}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
