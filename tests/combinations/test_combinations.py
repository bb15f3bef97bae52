"""The combination contract as a test: every configuration either is refused at validation
with a one-line ConfigError, or runs 2 steps in-process with finite metrics and no client
failing for a reason other than an injected fault.

The configurations cover every pair of values of strategy (every algorithm the registry
holds, an installed plug-in's too) x quantization x loss family x participation x attack x
model x server optimizer x faults x backend, as ``allpairspy`` generates them
(deterministically: the same configurations each run). Besides, every fourth case uses
synthetic vectors instead of digits images, and every fifth gets a hostile extra (an
infinity, or an option that does not apply); an image model on vectors and every hostile
extra must be refused. (As pairwise factors, allpairs fills its free slots with them, and
most cases would be refused.)
"""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from allpairspy import AllPairs

from fedsim.algorithms import registry
from fedsim.config import ConfigError, validate_config
from fedsim.runner import run_experiment

STRATEGIES = registry.names()
FAMILY = {name: registry.get(name).family() for name in STRATEGIES}
# settings that make an algorithm's own machinery act within 2 steps on 5 clients
SMALL = {"gossip": {"topology": "ring"}, "fedlex": {"explore_rounds": 1, "scouts": 2}}
QUANT = {
    "none": {},
    "qat": {"qat": {"weight_bits": 8}},
    "qat_lsq": {"qat": {"weight_bits": 4, "lsq": True}},
    "lowbit": {"lowbit": {"bits": 8, "grad_bits": 8}},
    "qsgd_uplink": {"uplink": {"codec": "qsgd", "bits": 4}},
    "topk_ef": {"uplink": {"codec": "topk", "fraction": 0.1, "error_feedback": "ef"}},
    "topk_ef21": {"uplink": {"codec": "topk", "fraction": 0.1, "error_feedback": "ef21"}},
    "topk_econtrol": {"uplink": {"codec": "topk", "fraction": 0.1, "error_feedback": "econtrol", "eta": 0.1}},
    "qsgd_downlink": {"downlink": {"codec": "qsgd", "bits": 8}},
    "ptq": {"ptq": {"method": "rtn", "bits": 4}},
}
LOSSES = {
    "cross_entropy": {"name": "cross_entropy", "label_smoothing": 0.1},  # CE-like
    "auc_mw": {"name": "auc_mw"},  # binary surrogate, one-vs-rest on 10 classes
    "anyloss": {"name": "anyloss"},  # binary only: refused on 10 classes
    "multi_similarity": {"name": "multi_similarity"},  # metric
    "sogclr": {"name": "sogclr"},  # contrastive, per-sample state
}
PARTICIPATION = {
    "uniform": {"model": "uniform"},
    "bernoulli": {"model": "bernoulli", "p_low": 0.5, "p_high": 0.9},
    "markov": {"model": "markov", "p_low": 0.5, "p_high": 0.9, "p_off_to_on": 0.5},
    "cyclic": {"model": "cyclic", "num_groups": 2},
}
ATTACKS = {"none": {}, "sign_flip": {"name": "sign_flip", "fraction": 0.25},
           "label_flip": {"name": "label_flip", "fraction": 0.25}}
MODELS = ["mlp", "cnn", "lenet5", "resnet8"]
SERVER_OPT = ["sgd", "momentum", "adam"]
FAULTS = {"none": {}, "crash": {"crash": [1]}, "nan": {"nan": [2]}}
BACKENDS = ["inprocess", "batched"]
DATA = ["digits", "synthetic"]
EXTRAS = {"none": {}, "infinity": {"client": {"timeout_s": float("inf")}},
          "inapplicable": {"faults": {"slow_s": 5.0}}}  # stalls the clients of faults.slow: none

KEY_LINE = re.compile(r"^[a-z][a-z0-9_.]*: \S")
NUM_CLIENTS = 5
FACTORS = [STRATEGIES, list(QUANT), list(LOSSES), list(PARTICIPATION), list(ATTACKS), MODELS, SERVER_OPT, list(FAULTS),
           BACKENDS]


def _with_data_and_extra(cases) -> list[tuple]:
    """Each case with its data and hostile extra, counted per strategy (the j-th case of each
    strategy: synthetic when j % 4 == 3, an extra when j % 5 == 4), so that every strategy's
    first case is clean digits whatever the number of registered algorithms."""
    seen: dict[str, int] = {}
    out = []
    for case in cases:
        j = seen[case[0]] = seen.get(case[0], -1) + 1
        out.append((*case, DATA[j % 4 == 3], "none" if j % 5 != 4 else "infinity" if j % 10 == 4 else "inapplicable"))
    return out


CASES = _with_data_and_extra(AllPairs(FACTORS))
IMAGE_MODELS = ("cnn", "lenet5", "resnet8")


