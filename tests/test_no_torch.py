"""The estimate path is pure arithmetic: it must not import torch (users sweep thousands of configs)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.fast


def test_api_and_cli_do_not_import_torch():
    code = (
        "import sys\n"
        "import lora_cost\n"
        "lora_cost.estimate('llama-3.1-8b', 'qlora', r=64, targets='all-linear', seq=2048)\n"
        "from click.testing import CliRunner\n"
        "from lora_cost.cli import main\n"
        "r = CliRunner().invoke(main, ['estimate', '--model', 'gpt2', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "from lora_cost.analytic.methods import all_methods\n"
        "for name, m in all_methods().items():\n"
        "    lora_cost.estimate('gpt2', name, precision='bf16' if m.precisions and 'fp32' not in m.precisions else 'fp32',"
        " serving=True)\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'plotly', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
