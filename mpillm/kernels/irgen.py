"""What every IR-writing kernel module needs: LLVM types and a small emitter bound to one
``ir.IRBuilder`` (intrinsic declarations, constants, broadcasts, addresses, masked loads,
FMA, horizontal sums, the portable signed dot product). The kernel modules subclass ``Emit`` with
their own instructions."""
from __future__ import annotations

import inspect

from llvmlite import binding as _llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

I1, I8, I16, I32, I64 = (ir.IntType(w) for w in (1, 8, 16, 32, 64))
F16, F32, F64 = ir.HalfType(), ir.FloatType(), ir.DoubleType()
PTR = ir.PointerType()
# LLVM >= 22 has llvm.vector.partial.reduce.add (see Emit.sdot) and declares the x86 VNNI
# intrinsics on byte vectors (older: i32 vectors; 22 still upgrades those)
PARTIAL_REDUCE = VNNI_BYTE_OPERANDS = _llvm.llvm_version_info >= (22,)


def int_intrinsic(name: str, params: str, codegen):
    """A numba intrinsic named ``name`` with the arguments ``params`` (comma-separated names), all
    integers (addresses, strides, counts), that returns nothing; its body is ``codegen``
    (context, builder, signature, args)."""

    def typer(typingctx, *argtys):
        if not all(isinstance(t, types.Integer) for t in argtys):
            return None
        return types.void(*argtys), codegen

    # numba reads the intrinsic's parameters from its typer's signature: fixed ones, not *argtys
    P = inspect.Parameter
    typer.__signature__ = inspect.Signature([P(n.strip(), P.POSITIONAL_OR_KEYWORD)
                                             for n in ("typingctx," + params).split(",")])
    typer.__name__ = typer.__qualname__ = name
    return intrinsic(typer)


def vec(t, n):
    return ir.VectorType(t, n)


def suffix(t) -> str:
    """LLVM's overload suffix of an element type: i8 .. i64, f16, f32, f64."""
    if isinstance(t, ir.IntType):
        return f"i{t.width}"
    return {ir.HalfType: "f16", ir.FloatType: "f32", ir.DoubleType: "f64"}[type(t)]


class Emit:
    def __init__(self, builder: ir.IRBuilder):
        self.b = builder

    def decl(self, name, ret, args):
        m = self.b.module
        f = m.globals.get(name)
        if f is None:
            f = ir.Function(m, ir.FunctionType(ret, args), name)
        return f

    def const(self, ty, n, vals):
        return ir.Constant(vec(ty, n), [ir.Constant(ty, v) for v in vals])

    def splat(self, scalar, n):
        """A run-time scalar broadcast to n lanes."""
        ty = vec(scalar.type, n)
        v = self.b.insert_element(ir.Constant(ty, ir.Undefined), scalar, I32(0))
        return self.b.shuffle_vector(v, ir.Constant(ty, ir.Undefined), ir.Constant(vec(I32, n), None))

    def shuffle(self, a, b, idx):
        if b is None:
            b = ir.Constant(a.type, ir.Undefined)
        return self.b.shuffle_vector(a, b, self.const(I32, len(idx), idx))

    def addr(self, base, off):
        return self.b.inttoptr(self.b.add(base, off) if off is not None else base, PTR)

    def load(self, base, off, ty, mask=None, align=1, fill=None):
        """Load at base + off (bytes); masked lanes read nothing and give ``fill`` (default 0)."""
        p = self.addr(base, off)
        if mask is None:
            return self.b.load(p, typ=ty, align=align)
        f = self.decl(f"llvm.masked.load.v{ty.count}{suffix(ty.element)}.p0", ty, [PTR, I32, vec(I1, ty.count), ty])
        return self.b.call(f, [p, I32(align), mask, ir.Constant(ty, None) if fill is None else fill])

    def chunked(self, n, size: int, body, tail=None, tail_max: int = 0):
        """body(i, None) for each whole chunk i (i64) of ``size`` items of n (i64), then once
        body(i, rem) for a partial last chunk of rem (i32) items, if there is one; with ``tail``,
        a partial chunk of at most tail_max items goes to tail(i, rem) instead."""
        b = self.b
        whole = b.udiv(n, ir.Constant(I64, size))
        rem = b.trunc(b.urem(n, ir.Constant(I64, size)), I32)
        with cgutils.for_range(b, whole) as loop:
            body(loop.index, None)
        with b.if_then(b.icmp_unsigned("!=", rem, I32(0)), likely=False):
            if tail is None:
                body(whole, rem)
                return
            with b.if_else(b.icmp_unsigned("<=", rem, I32(tail_max))) as (small, large):
                with small:
                    tail(whole, rem)
                with large:
                    body(whole, rem)

    def prefetch(self, base, off, locality=3):
        """Prefetch for read at base + off; locality 3: all cache levels (prefetcht0), 2: L2 (prefetcht1)."""
        f = self.decl("llvm.prefetch.p0", ir.VoidType(), [PTR, I32, I32, I32])
        self.b.call(f, [self.addr(base, off), I32(0), I32(locality), I32(1)])

    def lanes_below(self, n, limit):
        """<n x i1>: lane index < limit (limit an i32 value; negative gives all false)."""
        return self.b.icmp_signed("<", self.const(I32, n, range(n)), self.splat(limit, n))

    def half(self, base, off):
        """One fp16 value at base + off -> float."""
        return self.b.fpext(self.b.bitcast(self.load(base, off, I16), F16), F32)

    def sdot(self, pairs):
        """sum over (a, x) pairs of sum(sext(a) * sext(x)), a and x <16 x i8>, as i32 (target-neutral).

        Written as ``partial.reduce.add`` into <4 x i32> (LLVM >= 22), which AArch64 with
        +dotprod selects as one ``sdot`` per pair (plain NEON: smull/saddw), then one
        horizontal add. Older LLVM: ``reduce.add`` of the products."""
        v16, v4 = vec(I32, 16), vec(I32, 4)
        prods = [self.b.mul(self.b.sext(a, v16), self.b.sext(x, v16)) for a, x in pairs]
        if PARTIAL_REDUCE:
            f = self.decl("llvm.vector.partial.reduce.add.v4i32.v16i32", v4, [v4, v16])
            acc = ir.Constant(v4, None)
            for p in prods:
                acc = self.b.call(f, [acc, p])
            return self.b.call(self.decl("llvm.vector.reduce.add.v4i32", I32, [v4]), [acc])
        tot = prods[0]
        for p in prods[1:]:
            tot = self.b.add(tot, p)
        return self.b.call(self.decl("llvm.vector.reduce.add.v16i32", I32, [v16]), [tot])

    def fma(self, a, b, c):
        t = a.type
        name = f"llvm.fma.v{t.count}{suffix(t.element)}" if isinstance(t, ir.VectorType) else f"llvm.fma.{suffix(t)}"
        return self.b.call(self.decl(name, t, [t, t, t]), [a, b, c])

    def hsum(self, v):
        """Tree reduction of a float vector to a scalar."""
        n = v.type.count
        while n > 1:
            n //= 2
            v = self.b.fadd(self.shuffle(v, None, range(n)), self.shuffle(v, None, range(n, 2 * n)))
        return self.b.extract_element(v, I32(0))
