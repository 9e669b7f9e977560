"""A trainable sparse delta on the weights of ``nn.Linear`` modules, for any PyTorch model.

``attach_sparse_deltas`` swaps each chosen ``nn.Linear`` for a ``SparseDeltaLinear`` that keeps
the frozen ``weight``/``bias`` (same attribute names, so the model's own state-dict keys are
unchanged) and adds a buffer of flat ``indices`` and one trainable parameter ``delta`` of k
values. The layer computes ``x @ (W + scatter(delta))^T + b``.

Two gradient paths, equal up to float rounding:
- ``sparse`` (default): a custom autograd function gets the gradient of each delta entry (i, j)
  directly as sum over tokens of grad_out[..., i] * x[..., j], in chunks, never forming the
  dense weight gradient;
- ``dense``: the reference, autograd through a dense scatter (forms the dense gradient, then
  gathers the k entries).

Deltas are saved as safetensors (``<module>.indices`` int32, ``<module>.values`` in the weight
dtype) and can be loaded onto a fresh base model, attached or merged into its weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from gem_bench.errors import ConfigError

GRAD_MODES = ("sparse", "dense")
DELTA_INITS = ("zero", "weight")
FORMAT = "gem-bench-sparse-delta"
FORMAT_VERSION = "1"
# Bound on the elements of one transient buffer of the direct delta gradient (a gather of
# tokens x entries, or a block of rows x in_features of the weight gradient): 16 MiB in fp32.
_CHUNK_ELEMENTS = 1 << 22
# From this share of a matrix's entries up, one (blocked) matrix product of grad_out and x
# beats gathering two token columns per entry (on a 2-core CPU the crossover is near 0.5%).
_PRODUCT_DENSITY = 1 / 256


def _effective_weight(weight: Tensor, indices: Tensor, delta: Tensor) -> Tensor:
    """W with delta added at the flat indices. The same arithmetic as merging (one add in the
    weight dtype), so a merged model computes exactly what the attached one does."""
    flat = weight.detach().reshape(-1).clone()
    flat[indices] += delta.detach().to(flat.dtype)
    return flat.view_as(weight)


def _delta_grad(grad_out: Tensor, x: Tensor, indices: Tensor, in_features: int) -> Tensor:
    """d loss / d delta for flat entries (i, j): sum over tokens of grad_out[:, i] * x[:, j] (fp32).

    Few entries: gather the two token columns of each entry. Many: the matrix product
    grad_out^T x, one block of output rows at a time, keeping only the chosen entries (the
    indices are sorted, so each block's entries are one slice). Either way no buffer exceeds
    ``_CHUNK_ELEMENTS``, far below a dense weight gradient for large matrices."""
    g = grad_out.reshape(-1, grad_out.shape[-1])
    inputs = x.reshape(-1, x.shape[-1])
    out_features, tokens = g.shape[1], g.shape[0]
    out = torch.empty(indices.numel(), dtype=torch.float32, device=g.device)
    if indices.numel() >= _PRODUCT_DENSITY * out_features * in_features:
        g, inputs = g.float(), inputs.float()
        rows = max(1, _CHUNK_ELEMENTS // in_features)
        starts = torch.arange(0, out_features + rows, rows, device=indices.device)
        bounds = torch.searchsorted(indices, starts * in_features).tolist()
        for first, lo, hi in zip(starts.tolist(), bounds[:-1], bounds[1:]):
            if lo < hi:
                product = g[:, first : first + rows].t() @ inputs  # (rows, in_features)
                out[lo:hi] = product.reshape(-1)[indices[lo:hi] - first * in_features]
        return out
    row, col = indices // in_features, indices % in_features
    step = max(1, _CHUNK_ELEMENTS // max(1, tokens))
    for start in range(0, indices.numel(), step):
        r, c = row[start : start + step], col[start : start + step]
        out[start : start + step] = (g.index_select(1, r).float() * inputs.index_select(1, c).float()).sum(0)
    return out


class _SparseDeltaLinearFn(torch.autograd.Function):
    """y = x @ (W + scatter(delta))^T + b, with the delta's gradient computed directly."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, indices):
        ctx.save_for_backward(x, delta, weight, indices)
        ctx.has_bias = bias is not None
        # Under autocast F.linear casts here as it would in a plain nn.Linear.
        return F.linear(x, _effective_weight(weight, indices, delta), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, delta, weight, indices = ctx.saved_tensors
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Recompute W + delta rather than keep a dense copy alive between forward and backward.
            effective = _effective_weight(weight, indices, delta).to(grad_out.dtype)
            grad_x = (grad_out @ effective).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_delta = _delta_grad(grad_out, x, indices, weight.shape[1]).to(delta.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_delta, None, grad_bias, None


class SparseDeltaLinear(nn.Module):
    """An ``nn.Linear`` whose weight is frozen except for a trainable delta at k flat indices.

    ``delta_init="zero"`` starts the delta at zero (a correct sparse fine-tune).
    ``delta_init="weight"`` reproduces the released GEM code's quirk: the delta starts as a copy
    of the chosen weights, so those entries start at 2w.

    The delta has the weight's dtype: train low-precision models with fp32 weights under
    autocast, or small updates are lost to bf16/fp16 rounding of W + delta.
    """

    def __init__(
        self,
        base: nn.Linear,
        indices: Tensor,
        grad_mode: str = "sparse",
        delta_init: str = "zero",
    ):
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise ConfigError(f"unknown grad_mode {grad_mode!r}; valid choices: {', '.join(GRAD_MODES)}")
        if delta_init not in DELTA_INITS:
            raise ConfigError(f"unknown delta_init {delta_init!r}; valid choices: {', '.join(DELTA_INITS)}")
        weight = base.weight
        indices = _check_indices(indices, weight.numel()).to(weight.device)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.grad_mode = grad_mode
        # The original module and its flags, so that detaching restores it exactly.
        self._base = (base, weight.requires_grad, base.bias is not None and base.bias.requires_grad)
        weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.weight = weight
        self.bias = base.bias
        self.register_buffer("indices", indices)
        if delta_init == "weight":
            init = weight.detach().reshape(-1)[indices].clone()
        else:
            init = torch.zeros(indices.numel(), dtype=weight.dtype, device=weight.device)
        self.delta = nn.Parameter(init)

    def forward(self, x: Tensor) -> Tensor:
        if self.grad_mode == "sparse":
            return _SparseDeltaLinearFn.apply(x, self.delta, self.weight, self.bias, self.indices)
        dense = torch.zeros(self.weight.numel(), dtype=self.weight.dtype, device=self.weight.device)
        dense = dense.scatter(0, self.indices, self.delta.to(self.weight.dtype))
        return F.linear(x, self.weight + dense.view_as(self.weight), self.bias)

    def merged_weight(self) -> Tensor:
        return _effective_weight(self.weight, self.indices, self.delta)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"k={self.indices.numel()}, grad_mode={self.grad_mode}"
        )


def _check_indices(indices: Tensor, numel: int) -> Tensor:
    """Flat indices as a sorted int64 tensor; rejects duplicates and out-of-range values."""
    indices = torch.as_tensor(indices)
    if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex():
        raise ValueError(
            f"indices must be a 1-D integer tensor, got {indices.dtype} of shape {tuple(indices.shape)}"
        )
    indices = torch.sort(indices.long()).values
    if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= numel):
        raise ValueError(f"indices must lie in [0, {numel}), got [{int(indices[0])}, {int(indices[-1])}]")
    if indices.numel() > 1 and bool((indices[1:] == indices[:-1]).any()):
        raise ValueError("indices contain duplicates")
    return indices


def _module_name(param_name: str) -> str:
    if not param_name.endswith(".weight"):
        raise ValueError(f"expected a Linear weight name ending in '.weight', got {param_name!r}")
    return param_name[: -len(".weight")]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def sparse_modules(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


def delta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable deltas of every attached module (what the optimizer gets)."""
    return [m.delta for m in sparse_modules(model).values()]


def eligible_weights(model: nn.Module, target_modules: Iterable[str] | str) -> dict[str, nn.Parameter]:
    """Weights of the ``nn.Linear`` modules whose name's last component is in ``target_modules``,
    keyed by parameter name (e.g. ``model.layers.0.self_attn.q_proj.weight``)."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = {f"{name}.weight": m.weight for name, m in linears if name.rpartition(".")[2] in targets}
    if not found:
        examples = sorted({name.rpartition(".")[2] for name, _ in linears})[:8]
        raise ConfigError(
            f"no nn.Linear module is named one of {targets}; this model's Linear modules "
            f"end in: {examples or 'none'}"
        )
    return found


def attach_sparse_deltas(
    model: nn.Module,
    indices: dict[str, Tensor],
    grad_mode: str = "sparse",
    delta_init: str = "zero",
) -> dict[str, SparseDeltaLinear]:
    """Replace each ``nn.Linear`` named by ``indices`` (keys: weight names) with a
    ``SparseDeltaLinear`` training the given flat entries. Matrices given no entries stay plain
    ``nn.Linear`` (nothing to train, no overhead). Returns {module name: module}."""
    attached = {}
    for param_name, idx in indices.items():
        name = _module_name(param_name)
        if torch.as_tensor(idx).numel() == 0:
            continue
        module = model.get_submodule(name)
        if isinstance(module, SparseDeltaLinear):
            raise ValueError(f"{name} already has a sparse delta; detach it first")
        if not isinstance(module, nn.Linear) or not module.weight.is_floating_point():
            raise ValueError(f"{name} is a {type(module).__name__}, not a floating-point nn.Linear")
        attached[name] = SparseDeltaLinear(module, idx, grad_mode=grad_mode, delta_init=delta_init)
        _set_submodule(model, name, attached[name])
    return attached


@torch.no_grad()
def detach_sparse_deltas(model: nn.Module, merge: bool) -> list[str]:
    """Put the original ``nn.Linear`` modules back (with their requires_grad flags); with
    ``merge`` the deltas are folded into their weights first. Returns the module names."""
    names = []
    for name, module in sparse_modules(model).items():
        base, weight_grad, bias_grad = module._base
        base.weight, base.bias = module.weight, module.bias  # in case a conversion replaced them
        if merge:
            base.weight.view(-1)[module.indices] += module.delta.to(base.weight.dtype)
        base.weight.requires_grad_(weight_grad)
        if base.bias is not None:
            base.bias.requires_grad_(bias_grad)
        _set_submodule(model, name, base)
        names.append(name)
    return names


def merge_sparse_deltas(model: nn.Module) -> list[str]:
    """Fold every delta into its weight and restore plain ``nn.Linear`` modules."""
    return detach_sparse_deltas(model, merge=True)


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def sparse_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """{"<module>.indices": int32/int64, "<module>.values": delta in the weight dtype}."""
    state = {}
    for name, m in sparse_modules(model).items():
        state[f"{name}.indices"] = m.indices.to(_index_dtype(m.weight.numel()))
        state[f"{name}.values"] = m.delta.detach()
    return state


def _group_state(state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    names = {key.rpartition(".")[0] for key in state}
    groups = {}
    for name in sorted(names):
        if f"{name}.indices" not in state or f"{name}.values" not in state:
            raise ValueError(f"sparse state for {name} needs both '{name}.indices' and '{name}.values'")
        idx, values = state[f"{name}.indices"], state[f"{name}.values"]
        if idx.shape != values.shape:
            raise ValueError(f"{name}: {idx.numel()} indices but {values.numel()} values")
        groups[name] = (idx, values)
    return groups


@torch.no_grad()
def load_sparse_state_dict(
    model: nn.Module, state: dict[str, Tensor], merge: bool = False, grad_mode: str = "sparse"
) -> list[str]:
    """Apply a ``sparse_state_dict``: copy into already-attached deltas (same indices), attach
    new ones on plain ``nn.Linear`` modules, or with ``merge`` add the values into the dense
    weights directly. Returns the module names."""
    groups = _group_state(state)
    for name, (idx, values) in groups.items():
        module = model.get_submodule(name)
        order = torch.argsort(idx.long())  # attached modules keep their indices ascending
        idx, values = idx.long()[order].to(module.weight.device), values[order]
        if isinstance(module, SparseDeltaLinear):
            if merge:
                raise ValueError(f"{name} has a delta attached already; call merge_sparse_deltas instead")
            if not torch.equal(module.indices, idx):
                raise ValueError(f"{name}: the saved indices differ from the attached ones")
            module.delta.copy_(values)
        elif isinstance(module, nn.Linear):
            idx = _check_indices(idx, module.weight.numel())
            if merge:
                # Same arithmetic as SparseDeltaLinear's forward: identical outputs after merging.
                module.weight.view(-1)[idx] += values.to(module.weight.device, module.weight.dtype)
            else:
                attached = attach_sparse_deltas(model, {f"{name}.weight": idx}, grad_mode=grad_mode)[name]
                attached.delta.copy_(values)
        else:
            raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear")
    return list(groups)


def save_sparse_delta(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write every attached delta to one safetensors file: int32 indices (where the matrix has
    fewer than 2**31 entries) and values in the weight dtype, so at most 12 bytes per entry plus
    the header. The format, its version and each matrix's shape are in the file's metadata."""
    modules = sparse_modules(model)
    if not modules:
        raise ValueError("the model has no sparse deltas attached; nothing to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.detach().contiguous().cpu() for key, t in sparse_state_dict(model).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "shapes": json.dumps({name: list(m.weight.shape) for name, m in modules.items()}),
        **(metadata or {}),
    }
    save_file(tensors, str(path), metadata=meta)
    return path


def read_sparse_delta(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a delta file, after checking its format."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file (metadata format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {meta.get('format_version')!r}; this code reads {FORMAT_VERSION!r}"
            )
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return tensors, meta


def load_sparse_delta(
    model: nn.Module, path: str | Path, merge: bool = False, grad_mode: str = "sparse"
) -> list[str]:
    """Load a delta file onto a base model: attach trainable deltas, or (``merge``) add them
    into the dense weights. Checks each matrix's shape against the file. Returns module names."""
    tensors, meta = read_sparse_delta(path)
    for name, shape in json.loads(meta["shapes"]).items():
        module = model.get_submodule(name)
        actual = list(module.weight.shape)
        if actual != shape:
            raise ValueError(f"{name}: the file's weight shape {shape} != the model's {actual}")
    return load_sparse_state_dict(model, tensors, merge=merge, grad_mode=grad_mode)


def _causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The model's own causal-LM loss; without labels, the inputs minus padding."""
    if "labels" not in batch:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch = {**batch, "labels": labels}
    return model(**batch).loss


def calibration_gradients(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    target_modules: Iterable[str] | str,
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Gradients of the eligible weights summed over ``batches`` (fp32), {weight name: grad}.

    Only the eligible weights require grad during the pass (cheaper backward); every
    requires_grad flag and the train/eval mode are restored afterwards, and no ``.grad`` is
    left behind. Dropout is on (train mode), as in the released code. Batches are dicts of
    input_ids / attention_mask / labels, moved to the model's device.
    """
    params = eligible_weights(model, target_modules)
    loss_fn = loss_fn or _causal_lm_loss
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    device = next(iter(params.values())).device
    grads = {name: torch.zeros(p.shape, dtype=torch.float32, device=device) for name, p in params.items()}
    seen = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        model.train()
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            loss = loss_fn(model, batch)
            step = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, g in zip(params, step):
                if g is not None:  # None: the weight did not take part in this loss
                    grads[name] += g.float()
            seen += 1
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibration got no batches")
    return grads
