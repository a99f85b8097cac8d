"""The model card written beside exported weights (the model hub's README.md convention), so an
export folder can be uploaded as it is."""

from __future__ import annotations

from typing import Any

import yaml

from smpo.methods import get_method


def model_card(config: Any, family: str, *, kind: str, steps: int, metrics: dict[str, float] | None = None,
               evaluation: dict[str, Any] | None = None) -> str:
    """README.md text: YAML metadata (base model, licence, tags), then method, data, the full
    training config, the last training metrics and the evaluation figures if there are any.

    ``kind``: ``unet`` / ``transformer`` (full weights: the family's network class
    ``.from_pretrained``) or ``lora`` (``pipeline.load_lora_weights``).
    """
    objective = config.objective.resolved()
    method = get_method(objective.method)
    base = config.model.pretrained
    meta = {
        "base_model": base, "library_name": "diffusers", "license": "other",
        "license_name": "same-as-base-model",
        "tags": ["text-to-image", "diffusers", "smpo", objective.method, family, kind],
    }
    from smpo.models import FAMILIES

    adapter = FAMILIES[family]
    pipeline, network_class, network = adapter.pipeline_class, adapter.network_class, adapter.network_folder
    if kind == "lora":
        usage = (f"pipe = {pipeline}.from_pretrained(\"{base}\")\n"
                 "pipe.load_lora_weights(\"THIS_FOLDER_OR_REPO\")")
    else:
        usage = (f"{network} = {network_class}.from_pretrained(\"THIS_FOLDER_OR_REPO\")\n"
                 f"pipe = {pipeline}.from_pretrained(\"{base}\", {network}={network})")
    data = config.data.cache or config.data.dataset
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {method.description} fine-tune of `{base}`", "",
        f"{'LoRA adapters' if kind == 'lora' else 'Full ' + {'unet': 'UNet'}.get(network, network) + ' weights'} trained with "
        f"smpo `smpo train` ({steps} optimizer steps).", "",
        "## Method", "",
        f"- method: `{method.name}` ({method.description}" + (f", {method.paper}" if method.paper else "") + ")",
        f"- noising: `{objective.noising}`, labels: `{objective.labels}`, beta: {objective.beta:g}"
        + (f", gamma: {objective.gamma:g}" if method.smoothed_labels else ""),  # gamma: Eq. 12's sensitivity
        "", "## Data", "", f"- `{data}` (`{'smpo cache' if config.data.cache else 'smpo label'}` output)", "",
        "## Use", "", "```python", f"from diffusers import {pipeline}, {network_class}", "", usage, "```", "",
        "## Training config", "", "```yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).strip(), "```", "",
    ]
    if metrics:
        lines += ["## Last training step", "", "| metric | value |", "|---|---|",
                  *(f"| {k} | {v:.6g} |" for k, v in metrics.items() if isinstance(v, (int, float))), ""]
    if evaluation:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in evaluation.items()), ""]
    else:
        lines += ["## Evaluation", "", "Not evaluated at export; `smpo generate` + `smpo evaluate` + "
                  "`smpo compare` measure it against the base model.", ""]
    lines += ["## Licence", "", f"The weights inherit the licence of the base model `{base}`; read its "
              "model card before use or redistribution.", ""]
    return "\n".join(lines)
