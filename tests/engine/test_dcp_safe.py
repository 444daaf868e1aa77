"""A checkpoint folder runs no code when Ember reads it: torch's DCP reader unpickles
``.metadata`` with plain ``pickle`` and its non-tensor items with ``torch.load(weights_only=False)``
(shown here to run a crafted file's code), Ember's reads (resume, eval and export of a run) refuse
such a file (engine/dcp_safe.py) and still load every checkpoint Ember writes."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from ember import EmberError
from ember.engine import dcp
from ember.engine.dcp_safe import safe_unpickling


class _Marker:
    """Unpickled, it writes a file: the code a crafted checkpoint would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def _saved(tmp_path, evil_group_value=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    if evil_group_value is not None:
        opt.param_groups[0]["note"] = evil_group_value
    folder = dcp.save(tmp_path / "ckpt", 1, model=model, optimizer=opt, extra={"x": 1})
    return folder, model, opt


def _fresh():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _rewrite(folder, name: str, data: bytes) -> None:
    """Replace file ``name`` and vouch for it in the manifest, as a crafted folder would."""
    import hashlib

    (folder / name).write_bytes(data)
    manifest = json.loads((folder / dcp.MANIFEST).read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / dcp.MANIFEST).write_text(json.dumps(manifest))


def test_ember_checkpoints_load_through_the_restricted_reader(tmp_path):
    folder, model, opt = _saved(tmp_path)
    fresh, fresh_opt = _fresh()
    loaded = dcp.load(folder, model=fresh, optimizer=fresh_opt)
    assert loaded.step == 1 and loaded.extra == {"x": 1}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(),
                                                 strict=True))
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert want["param_groups"] == got["param_groups"]
    for i, s in want["state"].items():
        assert all(torch.equal(s[k], got["state"][i][k]) for k in s)


def test_crafted_metadata_runs_no_code(tmp_path):
    import torch.distributed.checkpoint as tdcp

    folder, _, _ = _saved(tmp_path)
    marker = tmp_path / "ran.txt"
    real = pickle.loads((folder / ".metadata").read_bytes())

    _rewrite(folder, ".metadata", pickle.dumps((_Marker(marker), real)))
    with pytest.raises(AttributeError):  # torch's reader ran the code, then found a tuple
        tdcp.FileSystemReader(str(folder)).read_metadata()
    assert marker.read_text() == "ran"
    marker.unlink()
    fresh, fresh_opt = _fresh()
    with pytest.raises(EmberError, match=r"builtins.exec is not a checkpoint metadata record"):
        dcp.load(folder, model=fresh, optimizer=fresh_opt)
    with pytest.raises(EmberError, match="metadata"):
        dcp.load_model_weights(folder, fresh)
    assert not marker.exists()


def test_a_crafted_item_runs_no_code(tmp_path):
    """A non-tensor item (an optimizer hyperparameter) holding code: torch.load(weights_only=
    False), DCP's read of such items, runs it; Ember's read refuses it."""
    marker = tmp_path / "ran.txt"
    folder, _, _ = _saved(tmp_path, evil_group_value=_Marker(marker))
    assert not marker.exists()  # writing it runs nothing
    fresh, fresh_opt = _fresh()
    fresh_opt.param_groups[0]["note"] = None  # a model whose optimizer asks for that item
    with pytest.raises(EmberError, match="more than tensors and plain values"):
        dcp.load(folder, model=fresh, optimizer=fresh_opt)
    assert not marker.exists()
    fresh, fresh_opt = _fresh()
    fresh_opt.param_groups[0]["note"] = None
    import torch.distributed.checkpoint as tdcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(fresh, fresh_opt)
    with pytest.warns(UserWarning):
        tdcp.load({"model": msd, "optim": osd}, checkpoint_id=str(folder))  # the oracle
    assert marker.read_text() == "ran"


def test_the_patch_is_undone_on_error():
    real = torch.load
    with pytest.raises(RuntimeError), safe_unpickling():
        assert torch.load is not real
        raise RuntimeError
    assert torch.load is real


def _dotted_global(module: str, name: str) -> bytes:
    """A protocol-4 pickle calling ``module``'s attribute path ``name`` with no arguments."""
    def text(s: str) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode()

    return (b"\x80\x04" + text(module) + pickle.MEMOIZE + text(name) + pickle.MEMOIZE
            + pickle.STACK_GLOBAL + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP)


def test_a_dotted_name_reaches_no_record_outside_dcp(tmp_path):
    """A protocol-4 global's name is an attribute path: from a DCP module, "torch.x.Y" walked to
    any dataclass of any module (FSDP's MixedPrecisionPolicy here, built by plain pickle, the
    oracle) and constructed it. Only DCP's own records are named."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    crafted = _dotted_global("torch.distributed.checkpoint.metadata",
                             "torch.distributed.fsdp.MixedPrecisionPolicy")
    assert isinstance(pickle.loads(crafted), MixedPrecisionPolicy)  # what torch's reader does
    folder, _, _ = _saved(tmp_path)
    _rewrite(folder, ".metadata", crafted)
    fresh, fresh_opt = _fresh()
    with pytest.raises(EmberError, match="is not a checkpoint metadata record"):
        dcp.load(folder, model=fresh, optimizer=fresh_opt)


def test_blocks_in_two_threads_leave_torch_load_as_it_was():
    """A enters, B enters, A leaves, B leaves: without the lock B restored A's restricted
    torch.load for good; with it B waits for A to leave."""
    import threading

    real = torch.load
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with safe_unpickling():
            a_in.set()
            b_in.wait(0.5)  # the lock keeps B out: times out
        a_out.set()

    def b():
        a_in.wait(5)
        with safe_unpickling():
            b_in.set()
            a_out.wait(5)

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.load is real
