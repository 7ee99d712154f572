"""Our top-level `kernels` package must never pass for Hugging Face's `kernels` (PyPI) in their probes."""

import subprocess
import sys

PROBE = """
import kernels
assert hasattr(kernels, "lora_linear_reference"), kernels.__file__
from diffusers.utils import import_utils as d
from transformers.utils import import_utils as t
print(d.is_kernels_available(), t.is_kernels_available())
"""


def test_transformers_and_diffusers_do_not_see_hf_kernels(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
