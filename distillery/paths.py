"""Where the artefacts this repository ships live: the toy model, its adapters, the oracle.

They sit beside the package in a source checkout (`make serve`); an installed copy (the Docker
image) names its folders through settings (DISTILLERY_MODEL_PATH, DISTILLERY_ADAPTERS_ROOT).
"""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
EMBEDDED_MODEL = MODELS_DIR / "toy"
EMBEDDED_XL_MODEL = MODELS_DIR / "toy-xl"  # the SDXL-family toy
EMBEDDED_ADAPTERS = MODELS_DIR / "adapters"
ORACLE_FILE = MODELS_DIR / "oracle" / "oracle.safetensors"
