"""The runtime op contract of DESIGN §5: every routing op routec lowers to, by name.

Layout is channels-last with the sequence axis at 1. Each op accepts fp32 and bf16 (accumulating in fp32),
is differentiable, is registered as a `torch.library` custom op in the `routec` namespace (with a fake
implementation and autograd, so `torch.compile(fullgraph=True)` and `torch.export` see one opaque node),
and runs either its Triton kernel or its pure-PyTorch reference (see `routec.codegen.backend`).

Each op family lives in its own module with its kernel, launcher and reference side by side; this module
only re-exports them.
"""
from .lif import lif_scan
from .scan import linear_scan, selective_scan
from .combine import gated_combine
from .compaction import bucket_capacity, compact, gather_rows, pack_rows, scatter_rows, should_compact
from .exits import exit_merge, exit_scores, linear_exit, select_first_exit
from .rnn import gru_scan, leaky_rnn_scan, lstm_scan
from .router import RouterOutput, route_tokens, topk_gate
from .moe import moe_ffn
from .multiscan import multi_route_linear_scan, multi_route_selective_scan, route_table
from .compaction import compact_groups
from .linear_combine import linear_combine
from .gated_conv import gated_conv_bn_relu