def must_be_refused(case) -> bool:
    """An image model on synthetic vectors, or a hostile extra."""
    return (case[5] in IMAGE_MODELS and case[9] == "synthetic") or case[10] != "none"


def build(strategy, quant, loss, participation, attack, model, server_opt, faults, backend, data, extra,
          out_dir) -> dict:
    """The raw config of one combination: 5 clients, 1 local step, 2 steps.

    The participation model and the server optimizer are options of the synchronous
    strategies; the asynchronous and gossip families get neither (that they refuse them is
    tested in test_contract.py), and run 2 steps of their own kind: 2 units of virtual
    time, or 2 gossip rounds."""
    raw = {
        "name": "combination", "seed": 0,
        "data": {"name": data},
        "partition": {"scheme": "dirichlet", "num_clients": NUM_CLIENTS, "alpha": 1.0},
        "model": {"name": model},
        "strategy": {"name": strategy},
        "client": {"local_steps": 1, "batch_size": 16, "lr": 0.05, "timeout_s": 60},
        "loss": LOSSES[loss],
        "quant": QUANT[quant],
        "attack": ATTACKS[attack],
        "sim": {"backend": backend},
        "faults": FAULTS[faults],
        "output": {"dir": str(out_dir), "plots": False, "checkpoint_every": 1},
    }
    if FAMILY[strategy] == "async":
        raw["strategy"].update(horizon=2.0, eval_every=1.0)
    else:
        raw["rounds"] = 2
    if FAMILY[strategy] == "sync":
        raw["participation"] = PARTICIPATION[participation]
        raw["strategy"]["server_opt"] = {"name": server_opt}
    raw["strategy"].update(SMALL.get(strategy, {}))
    for section, values in registry.get(strategy).requires.items():  # what it needs to run at all
        raw[section] = {**({"num_clients": NUM_CLIENTS} if section == "partition" else {}), **values}
    for section, values in EXTRAS[extra].items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def test_the_cases_cover_every_pair_of_values():
    factors = FACTORS
    covered = {(i, a, j, b) for case in CASES for i, a in enumerate(case[:9]) for j, b in enumerate(case[:9]) if i < j}
    wanted = {(i, a, j, b) for i, fa in enumerate(factors) for j, fb in enumerate(factors) if i < j
              for a in fa for b in fb}
    assert covered == wanted
    assert len(CASES) == len(STRATEGIES) * len(QUANT)  # the largest pair of factors, and no more


def outcome(case) -> str:
    try:
        validate_config(build(*case, out_dir="runs"))
    except ConfigError as exc:
        return str(exc)
    return "runs"


def test_most_combinations_run_and_every_strategy_and_quantization_runs_somewhere():
    outcomes = {case: outcome(case) for case in CASES}
    running = [case for case, result in outcomes.items() if result == "runs"]
    assert not [case for case in running if must_be_refused(case)]
    assert {case[10] for case in CASES} == set(EXTRAS) and {(case[5], case[9]) for case in CASES} >= {
        ("cnn", "synthetic"), ("mlp", "synthetic")}
    assert len(running) >= len([case for case in CASES if not must_be_refused(case)]) // 2, len(running)
    # an algorithm with its own loop (family custom: sgc's simulated workers) trains no client, and
    # refuses the client-side factors every case sets
    assert {case[0] for case in running} == {s for s in STRATEGIES if FAMILY[s] != "custom"}
    assert {case[1] for case in running} == set(QUANT)
    assert {case[5] for case in running} == set(MODELS)


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_a_combination_is_refused_in_one_line_or_runs_with_finite_metrics(case, tmp_path):
    raw = build(*case, out_dir=tmp_path / "runs")
    try:
        cfg = validate_config(raw)
    except ConfigError as exc:
        lines = str(exc).splitlines()  # one line per problem, each naming its key first
        assert lines and all(KEY_LINE.match(line) for line in lines), lines
        return
    assert not must_be_refused(case), case
    cfg_faulty = set(cfg.faults.crash) | set(cfg.faults.nan)
    path, summary = run_experiment(cfg)
    assert summary["status"] == "completed"
    json.loads((path / "summary.json").read_text())  # valid JSON: no bare NaN
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for failure in row.get("failures", []):
            assert failure["client"] in cfg_faulty, failure  # no client fails on its own
    for key in ("final_accuracy", "final_loss"):
        assert summary[key] is not None and math.isfinite(summary[key]), (key, summary[key])
    losses = [row["train_loss"] for row in rows if row.get("train_loss") is not None]
    assert all(math.isfinite(v) for v in losses), losses
    if cfg.quant.ptq is not None:
        assert 0.0 <= summary["ptq_accuracy"] <= 1.0
    assert yaml.safe_load((path / "config.yaml").read_text())["strategy"]["name"] == case[0]
