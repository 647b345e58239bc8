"""routec.codegen: the runtime ops (DESIGN §5), their Triton kernels and pure-PyTorch references.

The compiler lowers every routing construct to a `routec::` custom op defined here; `routec.codegen.ops`
is the public surface. This package never imports `routec.compiler`.
"""
