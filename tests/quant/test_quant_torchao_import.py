import subprocess
import sys


def test_importing_qat_prints_nothing_and_other_torchao_records_still_print():
    code = ("import logging; import fedsim.quant.qat; "
            "logging.getLogger('torchao').warning('Failed to load something else'); "
            "logging.getLogger('torchao').warning('an unrelated torchao warning')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr.splitlines() == ["Failed to load something else", "an unrelated torchao warning"]


def test_the_filter_is_gone_after_the_import():
    import logging

    import fedsim.quant.qat  # noqa: F401

    assert logging.getLogger("torchao").filters == []
    assert logging.getLogger("torch.utils._pytree").filters == []
