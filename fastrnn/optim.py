"""Optimizers with PyTorch's update maths and defaults, gradient clipping and
learning-rate schedules.

An optimizer takes modules (any fastrnn layer, cell, Linear, or a
Sequential), or is bound to a model by ``Sequential.compile``. It updates
each module's parameters from its accumulated ``grads``:

    opt = fastrnn.optim.Adam([lstm, head], lr=1e-3)
    ...backprop...
    opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from fastrnn import _backward   # (the portable build: adam_update's bits)
from fastrnn import _validation as v
from fastrnn._module import changing_together, holding, set_at_once, set_with_parameters

if TYPE_CHECKING:
    from fastrnn._module import Module
    from fastrnn.model import Sequential


def _modules_of(params, owner="optimizer"):
    """Flatten modules / Sequentials / lists of them to parameter owners,
    each once: a wrapper (Reversed, Stateful) stands for the layer within,
    whose parameters it holds, so a model with Stateful(gru) and gru itself
    gives gru once (an optimizer stepped it twice, gradient clipping counted
    it twice)."""
    from fastrnn.wrappers import _recurrent

    owners = {}
    for module in map(_recurrent, _flattened(params, owner)):
        owners.setdefault(id(module), module)
    return list(owners.values())


def _flattened(params, owner):
    if params is None:
        return []
    if hasattr(params, "_modules_with_parameters"):
        return list(params._modules_with_parameters())
    if hasattr(params, "_trainable"):
        return [params]
    if isinstance(params, (list, tuple)):
        return [m for p in params for m in _flattened(p, owner)]
    raise TypeError(f"{owner}: params must be fastrnn modules, a Sequential or a list (or "
                    f"another iterable) of them, got {type(params).__name__}")


def _listed(params, owner, ordered=False):
    """params with every iterable of modules in it (a generator, map,
    dict.values(), ...: the annotation's Iterable) made a list, read once;
    a module, a Sequential, an array (a tensor) or a string as it is (the
    last two are refused by name later, not iterated). ``ordered``: refuse a
    set, whose order changes from run to run (an optimizer's state is kept
    in the order of its parameters, as PyTorch refuses sets for)."""
    if params is None or hasattr(params, "_trainable") or hasattr(
            params, "_modules_with_parameters") or hasattr(params, "__array__") or isinstance(
            params, (str, bytes)):
        return params
    if ordered and isinstance(params, (set, frozenset)):
        raise TypeError(f"{owner}: params must be in a fixed order (a list or tuple), got a "
                        f"{type(params).__name__}, whose order changes from run to run")
    if isinstance(params, Iterable):
        return [_listed(p, owner, ordered) for p in params]
    return params


def _quantized_in(params):
    """The quantized (inference-only) modules among params: an optimizer
    holding one refuses to step (a compiled quantized model still
    evaluates), gradient clipping refuses at once."""
    if isinstance(params, (list, tuple)):
        return [m for p in params for m in _quantized_in(p)]
    layers = getattr(params, "layers", None)   # a Sequential
    candidates = layers if isinstance(layers, (list, tuple)) else [params]
    return [m for m in candidates if hasattr(m, "_refuse_training")]   # fastrnn.quantized's


def _refuse_quantized(modules, what):
    if modules:
        modules[0]._refuse_training(what)


def _took_no_gradient(module):
    """Whether no backprop added into ``module``'s gradients since its
    zero_grad (or construction) and they hold only zeros (written by hand,
    they count): its step is skipped (Optimizer.step)."""
    return module._grads_zeroed and not any(grad.any() for grad in module._trainable)


def _check_number(owner, name, value, low=0.0, low_open=False, high=None, allow_inf=False):
    """A float in [low, high) ((low, ...) with low_open; no high: up to inf, which
    only ``allow_inf`` takes: a gradient clip that never clips)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{owner}: {name} must be a number, got NaN")
    if value < low or (low_open and value == low) or (high is not None and value >= high) \
            or (math.isinf(value) and not allow_inf):
        bound = f"({low}" if low_open else f"[{low}"
        top = "inf]" if allow_inf else ("inf)" if high is None else f"{high})")
        raise ValueError(f"{owner}: {name} must lie in {bound}, {top}, got {value}")
    return float(value)


class Optimizer:
    """Base: holds the modules and per-parameter state (one entry per
    storage array of each module, in the module's order).

    ``state_dict()`` / ``load_state_dict()`` save and restore everything an
    update depends on (hyper-parameters, moments, step counts and the
    attached learning-rate schedules), so training resumes exactly where it
    stopped; ``Sequential.save`` stores it in the model file.
    """
    _scalar_slots = ()     # per-parameter state held as ints (Adam's step)

    def __init__(self, params: Module | Sequential | Iterable[Module | Sequential] | None,
                 lr: float) -> None:
        self.lr = _check_number(type(self).__name__, "lr", lr)
        self._modules = []
        self._state = []
        self.step_count = 0
        self.schedules = []     # LRSchedulers made on this optimizer, in order
        self._quantized = []    # inference-only modules given: step refuses
        self.add(params)

    # the state arrays a first step does not start (SGD's momentum buffer,
    # the first gradient): added at their first use
    _lazy_slots = ()

    def __setattr__(self, name, value):
        """A hyper-parameter set after construction is checked as the
        constructor checks it (a bad one set by hand had failed in the
        middle of fit, or been saved in a file that loading refused), and
        the parameters' state follows a change of the arrays it keeps: those
        no longer used are dropped (a file with them is refused), new ones
        start as a first step starts them."""
        # a subclass of another module is checked as the class of this one it
        # extends (its own constructor may not take its get_config())
        base = next(cls for cls in type(self).__mro__ if cls.__module__ == __name__)
        if (name == "lr" or "_state" not in self.__dict__ or base is Optimizer
                or name not in base.get_config(self)):   # (the constructor's own settings too)
            object.__setattr__(self, name, value)
            return
        fresh = base(None, **{**base.get_config(self), name: value})
        with holding(self._modules):   # (a step meanwhile holds them from start to swap)
            object.__setattr__(self, name, getattr(fresh, name))
            keep = set(self.slots()) | set(self._scalar_slots)
            for state in self._state:
                arrays = [item for item in state.values() if isinstance(item, np.ndarray)]
                for slot in [slot for slot in state if slot not in keep]:
                    del state[slot]
                for slot in self.slots():
                    if arrays and slot not in state and slot not in self._lazy_slots:
                        state[slot] = np.zeros_like(arrays[0])

    @property
    def lr(self) -> float:
        """The learning rate: a finite number >= 0, checked when set (a NaN
        set by hand turned every weight to NaN at the next step)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _check_number(type(self).__name__, "lr", value)

    @property
    def learning_rate(self) -> float:
        """Keras' name of ``lr``."""
        return self.lr

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        self.lr = _check_number(type(self).__name__, "learning_rate", value)

    def add(self, params: Module | Sequential | Iterable[Module | Sequential]) -> None:
        """Add the parameters of more modules (a module is added once)."""
        params = _listed(params, type(self).__name__, ordered=True)
        modules = _modules_of(params, type(self).__name__)
        self._quantized.extend(_quantized_in(params))
        for module in modules:
            if any(module is m for m in self._modules):
                continue
            self._modules.append(module)
            self._state.extend({} for _ in module._trainable)

    @property
    def bound(self) -> bool:
        return bool(self._state)

    def zero_grad(self) -> None:
        for module in self._modules:
            module.zero_grad()

    def step(self) -> None:
        """One update of every parameter from its gradient, but for the
        modules that took none since their ``zero_grad`` (no backprop added
        into their gradients, which hold only zeros): as PyTorch's step skips
        the parameters whose gradients ``zero_grad`` set to None, their
        momentum, moments and weight decay leave them as they are (a manual
        loop that backpropagates through part of the model moved the rest).
        Each module's
        gradients are read under its lock (no backprop adds meanwhile), and
        its updated parameters replace the old as one set, and every
        module's at once: a call running in another thread (of a module, or
        of a Sequential of them) computes with the old sets or the new,
        never a mix."""
        self._step(self._modules)

    def _step(self, modules):
        """``step`` of the parameters of ``modules`` only (some of this
        optimizer's): a Sequential's train step updates its own layers, as
        PyTorch's step skips the parameters that took no gradient. Another
        model's layers this optimizer also holds keep their weights and
        moments, whatever gradients they hold (a head compiled with the
        whole model's optimizer, trained alone, moved the layers before it
        by their stale gradients at every step)."""
        _refuse_quantized(self._quantized, "an optimizer's step")
        stepped = {id(m) for m in modules}
        # every module's lock, those not stepped too: the state list is
        # replaced whole, so two models' steps on one optimizer take turns
        # (under their own locks only, each wrote back its stale copy of the
        # other's moments)
        with changing_together(self._modules):
            # the moments updated in copies, kept with the parameters: a step
            # interrupted (Ctrl-C) or failed before its end changes none of
            # them, nor the step count
            new_state = [{k: (val.copy() if isinstance(val, np.ndarray) else val)
                          for k, val in state.items()} for state in self._state]
            states = iter(new_state)
            for module in self._modules:
                grads = module._trainable
                module_states = [next(states) for _ in grads]
                if not grads or id(module) not in stepped or _took_no_gradient(module):
                    continue

                def update(storages):
                    for param, grad, state in zip(storages, grads, module_states):
                        self._update(param, grad.astype(param.dtype, copy=True), state)

                module._swap_parameters(update)
            set_with_parameters(self, "_state", new_state)
            set_with_parameters(self, "step_count", self.step_count + 1)

    # --- saving and restoring -----------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """The hyper-parameters: the constructor's arguments other than
        ``params``, current values (``lr`` as schedules left it)."""
        return {"lr": self.lr}

    def slots(self):
        """The names of the arrays each parameter's state holds once it has
        been updated (before, its state is empty)."""
        return ()

    # the slots of running means of squared gradients: never negative, and
    # +inf where a float32 square overflowed (a gradient of 1e20; the
    # element's updates are then 0, as in PyTorch); the others stay finite
    # while the weights do
    _squared_slots = ()

    def _bad_values(self, slot, value):
        """Why the state array ``value`` of ``slot`` cannot come from this
        optimizer's steps ('' if it can): what loading refuses and saving
        does not write."""
        if slot in self._squared_slots:
            if np.isnan(value).any() or (value < 0).any():
                return "has NaN or negative values (a mean of squared gradients is >= 0)"
        elif not np.isfinite(value).all():
            return "has non-finite values"
        return ""

    def state_dict(self) -> dict[str, Any]:
        """Everything an update depends on, as copies.

        Returns
        -------
        dict
            ``'class'`` (the optimizer's class name), ``'config'``
            (``get_config()``), ``'step_count'``, ``'state'`` (one dict per
            storage array of each module, in order: arrays of the storage's
            shape and, for Adam, the int ``'step'``) and ``'schedules'``
            (each attached schedule's ``state_dict()``).
        """
        return {"class": type(self).__name__, "config": self.get_config(),
                "step_count": self.step_count,
                "state": [{k: (np.copy(val) if isinstance(val, np.ndarray) else val)
                           for k, val in s.items()} for s in self._state],
                "schedules": [schedule.state_dict() for schedule in self.schedules]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` of an optimizer of the same class bound
        to parameters of the same shapes (in the same order).

        Everything is checked before anything changes; the arrays are
        copied. The attached schedules are replaced by those of the state,
        rebuilt on this optimizer.

        Raises
        ------
        TypeError
            If the state or a part of it has the wrong type.
        ValueError
            If it belongs to another class, or its shapes, names or values
            do not fit this optimizer's parameters.
        """
        self._load_state(state_dict, copy=True)

    def _load_state(self, state_dict, copy):
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict):
            raise TypeError(f"{owner}: expected a dict from state_dict(), got "
                            f"{type(state_dict).__name__}")
        expected = {"class", "config", "step_count", "state", "schedules"}
        if set(state_dict) != expected:
            raise ValueError(f"{owner}: expected the keys {sorted(expected)}, got "
                             f"{sorted(state_dict)}")
        if state_dict["class"] != type(self).__name__:
            raise ValueError(f"{owner}: the state is of a {state_dict['class']!r} optimizer, "
                             f"not a {type(self).__name__}")
        config = state_dict["config"]
        if not isinstance(config, dict):
            raise TypeError(f"{owner}: config must be a dict, got {type(config).__name__}")
        try:
            fresh = type(self)(None, **config)   # checks every hyper-parameter
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{owner}: bad config: {exc}") from None
        missing = sorted(set(fresh.get_config()) - set(config))
        if missing:   # (their defaults would have replaced the saved values unseen)
            raise ValueError(f"{owner}: config lacks {missing}; a state_dict() holds every "
                             f"hyper-parameter")
        step_count = state_dict["step_count"]
        if isinstance(step_count, bool) or not isinstance(step_count, numbers.Integral) \
                or step_count < 0:
            raise ValueError(f"{owner}: step_count must be an int >= 0, got {step_count!r}")
        states = state_dict["state"]
        # one state per trainable array, as add() keeps them (a quantized module has none)
        storages = [storage for module in self._modules
                    for storage, _ in zip(module._params.storages, module._trainable)]
        if not isinstance(states, (list, tuple)) or len(states) != len(storages):
            got = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
            raise ValueError(f"{owner}: expected state for {len(storages)} parameter arrays, "
                             f"got {got}")
        slots = fresh.slots()
        new_states = []
        for i, (state, storage) in enumerate(zip(states, storages)):
            if not isinstance(state, dict):
                raise TypeError(f"{owner}: state[{i}] must be a dict, got "
                                f"{type(state).__name__}")
            names = set(slots) | set(fresh._scalar_slots)
            if state and set(state) != names:
                raise ValueError(f"{owner}: state[{i}] holds {sorted(state)}; a "
                                 f"{type(self).__name__} with this config keeps "
                                 f"{sorted(names)} (or nothing)")
            new = {}
            for name, value in state.items():
                if name in fresh._scalar_slots:
                    if isinstance(value, (bool, np.bool_)) or not isinstance(
                            value, numbers.Integral) or not 1 <= value < 2**62:
                        raise ValueError(f"{owner}: state[{i}][{name!r}] must be an int >= 1, "
                                         f"got {value!r}")
                    new[name] = int(value)
                    continue
                if not isinstance(value, np.ndarray) or np.ma.isMaskedArray(value):
                    raise TypeError(f"{owner}: state[{i}][{name!r}] must be a numeric ndarray, "
                                    f"got {type(value).__name__}")
                if value.dtype.kind not in "fiu":
                    raise TypeError(f"{owner}: state[{i}][{name!r}] must be a numeric ndarray, "
                                    f"got dtype {value.dtype}")
                # a subclass (np.matrix: its * is a matrix product) as a plain array
                value = np.asarray(value)
                if value.shape != storage.shape:
                    raise ValueError(f"{owner}: state[{i}][{name!r}] has shape {value.shape}, "
                                     f"its parameter array {storage.shape}")
                value = value.astype(storage.dtype, copy=copy)
                problem = fresh._bad_values(name, value)
                if problem:
                    raise ValueError(f"{owner}: state[{i}][{name!r}] {problem}")
                new[name] = value
            new_states.append(new)
        schedules = state_dict["schedules"]
        if not isinstance(schedules, (list, tuple)):
            raise TypeError(f"{owner}: schedules must be a list, got {type(schedules).__name__}")
        old_schedules, self.schedules = self.schedules, []
        try:
            for i, item in enumerate(schedules):
                _schedule_from_state(owner, f"schedules[{i}]", self, item)
        except (TypeError, ValueError):
            self.schedules = old_schedules
            raise
        for key, value in vars(fresh).items():   # (checked together: fresh's)
            if key not in ("_modules", "_state", "step_count", "schedules", "_quantized"):
                object.__setattr__(self, key, value)
        self.step_count = int(step_count)
        for state, new in zip(self._state, new_states):
            state.clear()
            state.update(new)


class SGD(Optimizer):
    """Stochastic gradient descent, PyTorch's ``torch.optim.SGD``.

    g = grad + weight_decay * p; with momentum, b = momentum * b + (1 - dampening) * g
    (b = g at the first step), g = g + momentum * b if nesterov else b;
    p -= lr * g.
    """

    def __init__(self, params: Module | Sequential | Iterable[Module | Sequential] | None = None,
                 lr: float = 1e-3,
                 momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        self.momentum = _check_number("SGD", "momentum", momentum)
        self.dampening = _check_number("SGD", "dampening", dampening)
        self.weight_decay = _check_number("SGD", "weight_decay", weight_decay)
        nesterov = v.check_bool("SGD", "nesterov", nesterov)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening = 0")
        self.nesterov = nesterov
        super().__init__(params, lr)

    def get_config(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "dampening": self.dampening,
                "weight_decay": self.weight_decay, "nesterov": self.nesterov}

    _lazy_slots = ("momentum_buffer",)   # the first gradient, as PyTorch starts it

    def slots(self):
        return ("momentum_buffer",) if self.momentum else ()

    def _update(self, p, g, state):
        if self.weight_decay:
            g += self.weight_decay * p
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g


class Adam(Optimizer):
    """Adam, PyTorch's ``torch.optim.Adam`` (weight_decay as L2 on the gradient).

    m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    """
    _decoupled = False

    def __init__(self, params: Module | Sequential | Iterable[Module | Sequential] | None = None,
                 lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False) -> None:
        owner = type(self).__name__
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{owner}: betas must be a pair of numbers, got {betas!r}")
        self.betas = tuple(_check_number(owner, "betas", b, high=1.0) for b in betas)
        self.eps = _check_number(owner, "eps", eps)
        self.weight_decay = _check_number(owner, "weight_decay", weight_decay)
        self.amsgrad = v.check_bool(type(self).__name__, "amsgrad", amsgrad)
        super().__init__(params, lr)

    _scalar_slots = ("step",)
    _squared_slots = ("exp_avg_sq", "max_exp_avg_sq")

    def get_config(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "amsgrad": self.amsgrad}

    def slots(self):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def _update(self, p, g, state):
        # In NumPy's terms (each operation rounded to p's dtype, as there):
        #   weight decay: p *= 1 - lr * wd (AdamW), or g += wd * p (Adam)
        #   m *= b1; m += (1 - b1) * g; v *= b2; v += (1 - b2) * g * g
        #   amsgrad: v_max = maximum(v_max, v), used for v below
        #   p -= lr / (1 - b1 ** t) * m / (sqrt(v) / sqrt(1 - b2 ** t) + eps)
        # run in one pass (_backward.adam_update: the same bits)
        beta1, beta2 = self.betas
        if not state:
            state["step"] = 0    # per parameter, as PyTorch: one added later starts at 1
            state["exp_avg"] = np.zeros_like(p)
            state["exp_avg_sq"] = np.zeros_like(p)
            if self.amsgrad:
                state["max_exp_avg_sq"] = np.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        v_max = _flat(state["max_exp_avg_sq"]) if self.amsgrad else None
        _backward.adam_update(
            _flat(p), _flat(g), _flat(state["exp_avg"]), _flat(state["exp_avg_sq"]), v_max,
            beta1, beta2, self.weight_decay,
            self._decoupled, 1 - self.lr * self.weight_decay, self.lr / (1 - beta1 ** t),
            math.sqrt(1 - beta2 ** t), self.eps)


def _flat(a):
    """A 1-D view of a C-contiguous array (a parameter storage, a gradient or
    a moment: all are), which an update writes through."""
    if not a.flags.c_contiguous:
        raise RuntimeError("optimizer: a parameter or state array is not contiguous")
    return a.reshape(-1)


class AdamW(Adam):
    """AdamW, PyTorch's ``torch.optim.AdamW``: decoupled weight decay
    ``p *= 1 - lr * weight_decay`` before the Adam update (default 1e-2)."""
    _decoupled = True

    def __init__(self, params: Module | Sequential | Iterable[Module | Sequential] | None = None,
                 lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)


class RMSprop(Optimizer):
    """RMSprop, PyTorch's ``torch.optim.RMSprop``.

    s = alpha s + (1 - alpha) g^2 (centered: minus the squared running mean
    of g); with momentum, b = momentum b + g / (sqrt(s) + eps), p -= lr b;
    else p -= lr g / (sqrt(s) + eps).
    """

    def __init__(self, params: Module | Sequential | Iterable[Module | Sequential] | None = None,
                 lr: float = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False) -> None:
        self.alpha = _check_number("RMSprop", "alpha", alpha)
        self.eps = _check_number("RMSprop", "eps", eps)
        self.weight_decay = _check_number("RMSprop", "weight_decay", weight_decay)
        self.momentum = _check_number("RMSprop", "momentum", momentum)
        self.centered = v.check_bool("RMSprop", "centered", centered)
        super().__init__(params, lr)

    def get_config(self) -> dict[str, Any]:
        return {"lr": self.lr, "alpha": self.alpha, "eps": self.eps,
                "weight_decay": self.weight_decay, "momentum": self.momentum,
                "centered": self.centered}

    _squared_slots = ("square_avg",)

    def slots(self):
        return (("square_avg",) + (("grad_avg",) if self.centered else ())
                + (("momentum_buffer",) if self.momentum > 0 else ()))

    def _update(self, p, g, state):
        if self.weight_decay:
            g += self.weight_decay * p
        if not state:
            state["square_avg"] = np.zeros_like(p)
            if self.centered:
                state["grad_avg"] = np.zeros_like(p)
            if self.momentum > 0:
                state["momentum_buffer"] = np.zeros_like(p)
        sq = state["square_avg"]
        sq *= self.alpha
        sq += (1 - self.alpha) * g * g
        if self.centered:
            ga = state["grad_avg"]
            ga *= self.alpha
            ga += (1 - self.alpha) * g
            var = sq - ga * ga
            if ga.dtype == np.float32 and not np.isfinite(var).all():
                # PyTorch's addcmul rounds s - ga^2 once: a ga^2 past float32's
                # range gives s's inf there, not inf - inf = NaN (exactly in
                # float64, only then: a float64 copy each step cost 30%)
                var = (sq - np.square(ga, dtype=np.float64)).astype(np.float32)
            avg = np.sqrt(var) + self.eps
        else:
            avg = np.sqrt(sq) + self.eps
        if self.momentum > 0:
            buf = state["momentum_buffer"]
            buf *= self.momentum
            buf += g / avg
            p -= self.lr * buf
        else:
            p -= self.lr * g / avg


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def get_optimizer(optimizer: Optimizer | str) -> Optimizer:
    return v.instance_or_name("optimizer", optimizer, Optimizer, OPTIMIZERS)


# --- gradient clipping -----------------------------------------------------------
def clip_grad_norm(params: Module | Sequential | Iterable[Module | Sequential], max_norm: float,
                   error_if_nonfinite: bool = False) -> float:
    """Scale all gradients together so that their global L2 norm is at most
    ``max_norm`` (PyTorch's ``clip_grad_norm_``). Returns the norm before.

    ``max_norm=inf`` only measures (PyTorch's turns every gradient NaN when
    the norm is not finite). The norm of finite gradients is finite where
    double precision holds it: a float32 sum of squares that overflows
    (gradients near 1e20) is summed again scaled."""
    max_norm = _check_number("clip_grad_norm", "max_norm", max_norm, allow_inf=True)
    error_if_nonfinite = v.check_bool("clip_grad_norm", "error_if_nonfinite", error_if_nonfinite)
    params = _listed(params, "clip_grad_norm")
    _refuse_quantized(_quantized_in(params), "clip_grad_norm")
    modules = _modules_of(params, "clip_grad_norm")
    with holding(modules):   # no backprop adds while we measure and scale
        grads = [grad for module in modules for grad in module._trainable]
        with np.errstate(over="ignore"):   # (an overflow is summed again below)
            squares = [float(np.dot(g.ravel(), g.ravel())) for g in grads]
        if math.isinf(sum(squares)):
            total = math.hypot(*(_norm_without_overflow(g, sq) for g, sq in zip(grads, squares)))
        else:
            total = math.sqrt(sum(squares))
        if error_if_nonfinite and not math.isfinite(total):
            raise ValueError(f"clip_grad_norm: the total gradient norm is {total}")
        scale = max_norm / (total + 1e-6)
        # a NaN norm makes every gradient NaN, as PyTorch's does (but inf never clips)
        if not scale >= 1 and max_norm != math.inf:
            for g in grads:
                g *= scale
    return total


def _norm_without_overflow(g, square_sum):
    """The L2 norm of ``g`` whose sum of squares (``square_sum``) may have
    overflowed: of g over its largest magnitude, times that magnitude."""
    if math.isfinite(square_sum):
        return math.sqrt(square_sum)
    largest = float(np.max(np.abs(g)))
    if not math.isfinite(largest):
        return largest   # (a gradient holding inf: the norm is inf)
    unit = (g / largest).ravel()
    return largest * math.sqrt(float(np.dot(unit, unit)))


def clip_grad_value(params: Module | Sequential | Iterable[Module | Sequential],
                    clip_value: float) -> None:
    """Clamp every gradient element into [-clip_value, clip_value]."""
    clip_value = _check_number("clip_grad_value", "clip_value", clip_value, allow_inf=True)
    params = _listed(params, "clip_grad_value")
    _refuse_quantized(_quantized_in(params), "clip_grad_value")
    for module in _modules_of(params, "clip_grad_value"):
        with module._grad_lock:
            for grad in module._trainable:
                np.clip(grad, -clip_value, clip_value, out=grad)


# --- learning-rate schedules -----------------------------------------------------
class LRScheduler:
    """Base: ``step()`` once per epoch (``fit`` does it when given as a callback).

    A schedule attaches itself to its optimizer (``optimizer.schedules``):
    the optimizer's ``state_dict`` holds the schedule's state, so a model
    saved with its optimizer comes back with its schedules where they were;
    pass ``model.optimizer.schedules`` to ``fit`` again to go on with them.

    Each step moves the optimizer's current learning rate (PyTorch's
    chainable form), so two schedules compound and a rate that something
    else changed (``ReduceLROnPlateau``, ``LearningRateScheduler``, the
    user) goes on from there; alone, a schedule follows the formula of its
    docstring (to rounding), and each step gives PyTorch's bits.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected a fastrnn optimizer, "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.epoch = 0

    def _attach(self):
        self.optimizer.schedules.append(self)

    def step(self) -> float:
        lr = self._next_lr(self.epoch + 1, self.optimizer.lr)
        if not (math.isfinite(lr) and lr >= 0):
            # PyTorch's chainable form sets it anyway (a negative rate: gradient
            # ascent; an overflow: inf)
            name = type(self).__name__
            if not lr < 0:   # (inf or NaN: the formula itself overflowed)
                raise ValueError(
                    f"{name}: epoch {self.epoch + 1}'s learning rate comes out {lr:.6g} from "
                    f"the current {self.optimizer.lr:.6g}: the schedule's formula "
                    f"({self.get_config()}) overflows; nothing was changed")
            raise ValueError(
                f"{name}: epoch {self.epoch + 1}'s learning rate comes out "
                f"{lr:.6g} from the current {self.optimizer.lr:.6g}, which something else "
                f"changed (by hand, ReduceLROnPlateau, another schedule) below what this "
                f"schedule's formula allows; nothing was changed")
        # (checked above as the lr setter checks it; a Ctrl-C between the two
        # had left the schedule an epoch ahead of the rate, saved so)
        set_at_once([(self, "epoch", self.epoch + 1), (self.optimizer, "_lr", float(lr))])
        return lr

    def get_config(self) -> dict[str, Any]:
        """The constructor's arguments other than the optimizer."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """``{'class', 'config', 'epoch', 'base_lr'}``: what rebuilds it."""
        return {"class": type(self).__name__, "config": self.get_config(),
                "epoch": self.epoch, "base_lr": self.base_lr}

    # callback protocol
    def on_train_begin(self, model: Sequential) -> None:
        # a schedule of another optimizer (the model's before a save and load,
        # whose schedules came back on the loaded optimizer) stepped a rate
        # that fit does not use, unseen
        if getattr(model, "optimizer", self.optimizer) is not self.optimizer:
            raise ValueError(
                f"{type(self).__name__}: its optimizer is not the model's, so this fit "
                f"would step a learning rate it does not use; pass model.optimizer.schedules "
                f"(a loaded model's schedules come back on its own optimizer)")

    def on_epoch_end(self, model: Sequential, epoch: int, logs: dict[str, float]) -> None:
        self.step()

    def __repr__(self):
        args = "".join(f", {k}={val!r}" for k, val in self.get_config().items())
        return f"{type(self).__name__}(optimizer{args}, epoch={self.epoch})"


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(optimizer)
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral):
            raise TypeError(f"StepLR: step_size must be a positive int, got "
                            f"{type(step_size).__name__} {step_size!r}")
        if step_size < 1:
            raise ValueError(f"StepLR: step_size must be a positive int, got {step_size!r}")
        self.step_size, self.gamma = int(step_size), _check_number("StepLR", "gamma", gamma)
        self._attach()

    def get_config(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "gamma": self.gamma}

    def _next_lr(self, epoch, lr):
        return lr * self.gamma if epoch % self.step_size == 0 else lr


class ExponentialLR(LRScheduler):
    """lr = base_lr * gamma ** epoch."""

    def __init__(self, optimizer: Optimizer, gamma: float) -> None:
        super().__init__(optimizer)
        self.gamma = _check_number("ExponentialLR", "gamma", gamma)
        self._attach()

    def get_config(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def _next_lr(self, epoch, lr):
        return lr * self.gamma


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) (1 + cos(pi epoch / T_max)) / 2."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0) -> None:
        super().__init__(optimizer)
        if isinstance(T_max, bool) or not isinstance(T_max, numbers.Integral) or T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be a positive int, got {T_max!r}")
        self.T_max, self.eta_min = int(T_max), _check_number("CosineAnnealingLR", "eta_min",
                                                             eta_min)
        self._attach()

    def get_config(self) -> dict[str, Any]:
        return {"T_max": self.T_max, "eta_min": self.eta_min}

    def _next_lr(self, epoch, lr):
        base, low, period = self.base_lr, self.eta_min, self.T_max
        if (epoch - 1 - period) % (2 * period) == 0:   # from the bottom (no 0 / 0)
            return lr + (base - low) * (1 - math.cos(math.pi / period)) / 2
        return (1 + math.cos(math.pi * epoch / period)) / (
            1 + math.cos(math.pi * (epoch - 1) / period)) * (lr - low) + low


SCHEDULES = {cls.__name__: cls for cls in (StepLR, ExponentialLR, CosineAnnealingLR)}


def _schedule_from_state(owner, where, optimizer, state):
    """Rebuild a schedule from its state_dict on `optimizer` (attached)."""
    if not isinstance(state, dict):
        raise TypeError(f"{owner}: {where} must be a dict, got {type(state).__name__}")
    expected = {"class", "config", "epoch", "base_lr"}
    if set(state) != expected:
        raise ValueError(f"{owner}: {where} must have the keys {sorted(expected)}, got "
                         f"{sorted(state)}")
    cls = SCHEDULES.get(state["class"]) if isinstance(state["class"], str) else None
    if cls is None:
        raise ValueError(f"{owner}: {where} names an unknown schedule {state['class']!r}; "
                         f"expected one of {sorted(SCHEDULES)}")
    if not isinstance(state["config"], dict):
        raise TypeError(f"{owner}: {where}['config'] must be a dict, got "
                        f"{type(state['config']).__name__}")
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) \
            or not 0 <= epoch < 2**62:
        raise ValueError(f"{owner}: {where}['epoch'] must be an int >= 0, got {epoch!r}")
    base_lr = _check_number(owner, f"{where}['base_lr']", state["base_lr"])
    try:
        schedule = cls(optimizer, **state["config"])
    except TypeError as exc:
        raise TypeError(f"{owner}: {where} has a bad config: {exc}") from None
    schedule.epoch, schedule.base_lr = int(epoch), base_lr
    return schedule
