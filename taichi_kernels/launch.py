"""Kernel launches without Taichi's per-call argument handling.

A call of a ``@ti.kernel`` on tensors spends most of its fixed cost in Python: Taichi looks up
the compiled instance from every argument's features, then sets each tensor argument through a
generic converter (numpy limits, environment lookups, device strings). On a 2-core CPU a
kernel with five tensor arguments took 186 us per call (median, 2 threads), of which ~60 us
were the launch itself (building the launch context, waking the thread pool, running the loop).
:class:`Launcher` runs the first call of each argument signature through Taichi (which compiles
and validates it), keeps the compiled kernel, and sets later calls' arguments straight into a
launch context, as Taichi's own launch does.

It relies on Taichi 1.7's launch internals (``Kernel.compiled_kernels``, ``make_launch_context``,
``Program.compile_kernel`` / ``launch_kernel``); a kernel whose arguments it cannot set (templates,
matrices, structs) always takes Taichi's path, and so does every kernel if these internals are
missing (another Taichi version). Tensors that require grad take Taichi's path too
(Taichi attaches a zero ``grad`` to them), and so do tensors on a device the arch cannot address
(Taichi stages those through the host).
"""
import taichi as ti
from taichi.lang import impl
from taichi.lang.enums import Layout
from taichi.lang.util import cook_dtype
from taichi.types import ndarray_type, primitive_types
from taichi.types.utils import is_signed


def _array_setter(index, element_shape):
    element_dim = len(element_shape)

    def set_array(ctx, v):
        if not v.is_contiguous():  # as Taichi's own check
            raise ValueError("Non contiguous tensors are not supported, please call tensor.contiguous() before "
                             "passing it into taichi kernel.")
        if element_dim and tuple(v.shape[-element_dim:]) != element_shape:
            raise ValueError(f"argument {index[0]}: an array of {element_shape} elements needs a tensor whose "
                             f"last dimensions are {element_shape}, got shape {tuple(v.shape)}")
        shape = tuple(v.shape[:-element_dim]) if element_dim else tuple(v.shape)
        grad = v.grad
        ctx.set_arg_external_array_with_shape(index, v.data_ptr(), v.element_size() * v.nelement(), shape,
                                              grad.data_ptr() if grad is not None else 0)
    return set_array


# scalars need no checks here: their types are part of the signature, so Taichi has accepted
# (or refused) each combination on its first call
def _int_setter(index, signed):
    def set_int(ctx, v):
        (ctx.set_arg_int if signed else ctx.set_arg_uint)(index, int(v))
    return set_int


def _float_setter(index):
    def set_float(ctx, v):
        ctx.set_arg_float(index, float(v))
    return set_float


def _setters(primal):
    """One ``(ctx, value)`` setter per argument of the Taichi kernel ``primal``, or None if an
    argument is of a kind set here never (templates, matrices, structs, argument packs)."""
    setters = []
    for i, arg in enumerate(primal.arguments):
        anno = arg.annotation
        if isinstance(anno, ndarray_type.NdarrayType):
            if anno.dtype is None or anno.layout == Layout.SOA:
                return None
            if id(anno.dtype) in primitive_types.type_ids:
                element_shape = ()
            elif anno.dtype.ndim == 1:  # ti.types.vector
                element_shape = (anno.dtype.n,)
            else:  # ti.types.matrix
                element_shape = (anno.dtype.n, anno.dtype.m)
            setters.append(_array_setter((i,), element_shape))
        elif id(anno) in primitive_types.integer_type_ids:
            setters.append(_int_setter((i,), is_signed(cook_dtype(anno))))
        elif id(anno) in primitive_types.real_type_ids:
            setters.append(_float_setter((i,)))
        else:
            return None
    return setters


def _signature(args, cuda_arch):
    """What selects a compiled instance (tensor dtype, rank; scalar type), or None where this
    call must take Taichi's path."""
    sig = []
    for a in args:
        if hasattr(a, "data_ptr"):
            if a.requires_grad or (a.is_cuda and not cuda_arch) or (not a.is_cuda and a.device.type != "cpu"):
                return None
            sig.append((a.dtype, a.dim(), a.is_cuda))
        elif type(a) in (int, float):
            sig.append(type(a))
        else:  # numpy arrays and scalars, Taichi ndarrays, ...
            return None
    return tuple(sig)


class Launcher:
    """``kernel`` (a ``@ti.kernel``) called positionally, with Taichi's argument handling done
    once per signature (module docstring)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._setters = None  # per argument, from the annotations; False: never the direct path
        self._compiled = {}  # signature -> (program, compiled Taichi kernel)
        self.direct_calls = 0  # calls that took the direct path (tests read it)

    def __call__(self, *args):
        cfg = impl.current_cfg()
        prog = impl.get_runtime().prog
        sig = _signature(args, cfg.arch == ti.cuda) if self._setters is not False else None
        hit = self._compiled.get(sig) if sig is not None else None
        if hit is None or hit[0] is not prog:  # (a signature fixes the number of arguments)
            return self._through_taichi(sig, args, prog)
        t_kernel = hit[1]
        ctx = t_kernel.make_launch_context()
        for setter, value in zip(self._setters, args):
            setter(ctx, value)
        prog.launch_kernel(prog.compile_kernel(cfg, prog.get_device_caps(), t_kernel), ctx)
        self.direct_calls += 1
        return None

    def _through_taichi(self, sig, args, prog):
        out = self.kernel(*args)
        try:
            primal = self.kernel._primal
            if self._setters is None:
                self._setters = _setters(primal) or False
            if sig is not None and self._setters is not False and primal.return_type is None:
                t_kernel = primal.compiled_kernels[primal.ensure_compiled(*args)]
                for owner, name in ((t_kernel, "make_launch_context"), (prog, "compile_kernel"),
                                    (prog, "launch_kernel"), (prog, "get_device_caps")):
                    getattr(owner, name)  # AttributeError if missing
                self._compiled[sig] = (prog, t_kernel)
        except AttributeError:  # not Taichi 1.7's internals: always Taichi's path
            self._setters = False
        return out
