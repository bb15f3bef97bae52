"""The ``fedsim`` command line: run, validate, algorithms, partition, report, bench, deploy, auth,
clientapp, supernode."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Column, Table

from fedsim.config import ConfigError, ExperimentConfig, load_config
from fedsim.outputs.progress import CONSOLE
from fedsim.supernode import POLL_INTERVAL_S

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Federated-learning simulation on Flower + Ray.")
console = CONSOLE
errors = Console(stderr=True, soft_wrap=True)

SetOption = Annotated[list[str] | None, typer.Option("--set", help="override KEY=VALUE (repeatable)")]

# ``--debug``: a user error shows its traceback instead of one line
DEBUG = {"on": False}


@app.callback()
def main(debug: Annotated[bool, typer.Option(help="show the traceback of an error, not one line")] = False) -> None:
    """Federated-learning simulation on Flower + Ray."""
    DEBUG["on"] = debug


def fail(label: str, exc: BaseException, code: int = 2) -> typer.Exit:
    """Print ``exc`` as one line on stderr (its traceback too under ``--debug``) and return
    the ``typer.Exit`` to raise: ``raise fail("config error", exc) from None``."""
    if DEBUG["on"] and exc.__traceback__ is not None:
        errors.print_exception(show_locals=False)
    line = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    errors.print(f"[red]{label}:[/red] {line}", highlight=False, markup=True)
    return typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)


def _config(path: Path, overrides: list[str] | None) -> ExperimentConfig:
    try:
        return load_config(path, overrides or [])
    except ConfigError as exc:
        raise fail("config error", exc) from None


def _checked(cfg: ExperimentConfig, ray_address: str | None = None) -> ExperimentConfig:
    """``cfg``, once the data and the host can run it (:func:`fedsim.preflight.preflight`)."""
    from fedsim.preflight import preflight

    try:
        preflight(cfg, ray_address)
    except ConfigError as exc:
        raise fail("config error", exc) from None
    return cfg


def _federated_data(cfg: ExperimentConfig):
    """The config's partitioned data, or exit with the one line saying why the data cannot
    satisfy the partition (more clients than samples, more labels per client than classes)."""
    from fedsim.data.partition import PartitionError
    from fedsim.sim.components import federated_data

    try:
        return federated_data(cfg)
    except PartitionError as exc:
        raise fail("partition error", exc) from None


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment YAML (optional with --resume)")] = None,
    set_: SetOption = None,
    resume: Annotated[Path | None, typer.Option(help="continue this run directory from its last checkpoint")] = None,
    ray_address: Annotated[str | None, typer.Option(help="attach to a Ray cluster, HOST:PORT")] = None,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
    verbose: Annotated[bool, typer.Option(help="debug logs, Flower's included")] = False,
) -> None:
    """Run an experiment and write its run directory.

    Exit codes: 0 done; 1 the run stopped (training diverged, every Ray worker lost), or every
    round was skipped, or its last two rounds or more were (a fault it did not recover from);
    2 a user error (config, data, host, a cluster that does not answer), reported in one line
    before anything starts."""
    from fedsim.loops.skeleton import DivergedError
    from fedsim.outputs.results import RunDir, RunDirError
    from fedsim.runner import ClusterUnreachable, run_experiment
    from fedsim.sim.ray_nodes import EngineLost

    _setup_logging(verbose)
    if resume is not None and config is not None:
        raise fail("error", ValueError(f"give CONFIG or --resume RUN_DIR, not both: a resumed run continues with "
                                       f"{resume / 'config.yaml'} (change what may change with --set)"))
    if resume is not None:
        try:
            cfg = RunDir.open(resume).resumed_config(set_ or [])
        except (FileNotFoundError, RunDirError) as exc:
            raise fail("error", exc) from None
        except ConfigError as exc:
            raise fail("config error", exc) from None
    elif config is None:
        raise fail("error", ValueError("give a CONFIG file, or --resume RUN_DIR"))
    else:
        cfg = _config(config, set_)
    _checked(cfg, ray_address)
    try:
        path, summary = run_experiment(cfg, resume=resume, ray_address=ray_address,
                                       show_progress=progress, verbose=verbose)
    except DivergedError as exc:
        raise fail("diverged", exc, code=1) from None
    except EngineLost as exc:
        raise fail("workers lost", ValueError(f"{exc}; the run stopped (its last checkpoint continues it: "
                                              f"fedsim run --resume RUN_DIR)"), code=1) from None
    except (ClusterUnreachable, RunDirError) as exc:
        raise fail("error", exc) from None
    acc = summary.get("final_accuracy")
    console.print(f"[green]done[/green]: {path}  final accuracy "
                  f"{'-' if acc is None else f'{acc:.4f}'}  ({summary.get('status')})")
    last, first_skipped = summary.get("rounds_completed"), summary.get("skipped_from_round")
    if last and summary.get("skipped_rounds") == last:
        raise fail("no round aggregated", ValueError(
            f"every one of the {last} rounds was skipped (fewer than "
            f"strategy.min_successful valid replies); see the failures in {path / 'metrics.jsonl'}"), code=1)
    if first_skipped is not None and last - first_skipped >= 1:
        raise fail("rounds lost", ValueError(
            f"every round from {first_skipped} to the last ({last}) was skipped (fewer than strategy.min_successful "
            f"valid replies: clients or workers lost?); see the failures in {path / 'metrics.jsonl'}"), code=1)


@app.command()
def validate(config: Path, set_: SetOption = None) -> None:
    """Check a config file (and overrides) without running anything: the config's keys
    and combinations, then what the run needs from the data and the host (the dataset
    is loaded and partitioned, the device and GPU share looked up)."""
    cfg = _checked(_config(config, set_))
    length = f"horizon {cfg.strategy.horizon:g}" if cfg.strategy.family == "async" else f"{cfg.rounds} rounds"
    console.print(f"[green]ok[/green]: {config} ({cfg.strategy.name}, {cfg.partition.num_clients} clients, {length})")


@app.command()
def algorithms(name: Annotated[str | None, typer.Argument(help="show this algorithm only")] = None) -> None:
    """List the registered algorithms (fedsim's and installed plug-ins'): arguments and defaults,
    backends, and the features each combines with."""
    from fedsim.algorithms import registry
    from fedsim.algorithms.catalog import FEATURES, describe

    if name is not None:
        try:
            entry = describe(name)
        except registry.UnknownAlgorithm as exc:
            raise fail("error", exc) from None
        console.print(f"[bold]{entry.name}[/bold] ({entry.family}, {entry.module}): {entry.description}",
                      highlight=False)
        table = Table("argument", "type", "default", "meaning", title=f"strategy.* of {entry.name}")
        for argument in entry.arguments:
            table.add_row(argument.name, argument.type, repr(argument.default), argument.description)
        console.print(table)
        console.print("per-client state: " + (", ".join(entry.client_state) or "none"), highlight=False)
        console.print("backends: " + "; ".join(entry.backends), highlight=False)
        console.print("combines with: " + (", ".join(entry.combines) or "none of the probed features"),
                      highlight=False)
        for feature, why in entry.refuses.items():
            console.print(f"refuses {feature}: {why}", highlight=False)
        return
    # The names never wrap: they are what a user types.
    table = Table(Column("algorithm", no_wrap=True), Column("family", no_wrap=True), "arguments (defaults)", "batched", "combines with", "what it is",
                  title=f"{len(registry.names())} algorithms (fedsim algorithms NAME for one)")
    for algorithm in registry.names():
        entry = describe(algorithm)
        arguments = ", ".join(f"{a.name}={a.default!r}" for a in entry.arguments
                              if a.name not in ("fraction_train", "fraction_evaluate", "min_successful", "server_opt",
                                                "horizon", "eval_every"))
        batched = next(b for b in entry.backends if b.startswith("batched")).removeprefix("batched ").strip("()")
        table.add_row(entry.name, entry.family, arguments or "-", batched,
                      f"{len(entry.combines)} of {len(FEATURES)}", entry.description)
    console.print(table)


@app.command()
def partition(
    config: Path,
    set_: SetOption = None,
    out: Annotated[Path, typer.Option(help="directory for partition.png and partition.json")] = Path("."),
    table_max_clients: Annotated[int, typer.Option(help="print the per-client table up to this many clients")] = 50,
) -> None:
    """Measure the partition's heterogeneity: print each client's label histogram and the
    measures, write partition.json (sizes, label counts, measures) and partition.png (a
    clients x labels heatmap under the client sizes)."""
    import json

    from fedsim.data.partition import noise_scales
    from fedsim.data.skew import partition_report, plot_partition

    cfg = _config(config, set_)
    data = _federated_data(cfg)
    hist = data.label_counts(with_test=True)
    num_clients = cfg.partition.num_clients
    noise = noise_scales(cfg.partition.noise_std, num_clients) if cfg.partition.scheme == "feature_noise" else None
    report = {"dataset": cfg.data.name, "scheme": cfg.partition.scheme, "num_clients": num_clients,
              "num_classes": data.num_classes, "seed": cfg.seed, "partition": cfg.partition.model_dump(),
              **partition_report(hist, data.train_sizes().tolist(), noise)}
    title = f"{cfg.data.name}: {cfg.partition.scheme} over {num_clients} clients"
    if num_clients <= table_max_clients:
        table = Table(title=title)
        table.add_column("client", justify="right")
        for c in range(data.num_classes):
            table.add_column(str(c), justify="right")
        table.add_column("total", justify="right")
        for i, row in enumerate(hist):
            table.add_row(str(i), *(str(int(v)) for v in row), str(int(row.sum())))
        console.print(table)
    console.print(title + ": " + ", ".join(f"{k} {v:.4g}" for k, v in report["heterogeneity"].items()),
                  highlight=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "partition.json").write_text(json.dumps(report, indent=2))
    plot_partition(hist, out / "partition.png", title=f"{cfg.data.name} {cfg.partition.scheme}")
    console.print(f"wrote {out / 'partition.json'} and {out / 'partition.png'}")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories to compare")],
    out: Annotated[Path, typer.Option(help="comparison plot")] = Path("report.png"),
) -> None:
    """Compare runs in one table and one accuracy plot."""
    from fedsim.outputs.plots import plot_comparison
    from fedsim.outputs.results import RunDir

    def fmt(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    runs, curves = [], {}
    for path in run_dirs:
        try:
            run_dir = RunDir.open(path)
        except FileNotFoundError as exc:
            raise fail("error", exc) from None
        runs.append((path, run_dir.config(), run_dir.summary()))
        curves[path.name] = run_dir.rows()
    # personalized runs add their method and their clients' personal accuracies (median, mean)
    personal = any("final_personal_accuracy_mean" in summary for _, _, summary in runs)
    table = Table(title="fedsim runs")
    for col in ("run", "strategy", "rounds", "final acc", "best acc",
                *(("personal", "personal acc p50 (mean)") if personal else ()), "rounds to target", "wall (s)",
                "failed"):
        table.add_column(col)
    for path, cfg, summary in runs:
        columns = (cfg.personalization.method, f"{fmt(summary.get('final_personal_accuracy_p50'))} "
                   f"({fmt(summary.get('final_personal_accuracy_mean'))})") if personal else ()
        table.add_row(path.name, cfg.strategy.name, str(summary.get("rounds_completed", "-")),
                      fmt(summary.get("final_accuracy")), fmt(summary.get("best_accuracy")), *columns,
                      fmt(summary.get("rounds_to_target"), "d"), fmt(summary.get("wall_time_s"), ".1f"),
                      str(summary.get("failed_client_calls", "-")))
    console.print(table)
    plot_comparison(curves, out)
    console.print(f"wrote {out}")


@app.command()
def bench(
    spec: Path,
    runs_dir: Annotated[str | None, typer.Option(help="where the grid's run directories go")] = None,
    jobs: Annotated[int, typer.Option(help="runs at a time (needs sim.backend=inprocess)")] = 1,
    rerender: Annotated[bool, typer.Option(help="rewrite table and verdicts from stored results")] = False,
    resume: Annotated[bool, typer.Option(
        help="take each run that a finished run in --runs-dir has the config of from there")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="override a field of the spec, KEY=VALUE (repeatable), e.g. an axis")] = None,
) -> None:
    """Run a benchmark grid and write its table, JSON and figures."""
    from fedsim.bench import rerender_bench, run_bench

    _setup_logging(False)
    try:
        md = rerender_bench(spec, set_ or []) if rerender else run_bench(spec, runs_dir, jobs, set_ or [], resume)
    except ConfigError as exc:
        raise fail("bench spec error", exc) from None
    console.print(md.read_text())
    console.print(f"wrote {md}")



@app.command()
def deploy(
    config: Path,
    superlink: Annotated[str, typer.Option(help="the SuperLink's address, HOST:PORT")],
    set_: SetOption = None,
    root_certificates: Annotated[Path | None, typer.Option(
        help="CA certificates of a TLS SuperLink (without: an insecure connection)")] = None,
    stream: Annotated[bool, typer.Option(help="follow the run's logs until it ends")] = True,
) -> None:
    """Run an experiment on real clients: submit it to a Flower SuperLink whose SuperNodes
    play its partitions (see docker/compose.yaml)."""
    from fedsim.deploy import submit

    cfg = _config(config, set_)
    try:
        raise typer.Exit(submit(cfg, superlink, root_certificates, stream))
    except ConfigError as exc:
        raise fail("error", exc) from None


auth_app = typer.Typer(no_args_is_help=True, help="SuperNode authentication: keys, and their registration "
                                                      "with a SuperLink started with --enable-supernode-auth.")
app.add_typer(auth_app, name="auth")


@auth_app.command("keys")
def auth_keys(
    folder: Annotated[Path, typer.Argument(help="where the keys (and certificates) are written")],
    nodes: Annotated[int, typer.Option(help="number of SuperNodes: one key pair each")],
    tls_host: Annotated[list[str] | None, typer.Option(
        help="also a CA and a SuperLink certificate for this host name or address (repeatable)")] = None,
) -> None:
    """Write a key pair per SuperNode (supernode-<i>, supernode-<i>.pub) and, with
    --tls-host, a CA (ca.pem) and the SuperLink's certificate (server.pem, server.key)."""
    from fedsim.credentials import make_node_keys, make_tls

    if nodes < 1:
        console.print(f"[red]error:[/red] --nodes: {nodes} is not a number of SuperNodes (>= 1)", highlight=False)
        raise typer.Exit(2)
    for key in make_node_keys(folder, nodes):
        console.print(f"wrote {key} and {key.name}.pub", highlight=False)
    if tls_host:
        tls = make_tls(folder, tls_host)
        console.print(f"wrote {tls.ca}, {tls.cert} and {tls.key} (for {', '.join(tls_host)})", highlight=False)


