"""sinkdlm.hf.from_pretrained: load (remote-code models included), apply shims, restore the sink."""


def from_pretrained(path, **kwargs):
    raise NotImplementedError
