"""A checkpoint under the names transformers' own class gives its tensors.

transformers 5 renames some stored keys when it loads (GPT-NeoX's ``embed_out`` is its ``lm_head``) and writes
the old names back when it saves; its conversion mapping lists the renames. They are applied here, as views of
the stored keys. Conversions that merge stored tensors (experts fused into one) are not: the zoo runs those
families itself.
"""
from __future__ import annotations

from runner.errors import CheckpointError
from runner.load.checkpoint.base import TensorEntry
from runner.load.checkpoint.names import NameMap, Source


def transformers_names(model_class: type, stored: dict[str, TensorEntry]) -> NameMap | None:
    """The renames transformers applies to ``model_class``'s checkpoints; None where it applies none.

    Raises:
        CheckpointError: the class merges stored tensors on load, which the runner does not do.
    """
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers without conversion mappings loads keys as stored
        return None
    model_type = getattr(getattr(model_class, "config_class", None), "model_type", None)
    rules = get_checkpoint_conversion_mapping(model_class.__name__) or \
        (get_checkpoint_conversion_mapping(model_type) if model_type else None) or []
    if not rules:
        return None
    sources = {}
    for key in stored:
        name = key
        for rule in rules:
            renamed, matched = rule.rename_source_key(name)
            if matched is None:
                continue
            if not isinstance(rule, WeightRenaming):
                raise CheckpointError(f"{stored[key].file}: transformers' {model_class.__name__} merges stored tensors "
                                      f"such as {key} when it loads them, which the runner does not do; run the zoo's "
                                      "fast path for this family (model.fast_path=true)")
            name = renamed
        sources[name] = Source(key)
    return NameMap(sources)
