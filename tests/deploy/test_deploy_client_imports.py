"""What a deployed ClientApp process imports: Flower starts one per message (unless a
long-lived ``fedsim clientapp`` process serves the node), so its import path is paid on
every message."""

import json
import subprocess
import sys

HEAVY = ("sklearn", "datasets", "flwr_datasets", "matplotlib", "pandas", "scipy", "torchao", "ray",
         "flwr.simulation", "fedsim.runner", "transformers", "peft", "tokenizers")


def test_the_clientapp_module_imports_only_what_a_client_needs():
    code = ("import json, sys; import fedsim.deploy; from fedsim.sim.client_app import build_client_app; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
    assert result.stderr == ""  # nothing printed that the user did not ask for

