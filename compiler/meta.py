"""The keys routec stores in `fx.Node.meta`, spelled in one place."""

ROUTE_SPAN = "route_span"  # the dsl Span of the `.route` statement a node came from
ROUTE_STMT = "route_stmt"  # that statement's source line, for messages and graph labels
ROUTE_SHAPE = "route_shape"  # the symbolic shape the elaborator gave a node's tensor (ints, symbol strings, "?")
