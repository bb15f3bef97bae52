"""``client.adversarial`` and ``eval.robust`` at validation: resolved defaults, one-line refusals
naming both keys, and resolved configs that validate again."""

from pathlib import Path

import pytest
import yaml

from fedsim.config import ConfigError, load_config, validate_config

QUICKSTART = Path(__file__).parents[2] / "configs" / "quickstart.yaml"
PLAY = "play.txt"  # validation reads the path, not the file


def test_pgd_resolves_madry_s_step_size_and_eval_robust_takes_the_clients_attack():
    cfg = load_config(QUICKSTART, ["client.adversarial.epsilon=0.2", "client.adversarial.norm=l2"])
    attack = cfg.client.adversarial
    assert (attack.method, attack.steps, attack.random_start) == ("pgd", 10, True)
    assert attack.step_size == pytest.approx(2.5 * 0.2 / 10)
    robust = cfg.eval.robust
    assert (robust.epsilon, robust.steps, robust.step_size, robust.norm) == (0.2, 10, pytest.approx(0.05), "l2")


def test_an_explicit_eval_robust_is_kept_beside_adversarial_clients():
    cfg = load_config(QUICKSTART, ["client.adversarial.method=fgsm", "eval.robust.epsilon=0.1", "eval.robust.steps=20"])
    assert (cfg.eval.robust.steps, cfg.client.adversarial.steps) == (20, 1)


@pytest.mark.parametrize("sets", [["client.adversarial.method=fgsm"], ["client.adversarial.steps=3"],
                                  ["eval.robust.epsilon=0.3"]])
def test_a_resolved_config_validates_again_to_itself(sets):
    cfg = load_config(QUICKSTART, sets)
    again = validate_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(("sets", "message"), [
    (["client.adversarial.method=fgsm", "client.adversarial.steps=3"],
     "client.adversarial: method fgsm is one step of size epsilon from the clean input; steps 3 cannot combine"),
    (["client.adversarial.method=fgsm", "client.adversarial.random_start=true"],
     "client.adversarial: method fgsm is one step of size epsilon from the clean input; random_start True"),
    (["eval.robust.epsilon=0.1", "eval.centralised=false"],
     "eval.robust: attacks the global model on the server's test set; eval.centralised is false"),
    (["eval.robust.epsilon=0.1", "strategy.name=gossip"],
     "eval.robust: attacks one global model; strategy.name is 'gossip'"),
    (["client.adversarial.epsilon=0.1", "personalization.method=ditto"],
     "client.adversarial: trains the global update on attacked batches; personalization.method 'ditto'"),
    (["eval.robust.epsilon=0.1", "data.name=shakespeare", f"data.path={PLAY}",
      "model.name=char_lstm"],
     "eval.robust: perturbs real-valued inputs within a norm ball; data.name 'shakespeare' gives token ids"),
    (["client.adversarial.epsilon=0.1", "data.name=shakespeare", f"data.path={PLAY}",
      "model.name=char_lstm"],
     "client.adversarial: perturbs real-valued inputs within a norm ball; data.name 'shakespeare' gives token ids"),
    (["client.adversarial.norm=l1"], "client.adversarial.norm: Input should be 'linf' or 'l2'"),
    (["client.adversarial.epsilon=0"], "client.adversarial.epsilon: Input should be greater than 0"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(sets, message):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, sets)
    lines = [line for line in str(err.value).splitlines() if message in line]
    assert lines, str(err.value)
