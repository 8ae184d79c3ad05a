"""ADMM weight pruning: minimise loss(W) subject to W having at most k nonzeros.

Splitting W = Z with Z in the sparsity set S gives the scaled augmented Lagrangian
``loss(W) + rho/2 * ||W - Z + U||^2``, minimised by alternating

- W-step: ordinary training, with ``rho * (W - Z + U)`` added to the gradients after backward
  (``add_penalty_grad``), so any loss and any training loop work;
- Z-step: ``Z = project_S(W + U)``, the k largest magnitudes of W + U (``update``);
- U-step: ``U += W - Z`` (``update``).

``scope="global"`` uses one budget k = round((1 - sparsity) * N) over all N prunable weights
together (Lee et al., IJCIS 2023); ``scope="layerwise"`` gives each layer its own ratio
(Zhang et al., ECCV 2018). When rho grows, U (the dual scaled by 1/rho) is rescaled by
rho_old / rho_new so the unscaled dual rho * U is unchanged (Boyd et al. 2011, sec. 3.4.1).

Progressive sparsity (optional, ``ramp_from``): the initial Z has sparsity ``ramp_from``, and the
Z-step's target rises to ``sparsity`` along the cubic curve of Zhu & Gupta (2017) over the first
``ramp_updates`` updates, then stays there; ``hard_prune`` always cuts at ``sparsity``. Going straight to 99%
removal projects onto a set far from the dense weights; the ramp lets the W-steps follow.

Under ``torch.distributed`` (several processes training one model with DDP) every rank computes
the same Z and U from the same W, and in addition takes rank 0's Z, U and support at construction
and after every ``update()``, so the ranks can never drift apart.

Reference:
    S. Boyd et al., "Distributed Optimization and Statistical Learning via the Alternating
    Direction Method of Multipliers", 2011.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pruning.masks import Masks
from pruning.projection import check_one_device, check_sparsity, global_topk_masks, kept_count, layerwise_topk_masks
from pruning.selection import (as_patterns, canonical_parameters, keeps_no_weight, layer_floors, layerwise_kept,
                               per_name_values, prunable_parameters)

SCOPES = ("global", "layerwise")
HALF_DTYPES = (torch.float16, torch.bfloat16)    # weights whose penalty is formed before it meets the gradient
RHO_LIMIT = float(torch.finfo(torch.float32).max)   # rho multiplies float32 weights: a larger one overflows


@dataclass
class ADMMConfig:
    """Settings of one ADMM pruning run.

    Attributes:
        sparsity: fraction of prunable weights removed, in [0, 1).
        ramp_from: progressive sparsity: the initial Z's sparsity, below ``sparsity`` (None: no ramp).
        ramp_updates: number of updates over which the target rises from ``ramp_from`` to ``sparsity``.
        scope: "global" (one budget over all layers) or "layerwise" (a ratio per layer).
        layer_sparsity: layerwise only: pattern -> sparsity; layers no pattern matches use ``sparsity``.
        rho: initial penalty weight, > 0.
        rho_multiplier: rho is multiplied by this after every ``update()`` (>= 1; 1 = constant).
        rho_max: cap on rho (None: float32's largest value, `RHO_LIMIT`).
        include, exclude: parameter-name patterns (see ``selection.prunable_parameters``).
        min_density: per-layer floor: fraction of each layer always kept (number, or pattern -> number).
    """

    sparsity: float
    scope: str = "global"
    layer_sparsity: Mapping[str, float] | None = None
    rho: float = 1e-3
    rho_multiplier: float = 1.0
    rho_max: float | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    min_density: float | Mapping[str, float] = 0.0
    ramp_from: float | None = None
    ramp_updates: int = 0

    def __post_init__(self) -> None:
        """Check every setting, and store numbers as Python floats (a numpy number would reach the
        state dict, which `torch.load(weights_only=True)` then refuses, and the JSON reports)."""
        self.sparsity = check_sparsity(self.sparsity)
        self.include = None if self.include is None else as_patterns(self.include, "include")   # "x": one pattern
        self.exclude = None if self.exclude is None else as_patterns(self.exclude, "exclude")
        self.rho, self.rho_multiplier = _real(self.rho, "rho"), _real(self.rho_multiplier, "rho_multiplier")
        if self.rho_max is not None:
            self.rho_max = _real(self.rho_max, "rho_max")
        if isinstance(self.min_density, Mapping):
            self.min_density = {pattern: _real(value, "min_density") for pattern, value in self.min_density.items()}
        else:
            self.min_density = _real(self.min_density, "min_density")
        if self.ramp_from is not None:
            self.ramp_from = check_sparsity(self.ramp_from, "ramp_from")
            if not self.ramp_from < self.sparsity:
                raise ValueError(f"ramp_from must be below sparsity ({self.sparsity!r}), got {self.ramp_from!r}")
            if isinstance(self.ramp_updates, bool) or not isinstance(self.ramp_updates, int) or self.ramp_updates < 1:
                raise ValueError(f"ramp_from needs ramp_updates >= 1 (an int), got {self.ramp_updates!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown ADMM scope {self.scope!r}: expected one of {', '.join(SCOPES)}")
        if self.layer_sparsity is not None:
            if self.scope != "layerwise":
                raise ValueError(f"layer_sparsity needs scope='layerwise', got scope={self.scope!r}")
            self.layer_sparsity = {pattern: check_sparsity(value, f"layer_sparsity[{pattern!r}]")
                                   for pattern, value in self.layer_sparsity.items()}
        if not 0 < self.rho <= RHO_LIMIT:
            raise ValueError(f"rho must be a number in (0, {RHO_LIMIT:.4g}] (it multiplies float32 weights), "
                             f"got {self.rho!r}")
        if not 1.0 <= self.rho_multiplier < math.inf:
            raise ValueError(f"rho_multiplier must be a finite number >= 1, got {self.rho_multiplier!r}")
        if self.rho_max is not None and not self.rho <= self.rho_max <= RHO_LIMIT:
            raise ValueError(f"rho_max must be in [rho ({self.rho!r}), {RHO_LIMIT:.4g}], got {self.rho_max!r}")
        densities = self.min_density.values() if isinstance(self.min_density, Mapping) else [self.min_density]
        for density in densities:
            if not 0.0 <= density <= 1.0:
                raise ValueError(f"min_density must be in [0, 1], got {density!r}")


def _real(value, what: str) -> float:
    """`value` as a float, or ValueError naming `what` when it is not a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def ramp_updates(sparsity: float, ramp_from: float | None, ramp_iters: int | None, admm_iters: int) -> int:
    """``ADMMConfig.ramp_updates`` for a run of ``admm_iters`` updates: 0 without a ramp, else
    ``ramp_iters``, by default two thirds of the iterations (so the last third runs at the target).

    Raises:
        ValueError: ``ramp_from`` not below ``sparsity``, or ``ramp_iters`` not in [1, admm_iters].
    """
    if ramp_from is None:
        if ramp_iters is not None:
            raise ValueError(f"ramp_iters ({ramp_iters!r}) is the length of a ramp, and there is none: give "
                             f"ramp_from too, or leave ramp_iters out")
        return 0
    check_sparsity(ramp_from, "ramp_from")
    if not ramp_from < sparsity:
        raise ValueError(f"ramp_from must be below sparsity ({sparsity!r}), got {ramp_from!r}")
    if ramp_iters is None:
        return max(1, round(2 * admm_iters / 3))
    if isinstance(ramp_iters, bool) or not isinstance(ramp_iters, int) or not 1 <= ramp_iters <= admm_iters:
        raise ValueError(f"ramp_iters must be an int in [1, admm_iters={admm_iters}], got {ramp_iters!r}")
    return ramp_iters


def check_minimises(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError when a param group of ``optimizer`` maximises: the penalty gradient
    ``rho * (W - Z + U)`` is for a descent, and an ascent would push W away from Z (silently)."""
    for index, group in enumerate(optimizer.param_groups):
        if group.get("maximize", False):
            raise ValueError(f"{type(optimizer).__name__} param group {index} has maximize=True; ADMM's penalty "
                             f"gradient assumes the optimizer minimises (negate the loss instead)")


class ADMM:
    """ADMM state (Z, U, rho) over the prunable weights W of one model.

    Z starts as the projection of W and U at zero. ``Z``, ``U`` and ``support`` are lists of
    per-layer tensors on the device and in the dtype of each weight, updated in place (so
    ``state_dict`` references stay current, unless the model is moved to another device or dtype:
    then the state follows it as new tensors; the prunable weights must be on one device, as the
    global ranking compares them all). ``U - Z`` is kept too, so the W-step is two fused
    ``torch._foreach`` ops with no allocation. Memory: three float copies of the prunable weights
    and one bool mask; ``update`` adds about two more float copies transiently, layer by layer.
    """

    def __init__(self, model: nn.Module, config: ADMMConfig):
        self.config = config
        self.model = model
        named = prunable_parameters(model, config.include, config.exclude)
        frozen = [name for name, param in named.items() if not param.requires_grad]
        if frozen:
            raise ValueError(f"ADMM trains the weights it prunes, but {len(frozen)} are frozen (requires_grad=False): "
                             f"{', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}; exclude them "
                             f"(ADMMConfig.exclude) or unfreeze them")
        self.names: list[str] = list(named)
        self.params: list[nn.Parameter] = list(named.values())
        self._links = _holding_links(model, self.params)
        check_one_device(self.params, "ADMM: the prunable weights")
        self.floors = layer_floors(named, config.min_density)
        self.numel = sum(param.numel() for param in self.params)
        if config.scope == "layerwise":
            self.ratios = per_name_values(self.names, config.layer_sparsity or {}, config.sparsity, "layer_sparsity")
        self._check_budget()
        self.rho = config.rho
        self.iteration = 0
        with torch.inference_mode(False), torch.no_grad():     # ordinary tensors even if built under it
            self.support: list[Tensor] = self.project([param.detach() for param in self.params], self.ramp_fraction(0))
            self.Z: list[Tensor] = [param.detach() * mask for param, mask in zip(self.params, self.support)]
            self.U: list[Tensor] = [torch.zeros_like(z) for z in self.Z]
            self._offset: list[Tensor] = [u - z for u, z in zip(self.U, self.Z)]    # U - Z, for the W-step
        self.broadcast_from_rank0()

    def _check_budget(self) -> None:
        """The final projection keeps some weights, and (global scope) the floors fit its budget."""
        if self.config.scope == "global":
            kept = self.k
            if sum(self.floors) > kept:
                raise ValueError(f"min_density keeps {sum(self.floors)} weights at least, more than the {kept} of "
                                 f"{self.numel} that sparsity {self.config.sparsity} leaves")
        else:
            kept = sum(layerwise_kept([param.numel() for param in self.params], self.ratios, self.floors))
        if kept == 0:
            raise keeps_no_weight(self.numel, self.config.sparsity,
                                  self.config.layer_sparsity if self.config.scope == "layerwise" else None)

    def ramp_fraction(self, update: int) -> float:
        """How far the target has risen at Z-step number ``update`` (0: the initial projection):
        0 at ``ramp_from``, 1 at ``sparsity``; always 1 without a ramp."""
        if self.config.ramp_from is None:
            return 1.0
        return 1.0 - (1.0 - min(update, self.config.ramp_updates) / self.config.ramp_updates) ** 3

    def target(self, sparsity: float, fraction: float) -> float:
        """Sparsity on the way to ``sparsity`` after ``fraction`` of the ramp (exactly ``sparsity`` at 1)."""
        if fraction >= 1.0 or self.config.ramp_from is None:
            return sparsity
        start = min(self.config.ramp_from, sparsity)
        return start + (sparsity - start) * fraction

    @property
    def k(self) -> int:
        """Weights kept by the final projection (global scope)."""
        return kept_count(self.numel, self.config.sparsity)

    def project(self, tensors: Sequence[Tensor], fraction: float = 1.0) -> list[Tensor]:
        """Support of the projection of ``tensors`` (aligned with ``self.params``) onto the sparsity
        set, at ``fraction`` of the way along the ramp (1: the final set).

        Returns:
            list of bool Tensors shaped like the parameters (True = kept).
        """
        if self.config.scope == "global":
            k = kept_count(self.numel, self.target(self.config.sparsity, fraction))
            return global_topk_masks(tensors, k, self.floors if any(self.floors) else None)
        return layerwise_topk_masks(tensors, [self.target(r, fraction) for r in self.ratios], self.floors)

    def _follow_params(self, by_name: bool = False) -> None:
        """Follow the model's weights.

        - Weights replaced by new Parameters of the same shape (``model.load_state_dict(sd,
          assign=True)``, or a layer replaced by a new one) take over the ADMM state, found by
          canonical name. Every step checks the chain of modules from the model to each weight
          (one dict lookup per link); ``by_name`` rebinds anyway (every update).
        - Z, U, U - Z (and the support) move to the weights' device and dtype: a model moved after
          the ADMM was built (``model.to("cuda")`` inside a training loop) takes its ADMM state
          along, as an optimizer's state follows its parameters. The moved state is new tensors.
          The model moves as a whole, so this looks at the first weight only.

        Raises:
            ValueError: a weight is gone from the model, has another shape now, or was replaced by
                a frozen one.
        """
        if by_name or any(slots.get(name) is not held for slots, name, held in self._links):
            self._rebind(canonical_parameters(self.model))
        first = self.params[0]
        if self.Z[0].device == first.device and self.Z[0].dtype == first.dtype:
            return
        for state in (self.Z, self.U, self._offset):
            state[:] = [tensor.to(param.device, param.dtype) for tensor, param in zip(state, self.params)]
        self.support[:] = [mask.to(param.device) for mask, param in zip(self.support, self.params)]

    def _rebind(self, current: Mapping[str, nn.Parameter]) -> None:
        for index, name in enumerate(self.names):
            param = current.get(name)
            if param is None:
                raise ValueError(f"ADMM: the model has no weight {name!r} any more; build a new ADMM for a changed model")
            if param.shape != self.params[index].shape:
                raise ValueError(f"ADMM: {name} has shape {tuple(param.shape)} now, its ADMM state "
                                 f"{tuple(self.params[index].shape)}; build a new ADMM for a changed model")
            if param is not self.params[index] and not param.requires_grad:     # a frozen replacement
                raise ValueError(f"ADMM: {name} was replaced by a frozen weight (requires_grad=False); ADMM "
                                 f"trains the weights it prunes: build a new ADMM that excludes it")
            self.params[index] = param
        self._links = _holding_links(self.model, self.params)

    @torch.no_grad()
    def add_penalty_grad(self, grad_scale: Tensor | None = None) -> None:
        """W-step term: ``grad += rho * (W - Z + U)`` for every prunable weight (grad created if None).

        Call after backward (and after AMP unscaling), before ``optimizer.step()``. Gradients still
        multiplied by an AMP loss scale take the penalty times ``grad_scale`` (a scalar tensor), so
        that unscaling them later leaves exactly ``rho * (W - Z + U)``; that path builds the penalty
        in one transient copy of the prunable weights (the scale stays on the device: no sync), as
        16-bit weights always do: adding rho W and rho (U - Z) one after the other would round a
        small loss gradient away where they cancel (kept weights, W ~ Z - U).
        """
        self._follow_params()
        grads = []
        for name, param in zip(self.names, self.params):
            if not param.requires_grad:     # frozen in place after the ADMM was built
                raise ValueError(f"ADMM: {name} is frozen now (requires_grad=False), and a gradient made for it "
                                 f"would still move it; build a new ADMM that excludes it")
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        if grad_scale is None and not any(param.dtype in HALF_DTYPES for param in self.params):
            torch._foreach_add_(grads, self.params, alpha=self.rho)       # in place: no copy of the weights
            torch._foreach_add_(grads, self._offset, alpha=self.rho)
            return
        penalty = torch._foreach_add(self.params, self._offset)            # W - Z + U
        scale = self.rho if grad_scale is None else grad_scale.to(self.params[0].device) * self.rho
        torch._foreach_mul_(penalty, scale)
        torch._foreach_add_(grads, penalty)

    @torch.no_grad()
    def update(self) -> dict[str, float]:
        """Z-step, U-step and the rho schedule.

        Returns:
            dict with ``iteration`` (1-based count of updates), ``primal_residual`` ||W - Z||,
            ``dual_residual`` rho * ||Z - Z_prev||, ``rho`` (used in this update), ``next_rho``
            and ``kept`` (the number of weights in Z's support).
        """
        self._follow_params(by_name=True)
        scratch = torch._foreach_add([param.detach() for param in self.params], self.U)   # W + U
        torch._foreach_copy_(self.support, self.project(scratch, self.ramp_fraction(self.iteration + 1)))
        rho = self.rho
        cap = RHO_LIMIT if self.config.rho_max is None else self.config.rho_max
        self.rho = min(rho * self.config.rho_multiplier, cap)
        primal, dual = [], []
        for param, z, u, offset, buffer, mask in zip(self.params, self.Z, self.U, self._offset, scratch, self.support):
            new_z = buffer.mul_(mask)                                    # projection of W + U
            dual.append(torch.linalg.vector_norm(z.sub_(new_z)))         # Z_prev - Z
            z.copy_(new_z)
            residual = torch.sub(param.detach(), z, out=buffer)          # W - Z
            primal.append(torch.linalg.vector_norm(residual))
            u.add_(residual)                                             # U += W - Z
            if self.rho != rho:
                u.mul_(rho / self.rho)                                   # keep rho * U when rho changes
            torch.sub(u, z, out=offset)
        self.iteration += 1
        self.broadcast_from_rank0()
        return {
            "iteration": self.iteration,
            "primal_residual": float(torch.linalg.vector_norm(torch.stack(primal).double())),
            "dual_residual": rho * float(torch.linalg.vector_norm(torch.stack(dual).double())),
            "rho": rho,
            "next_rho": self.rho,
            "kept": int(torch.stack([mask.sum() for mask in self.support]).sum()),   # one host sync
        }

    @torch.no_grad()
    def broadcast_from_rank0(self) -> None:
        """Copy rank 0's Z, U and support to every rank (no-op unless a process group of more
        than one process is initialised). Every rank must call it at the same point."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for tensor in (*self.Z, *self.U, *self.support):
            dist.broadcast(tensor, src=0)
        torch._foreach_copy_(self._offset, torch._foreach_sub(self.U, self.Z))

    @torch.no_grad()
    def hard_prune(self) -> Masks:
        """Zero the weights outside Z's support and return that support as fixed ``Masks``.

        If the ramp has not reached ``sparsity`` yet, the support is first recomputed as the
        final projection of W + U (what the next Z-step would keep at the target).
        """
        self._follow_params(by_name=True)
        if self.ramp_fraction(self.iteration) < 1.0:
            torch._foreach_copy_(self.support,
                                 self.project(torch._foreach_add([param.detach() for param in self.params], self.U)))
        for param, mask in zip(self.params, self.support):
            param.mul_(mask)
        return Masks({name: mask.clone() for name, mask in zip(self.names, self.support)})

    def state_dict(self) -> dict:
        """Z, U, support (per name), rho, iteration and the run's sparsity/scope, as plain values."""
        return {
            "Z": dict(zip(self.names, self.Z)),
            "U": dict(zip(self.names, self.U)),
            "support": dict(zip(self.names, self.support)),
            "rho": self.rho,
            "iteration": self.iteration,
            "sparsity": self.config.sparsity,
            "scope": self.config.scope,
            "ramp": [self.config.ramp_from, self.config.ramp_updates],
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict()`` taken from an ADMM over the same layers and settings."""
        required = ("Z", "U", "support", "rho", "iteration", "sparsity", "scope")
        missing_keys = [key for key in required if key not in state]
        if missing_keys:
            raise ValueError(f"ADMM state is missing {missing_keys}; found keys {sorted(state)}")
        for key in ("sparsity", "scope"):
            if state[key] != getattr(self.config, key):
                raise ValueError(f"ADMM state has {key}={state[key]!r}, this run has {getattr(self.config, key)!r}")
        ramp = [self.config.ramp_from, self.config.ramp_updates]
        if list(state.get("ramp", [None, 0])) != ramp:
            raise ValueError(f"ADMM state has ramp (ramp_from, ramp_updates)={state.get('ramp')!r}, this run has {ramp!r}")
        for key, views in (("Z", self.Z), ("U", self.U), ("support", self.support)):
            saved = state[key]
            if set(saved) != set(self.names):
                missing, extra = sorted(set(self.names) - set(saved)), sorted(set(saved) - set(self.names))
                raise ValueError(f"ADMM state {key!r} layers differ: missing {missing}, unexpected {extra}")
            for name, view in zip(self.names, views):
                if saved[name].shape != view.shape:
                    raise ValueError(
                        f"ADMM state {key!r} for {name!r} has shape {tuple(saved[name].shape)},"
                        f" expected {tuple(view.shape)}"
                    )
                view.copy_(saved[name])
        self.rho = float(state["rho"])
        self.iteration = int(state["iteration"])
        for z, u, offset in zip(self.Z, self.U, self._offset):
            torch.sub(u, z, out=offset)


def _holding_links(model: nn.Module, params: Sequence[nn.Parameter]) -> list[tuple[dict, str, object]]:
    """The links from ``model`` down to each of ``params`` (a tied weight: its first holder), each
    ``(slots, name, held)`` with ``slots[name] is held`` while the link holds: ``slots`` is a module's
    ``_modules`` or ``_parameters`` dict. Shared links are listed once."""
    path_of = {id(module): path for path, module in model.named_modules()}
    holder = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                holder.setdefault(id(param), (module, attr))
    links: dict[tuple[int, str], tuple[dict, str, object]] = {}
    for param in params:
        module, attr = holder[id(param)]
        parent: nn.Module = model
        for child_name in path_of[id(module)].split(".") if path_of[id(module)] else []:
            child = parent._modules[child_name]
            links.setdefault((id(parent._modules), child_name), (parent._modules, child_name, child))
            parent = child
        links.setdefault((id(module._parameters), attr), (module._parameters, attr, param))
    return list(links.values())
