"""LLVM intrinsics the packing kernels are built on: raw-address memmove and unaligned loads.

Why intrinsics rather than numba array slicing or a ctypes ``memcpy``: slicing compiles to a
byte loop that LLVM may or may not turn into a call to libc, and a ctypes function pointer is a
"dynamic global" that disables numba's on-disk cache. ``llvm.memmove`` with a run-time length
lowers to libc ``memmove`` (which picks its AVX/ERMS variant at run time, whatever CPU the kernel
was compiled for), and intrinsics are plain IR, so ``cache=True`` keeps working.

These helpers trust their addresses completely. They are only reachable through kernels whose
Python wrappers validate every (address, length) first; never call them on unchecked input.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_I8P = ir.IntType(8).as_pointer()


def _all_integers(*tys: types.Type) -> bool:
    return all(isinstance(t, types.Integer) for t in tys)


@intrinsic
def memmove(typingctx, dst, src, n):  # type: ignore[no-untyped-def]
    """``memmove(dst_addr, src_addr, nbytes)`` on raw integer addresses."""
    if not _all_integers(dst, src, n):
        return None
    sig = types.void(dst, src, n)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        d = context.cast(builder, args[0], signature.args[0], types.uintp)
        s = context.cast(builder, args[1], signature.args[1], types.uintp)
        c = context.cast(builder, args[2], signature.args[2], types.int64)
        fn = builder.module.declare_intrinsic("llvm.memmove", [_I8P, _I8P, ir.IntType(64)])
        builder.call(fn, [builder.inttoptr(d, _I8P), builder.inttoptr(s, _I8P), c,
                          ir.Constant(ir.IntType(1), 0)])
        return context.get_dummy_value()

    return sig, codegen


def _make_load(bits: int, result: types.Integer):  # type: ignore[no-untyped-def]
    @intrinsic
    def load(typingctx, addr):  # type: ignore[no-untyped-def]
        if not _all_integers(addr):
            return None
        sig = result(addr)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            a = context.cast(builder, args[0], signature.args[0], types.uintp)
            p = builder.inttoptr(a, ir.IntType(bits).as_pointer())
            value = builder.load(p, align=1)
            if bits < 64:
                value = builder.zext(value, ir.IntType(64))
            return value

        return sig, codegen

    return load


# Native-endian unaligned loads widened to uint64. xxh64 reads little-endian words, so the
# checksum module refuses to import on a big-endian host rather than computing other numbers.
load_u64 = _make_load(64, types.uint64)
load_u32 = _make_load(32, types.uint64)
load_u8 = _make_load(8, types.uint64)
