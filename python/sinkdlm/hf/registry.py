"""One table from architecture to the way add_sink_token patches it (in the spirit of
Liger-Kernel's ``MODEL_TYPE_TO_APPLY_LIGER_FN``).

A key is either a transformers ``config.model_type`` (its attention calls
``ALL_ATTENTION_FUNCTIONS``: the native backend, hf/native.py) or the class name of a remote-code
attention module (an adapter rewrites that class's method, hf/adapters.py). Remote code is keyed
by the attention class because that is what the adapter depends on; its model types differ
between checkpoints, forks and mirrors. A value makes the backend for one model, or returns None
when it cannot patch that model after all.

Backends have ``name`` (recorded in ``config.sinkdlm``) and ``install(state)``,
``uninstall(state)``, ``decoder_layers(state)``, ``channel(state, layer_kwargs)``,
``sink_input(state, embeds)``, ``run_sink_row(state, layer_forward, hidden, position_ids,
collector)``, ``main(state, channel, args, kwargs)`` and ``attention_layers(state)`` (see
hf/patch.py).
"""

from collections.abc import Callable

PATCH_PATHS: dict[str, Callable] = {}


def register_patch_path(architecture: str, make_backend: Callable) -> None:
    """Makes ``make_backend(model) -> backend or None`` the patch path of ``architecture``."""
    PATCH_PATHS[architecture] = make_backend


def backend_for(model, host):
    """The backend for ``model`` (``host``: its base model): the first of its attention classes
    in the table, else its model type. Raises ValueError, listing the table, when none fits."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    # Along each class hierarchy: FSDP2's fully_shard subclasses the modules it wraps.
    keys = [k.__name__ for module in host.modules() for k in type(module).__mro__] + [model_type]
    for key in keys:
        make_backend = PATCH_PATHS.get(key)
        backend = None if make_backend is None else make_backend(model)
        if backend is not None:
            return backend
    raise ValueError(
        f"sinkdlm cannot add the sink token to {type(model).__name__} (model_type={model_type!r}). "
        f"Supported (transformers model types, then remote-code attention classes): "
        f"{list(PATCH_PATHS)}. Add an architecture with sinkdlm.hf.register_adapter "
        "(see sinkdlm/hf/adapters.py)."
    )
