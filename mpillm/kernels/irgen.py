"""What every IR-writing kernel module needs: LLVM types and a small emitter bound to one
``ir.IRBuilder`` (intrinsic declarations, constants, broadcasts, addresses, masked loads,
FMA, horizontal sums). The kernel modules subclass ``Emit`` with their own instructions."""
from __future__ import annotations

from llvmlite import ir

I1, I8, I16, I32, I64 = (ir.IntType(w) for w in (1, 8, 16, 32, 64))
F16, F32, F64 = ir.HalfType(), ir.FloatType(), ir.DoubleType()
PTR = ir.PointerType()


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

    def lanes_below(self, n, limit):
        """<n x i1>: lane index < limit (limit an i32 value; negative gives all false)."""
        return self.b.icmp_signed("<", self.const(I32, n, range(n)), self.splat(limit, n))

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
