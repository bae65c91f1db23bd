"""ModelSpec: every tensor a loaded model keeps, with its shape and role, from config.json or safetensors headers.

Two sources, in this order of trust:
1. ``safetensors`` headers in a local model directory: shapes and stored dtypes are read, not derived.
2. ``config.json`` alone (a local file/dir, or a catalog name): shapes are derived per architecture family, with
   the module names and shapes transformers 5 builds (checked against ``AutoModelForCausalLM.from_config`` on tiny
   configs in ``tests/calibration/``).

Roles decide how a quantization scheme treats a tensor (see ``planner/model/quant/``):
``linear`` (weight of an exact ``nn.Linear``: what bitsandbytes replaces), ``bias``, ``embedding``, ``lm_head``,
``norm``, ``router`` (MoE gate, not an nn.Linear in transformers 5), ``experts`` (fused 3-D expert weights, not
nn.Linear in transformers 5), ``buffer`` (non-parameter tensors such as rotary ``inv_freq``), ``other``.

The package: ``types`` (the values), ``load`` (the one dispatch: ``load_spec``), and one reader per source:
``from_config``, ``from_safetensors``, ``from_gguf``.
"""

from planner.model.spec.types import PARAM_ROLES, ROLES, ArchDims, ModelSpec, TensorSpec  # noqa: F401
from planner.model.spec.from_config import supported_model_types  # noqa: F401
from planner.model.spec.from_safetensors import role_from_name  # noqa: F401
from planner.model.spec.from_gguf import spec_from_gguf  # noqa: F401
from planner.model.spec.load import CATALOG_DIR, _catalog_path, catalog_names, load_spec  # noqa: F401
