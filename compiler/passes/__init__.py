"""routec.compiler.passes: graph passes that run on the fx graph `compiler.build.finish` produces.

`fusion` groups elementwise nodes into regions and replaces each by one generated Triton kernel
(`kernelgen` writes and imports its source); `launches` counts kernel launches per forward for
`routec run --stats`; `multiroute` merges independent multi-route scans into one launch per group;
`batch_calls` runs independent calls of one shared per-sample module as one call on the stacked batch.
"""

from .batch_calls import batch_graph, batch_module
from .fusion import count_elementwise, find_regions, fuse_graph, fuse_module, should_fuse, verify
from .launches import count_launches

__all__ = ["batch_graph", "batch_module", "count_elementwise", "count_launches", "find_regions", "fuse_graph",
           "fuse_module", "should_fuse", "verify"]
