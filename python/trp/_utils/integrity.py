"""SHA-256 seals for the files trp writes (trp.save model files and `trp train` checkpoints).

torch's zip container does not verify its CRCs on load, so a flipped byte inside a tensor loads silently
(a weight of 0.043 became -43.9 in one reported case). Each file therefore carries a digest of everything
it holds, checked on every load."""
import hashlib

import torch


def digest(header, tensors):
    """Hex SHA-256 over repr(header) (plain data) and every tensor of {name: tensor}, by sorted name, with
    its dtype and shape. repr is stable for the plain data torch.load(weights_only=True) returns (dict
    order survives pickling)."""
    h = hashlib.sha256(repr(header).encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _split(obj, path, tensors):
    """obj with every tensor replaced by a ("<tensor>", path) marker; the tensors go to `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return ("<tensor>", path)
    if isinstance(obj, dict):
        out = {k: _split(v, f"{path}/{k!r}", tensors) for k, v in obj.items()}
        meta = getattr(obj, "_metadata", None)  # state_dict versions: load_state_dict reads them
        return out if meta is None else ("<dict>", out, _split(meta, f"{path}#metadata", tensors))
    if isinstance(obj, (list, tuple)):
        items = [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return obj


def digest_tree(obj):
    """digest() of a nested structure of dicts, lists, tuples, tensors and plain values."""
    tensors = {}
    header = _split(obj, "", tensors)
    return digest(header, tensors)


SEAL = "sha256"  # the key of the seal in a sealed dict


def unsealed(obj):
    """The dict `obj` without its seal."""
    return {k: v for k, v in obj.items() if k != SEAL}


def seal_problem(obj, expected):
    """The sealed-file check: None when obj[SEAL] equals expected() (the digest of what obj holds, computed
    only when there is a seal to compare), "missing" when obj has no seal, "mismatch" when it differs."""
    if not isinstance(obj.get(SEAL), str):
        return "missing"
    return None if obj[SEAL] == expected() else "mismatch"


__all__ = ["digest", "digest_tree", "SEAL", "unsealed", "seal_problem"]