@auth_app.command("register")
def auth_register(
    folder: Annotated[Path, typer.Argument(help="the folder `fedsim auth keys` wrote")],
    superlink: Annotated[str, typer.Option(help="the SuperLink's address, HOST:PORT")],
    root_certificates: Annotated[Path, typer.Option(help="CA certificates of the SuperLink's TLS")],
) -> None:
    """Register every SuperNode public key in FOLDER (supernode-*.pub) with the SuperLink."""
    from fedsim.credentials import register_nodes

    keys = sorted(folder.glob("supernode-*.pub"), key=lambda k: int(k.name.removesuffix(".pub").split("-")[-1]))
    if not keys:
        console.print(f"[red]error:[/red] {folder}: no supernode-*.pub keys (write them with `fedsim auth keys`)",
                      highlight=False)
        raise typer.Exit(2)
    try:
        node_ids = register_nodes(keys, superlink, root_certificates)
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    for key, node_id in zip(keys, node_ids, strict=True):
        console.print(f"registered {key.name} as node {node_id}", highlight=False)


@app.command()
def clientapp(
    runtime_api_address: Annotated[str, typer.Option(
        help="the SuperNode's Runtime API, HOST:PORT (flower-supernode --port)")] = "127.0.0.1:9094",
    root_certificates: Annotated[Path | None, typer.Option(
        help="CA certificates of a Runtime API served over TLS (without: plain HTTP)")] = None,
    verbose: Annotated[bool, typer.Option(help="debug logs, Flower's included")] = False,
) -> None:
    """Run every message of a SuperNode started with --isolation process in this one
    long-lived process (Flower starts a process per message otherwise)."""
    from fedsim.clientapp_process import serve

    _setup_logging(verbose)
    serve(runtime_api_address, root_certificates, verbose)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def supernode(
    ctx: typer.Context,
    poll_interval: Annotated[float, typer.Option(
        min=0.01, help="seconds between a node's requests for a message (flower-supernode: 3)")] = POLL_INTERVAL_S,
) -> None:
    """Flower's SuperNode (every other option is flower-supernode's, see flower-supernode
    --help) asking the SuperLink for a message every POLL_INTERVAL seconds, not every 3."""
    from fedsim.supernode import run_supernode

    run_supernode(ctx.args, poll_interval)


if __name__ == "__main__":
    app()
