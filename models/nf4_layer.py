"""``Linear4bit``: a linear layer whose weight is stored as NF4 (frozen), with bitsandbytes' state
dict key for key and byte for byte (the format is told in ``ember.models.nf4``'s docstring, which
re-exports the class and is where to import it from).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ember import EmberError
from ember.kernels.nf4 import NF4Weight, nf4_linear
from ember.models.bnb_format import nf4_from_bnb, nf4_to_bnb
from ember.models.nf4_storage import STORAGE_DTYPE, NF4Layout, pack_nf4, unpack_nf4


# ---------------------------------------------------------------------------------- Linear4bit
class Linear4bit(nn.Module):
    """y = x W^T + b with W stored as NF4 (frozen); output in x.dtype. ``quant_weight`` is None
    until a weight is set (``set_weight`` or ``load_state_dict``).

    Flat-storage mode (``store_flat_``): all the weight's NF4 bytes become one frozen 1-D
    Parameter, ``nf4_storage`` (``ember.models.nf4_storage``), and ``quant_weight`` is rebuilt
    from it at each use as views of whatever tensor that Parameter is then, so a wrapper that
    swaps Parameters (a data-parallel one sharding them, gathering them for the forward) moves
    the 4-bit base like any other weight. The state dict then holds ``nf4_storage`` rather
    than bitsandbytes' entries; the weight can no longer be replaced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device=None, dtype=None, quant_weight: NF4Weight | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.nf4_layout: NF4Layout | None = None  # set in flat-storage mode
        self.quant_weight = quant_weight
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = 64,
                    double_quant: bool = True) -> Linear4bit:
        q = cls(linear.in_features, linear.out_features, bias=False)
        q.set_weight(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
        return q

    def set_weight(self, weight: torch.Tensor | NF4Weight, *, blocksize: int = 64,
                   double_quant: bool = True) -> None:
        """Quantize a dense (out, in) weight on its device, or take an ``NF4Weight`` as is."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise EmberError(f"Linear4bit: weight of shape {tuple(weight.shape)} does not fit "
                             f"({self.out_features}, {self.in_features})")
        if isinstance(weight, torch.Tensor):
            if weight.device.type == "meta":
                raise EmberError("Linear4bit: cannot quantize a meta tensor; load real weights")
            weight = NF4Weight.quantize(weight, blocksize, double_quant)
        self.quant_weight = weight

    def _device(self):
        """Where a loaded weight goes: the current weight's device, else the bias's (unless meta),
        else wherever the state dict's tensor is."""
        if self.quant_weight is not None:
            return self.quant_weight.device
        if self.bias is not None and self.bias.device.type != "meta":
            return self.bias.device
        return None

    @property
    def quant_weight(self) -> NF4Weight | None:
        if self.nf4_layout is not None:
            return unpack_nf4(self.nf4_storage, self.nf4_layout)
        return self._quant_weight

    @quant_weight.setter
    def quant_weight(self, weight: NF4Weight | None) -> None:
        if self.nf4_layout is not None:
            raise EmberError("Linear4bit: this layer keeps its NF4 bytes as one parameter "
                             "(flat storage, e.g. sharded across processes); its weight cannot "
                             "be replaced")
        self._quant_weight = weight

    def store_flat_(self, layout: NF4Layout | None = None) -> None:
        """Switch to flat-storage mode (see the class docstring). Without ``layout``: pack the
        current weight. With one (e.g. another process's ``nf4_layout``): an uninitialized
        storage of that layout on the meta device, for a copy of a layer whose bytes arrive
        later (``load_state_dict``); the layer's weight, if any, is dropped."""
        if self.nf4_layout is not None:
            raise EmberError("Linear4bit: the NF4 weight is in flat storage already")
        if layout is None:
            if self._quant_weight is None:
                raise EmberError("Linear4bit: no NF4 weight to store; load the weights first")
            storage, layout = pack_nf4(self._quant_weight)
        else:
            storage = torch.empty(layout.numel, dtype=STORAGE_DTYPE, device="meta")
        if tuple(layout.shape) != (self.out_features, self.in_features):
            raise EmberError(f"Linear4bit: an NF4 layout of shape {layout.shape} does not fit "
                             f"({self.out_features}, {self.in_features})")
        self._quant_weight = None
        self.nf4_storage = nn.Parameter(storage, requires_grad=False)
        self.nf4_layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quant_weight
        if w is None:
            raise EmberError("Linear4bit has no weight yet: load a checkpoint or call set_weight")
        return nf4_linear(x, w, self.bias)

    def _apply(self, fn, recurse=True):
        # The NF4 bytes follow the module's device moves, never a dtype cast (which would break
        # them: exact absmax values, codes that are no numbers).
        if self.nf4_layout is not None:
            storage = self.nf4_storage
            probe = fn(torch.empty(0, dtype=storage.dtype, device=storage.device))
            if probe.dtype == storage.dtype:
                return super()._apply(fn, recurse)
            del self._parameters["nf4_storage"]
            try:
                super()._apply(fn, recurse)
            finally:
                self.nf4_storage = nn.Parameter(storage.to(probe.device), requires_grad=False)
            return self
        if self._quant_weight is not None:
            probe = fn(torch.empty(0, device=self._quant_weight.device))
            if probe.device != self._quant_weight.device:
                self._quant_weight = self._quant_weight.to(probe.device)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._quant_weight is not None:
            destination.update(nf4_to_bnb(self._quant_weight, prefix + "weight"))
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.nf4_layout is not None:  # nf4_storage is a Parameter like the bias
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
            return
        key = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        if key not in mine:
            missing_keys.append(key)
        else:
            device = self._device()
            try:
                if len(mine) == 1 and mine[key].is_floating_point():  # a dense checkpoint
                    w = mine[key].to(device) if device is not None else mine[key]
                    self.set_weight(w)
                else:
                    self.set_weight(nf4_from_bnb(mine, key, device))
            except EmberError as e:
                error_msgs.append(str(e))
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        qw, lay = self._quant_weight, self.nf4_layout
        nf4 = ("None" if qw is None else f"blocksize {qw.blocksize}, nested {qw.state.nested}")
        if lay is not None:
            nf4 = f"blocksize {lay.blocksize}, nested {lay.offset is not None}, flat storage"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nf4={nf4}")
