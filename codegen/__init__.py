"""routec.codegen: the runtime ops (DESIGN §5), their Triton kernels and pure-PyTorch references.

The compiler lowers every routing construct to a `routec::` custom op defined here; `routec.codegen.ops`
is the public surface. Everything a compiled graph runs lives here too — the routing modules (`runtime`),
the layers (`layers`, `mamba`) and the graph's functions (`functions`) — so a file written by `routec compile`
needs only this package and torch. This package never imports `routec.compiler`.
"""
