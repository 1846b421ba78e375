"""Finding the sink embedding a checkpoint was saved with (local directory or hub cache)."""

import json
import os

SINK_MODULE = "sink_embedding"  # the base model's submodule; saved as "...sink_embedding.weight"


def checkpoint_files(path):
    """The .safetensors files of a local directory or of a hub id already in the local cache."""
    if os.path.isdir(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    from transformers.utils import cached_file

    try:
        index = cached_file(
            path,
            "model.safetensors.index.json",
            local_files_only=True,
            _raise_exceptions_for_missing_entries=False,
        )
        if index is not None:
            with open(index) as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            return [cached_file(path, shard, local_files_only=True) for shard in shards]
        single = cached_file(
            path,
            "model.safetensors",
            local_files_only=True,
            _raise_exceptions_for_missing_entries=False,
        )
        return [] if single is None else [single]
    except (OSError, ValueError, KeyError):
        return []


def saved_sink_weight(model):
    """The sink embedding saved with the checkpoint ``model`` was loaded from, or None."""
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path:
        return None
    from safetensors import safe_open

    for name in checkpoint_files(str(path)):
        with safe_open(name, framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(f"{SINK_MODULE}.weight"):
                    return handle.get_tensor(key)
    return None
