"""Early exit: does dropping exited samples from the batch make a deep model faster?

End to end (DESIGN §6 anchor): 12 residual MLP blocks (d1024, hidden 4096), B8192, bf16, an exit head
(Linear(d, 100)) after every block, about 6% of the live samples leaving at each block.
    full depth         every block on every sample, one head at the end (no exits)
    eager compaction   boolean indexing after every head (`h[keep]`, a host sync per block)
    compile compaction `torch.compile` of the same function
    routec             `linear_exit` (head GEMM with the rule in its epilogue), `compact` + `gather_rows`
                       when the capacity bucket shrinks and `should_compact` says the block is
                       compute-bound; the capacity comes from a live count copied to the host
                       asynchronously, the newest one that has arrived (counts only shrink, so any
                       earlier count bounds the current one): no host sync anywhere.
    routec + CUDA graphs the same steps, each block step and each compaction captured once per
                       (layer, capacity) and replayed: possible only because nothing syncs, and needed
                       because at this size the eager routec path is bound by Python launch overhead
                       (measured on an H100: GPU busy ~3.2 ms of a ~10 ms call).
    routec compiled    the same model written as a .route spec (`EXIT_NET` below) and built by
                       routec.compiler, weights copied from the hand-written net, run in eval mode: the
                       compiler's ExitPoint/ExitFinal (sync-free: a LiveBound capacity, bucketed
                       `compact` + `gather_rows` or masked by `should_compact`, `exit_merge`). Its rule
                       reads the sampled exit block (an input), so its heads are plain Linears: a
                       `confidence(head) >= t` rule would be fused into `linear_exit`, but would not
                       follow the fixed profile every variant shares.
The exit decisions follow a fixed sampled profile (each sample's exit block is geometric with rate 6%,
the same for every variant) rather than the heads' confidence, so that every variant does the same work
whatever the random weights; the heads still run on the live rows at every block. The ideal time for
this profile is the full-depth time scaled by the mean live fraction (in the notes).

Crossover sweep: one block on B rows of which r are live, for r = 32 … B. "masked" runs the block on
all B rows and selects; "routec compact" packs the r live rows (`compact`, `gather_rows`), runs the
block on them and scatters them back (`scatter_rows`); "packed block only" is the block on r rows with
no compaction cost, the floor. Where "routec compact" beats "masked" is the compaction crossover that
`should_compact` encodes. On CUDA each is also timed as a CUDA graph (launch overheads removed), and the
graphed pair is the one compared.

`small=True` shrinks everything for CPU (B512, d128, hidden 512, fp32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness import Case, optional_impl  # benchmarks/ is on sys.path: run.py puts it there

from routec.codegen.ops import (
    bucket_capacity,
    compact,
    exit_merge,
    gather_rows,
    linear_exit,
    scatter_rows,
    should_compact,
)

EXIT_RATE = 0.06
STEPS_PER_OCTAVE = 16  # capacity buckets: 6% a layer needs finer steps than powers of two


class _Net:
    """Weights of the residual MLP trunk and its exit heads."""

    def __init__(self, depth, d, hidden, classes, device, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)

        def init(*shape):
            return (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).to(device=device, dtype=dtype)

        self.depth, self.d, self.hidden, self.classes = depth, d, hidden, classes
        self.w1 = [init(hidden, d) for _ in range(depth)]  # [h, d]
        self.w2 = [init(d, hidden) for _ in range(depth)]  # [d, h]
        self.head_w = [init(classes, d) for _ in range(depth)]  # [C, d]
        self.head_b = [init(classes) for _ in range(depth)]  # [C]

    def block(self, h, i):  # [M, d] -> [M, d]
        return h + F.linear(F.gelu(F.linear(h, self.w1[i])), self.w2[i])

    def block_flops(self, rows):
        return 4 * rows * self.d * self.hidden

    def head_flops(self, rows):
        return 2 * rows * self.d * self.classes


def _exit_profile(batch, depth, device, seed=1):
    """Each sample's exit block: geometric with rate EXIT_RATE, capped at the last block."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, generator=g).clamp_min(1e-12)
    layer = torch.floor(torch.log(u) / math.log1p(-EXIT_RATE)).clamp(max=depth - 1)
    return layer.to(device=device, dtype=torch.int64)  # [B]


def _full_depth(net, x):
    h = x
    for i in range(net.depth):
        h = net.block(h, i)
    return F.linear(h, net.head_w[-1], net.head_b[-1])


def _eager_compaction(net, x, exit_layer):
    out = x.new_zeros(x.shape[0], net.classes)
    rows = torch.arange(x.shape[0], device=x.device)
    h = x
    for i in range(net.depth):
        h = net.block(h, i)
        logits = F.linear(h, net.head_w[i], net.head_b[i])
        leave = exit_layer[rows] <= i
        out[rows[leave]] = logits[leave]
        keep = ~leave
        h, rows = h[keep], rows[keep]
        if h.shape[0] == 0:
            break
    return out


class _LaggedCount:
    """An upper bound of the live count that never blocks: each count is copied to pinned host memory
    asynchronously and the newest copy that has landed is used. On CPU the count is read directly."""

    def __init__(self, first: int, device: torch.device):
        self.bound, self.cuda, self.pending = first, device.type == "cuda", []

    def push(self, count):
        if not self.cuda:
            self.bound = int(count)
            return
        buf = torch.empty(1, dtype=torch.int64, pin_memory=True)
        buf.copy_(count, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((buf, event))

    def get(self) -> int:
        while self.pending and self.pending[0][1].query():
            self.bound = int(self.pending.pop(0)[0])
        return self.bound


EXIT_NET = """
model ExitNet(d: int, hidden: int, classes: int, depth: int) {
    in x: [B, d]
    in exit_layer: [B] long
    h = x
    repeat i in depth {
        h = h + (h -> Linear(d, hidden, bias=false) -> gelu -> Linear(hidden, d, bias=false))
        exit head[i] = h -> Linear(d, classes) when exit_layer <= i
    }
}
"""


def _compiled_exit(net, x, exit_layer):
    """The .route version of `net` (weights copied), in eval mode, checked against eager compaction."""
    from routec.compiler import compile_source

    model = compile_source(EXIT_NET, "exit_net.route", d=net.d, hidden=net.hidden, classes=net.classes,
                           depth=net.depth, device=x.device)
    state = {}
    for i in range(net.depth):
        state[f"layers.{i}.linear.weight"] = net.w1[i]
        state[f"layers.{i}.linear_1.weight"] = net.w2[i]
        state[f"layers.{i}.head.linear.weight"] = net.head_w[i]
        state[f"layers.{i}.head.linear.bias"] = net.head_b[i]
    model.load_state_dict(state)
    model = model.to(dtype=x.dtype).eval()

    def run():
        with torch.no_grad():
            return model(x, exit_layer).out

    got, want = run().float(), _eager_compaction(net, x, exit_layer).float()
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    if not err <= 2e-2:
        raise RuntimeError(f"routec compiled differs from eager compaction: relative error {err:.2e}")
    return run


def _routec_exit(net, x, exit_layer):
    n = x.shape[0]
    out = x.new_zeros(n, net.classes)
    index = torch.zeros(n, dtype=torch.int64, device=x.device)  # the exit each sample took
    h, rows = x, torch.arange(n, device=x.device)  # rows: original index of each packed row
    alive = torch.ones(n, dtype=torch.bool, device=x.device)
    capacity, live = n, _LaggedCount(n, x.device)
    for i in range(net.depth):
        h = net.block(h, i)  # [capacity, d]; rows past the live count are computed and ignored
        logits, _score, _rule_holds = linear_exit(h, net.head_w[i], net.head_b[i], rule="confidence", threshold=0.9)
        out, index = exit_merge(out, index, logits, rows, alive, i)
        alive = alive & (exit_layer.index_select(0, rows) > i)
        if i == net.depth - 1:
            break
        live.push(alive.sum(dtype=torch.int64).reshape(1))
        bound = live.get()
        new_capacity = bucket_capacity(bound, n, steps_per_octave=STEPS_PER_OCTAVE)
        if new_capacity < capacity and should_compact(bound, net.d, x.device):
            perm, count = compact(alive)
            h = gather_rows(h, perm, count, new_capacity)
            rows = rows.index_select(0, perm[:new_capacity])
            alive = torch.arange(new_capacity, device=x.device) < count
            capacity = new_capacity
    return out


class _Graph:
    """`fn()` captured once as a CUDA graph and replayed; on CPU, `fn()` called directly.

    `fn` must be idempotent (reads static input buffers, writes distinct static output buffers), since
    the warm-up before the capture runs it once for real.
    """

    def __init__(self, fn, device, pool):
        self.fn, self.graph = fn, None
        if torch.device(device).type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()  # Triton compilation, cuBLAS workspaces: nothing may first happen inside the capture
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                fn()

    def __call__(self):
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()


class _GraphedRoutecExit:
    """`_routec_exit` with each block step and each compaction replayed as a CUDA graph.

    Nothing in the routec path syncs with the host, so every step can be captured; only the capacity
    (a host int from the lagged count) picks which graph runs next. Per capacity c there are static
    buffers: hidden rows and alive flags double-buffered by layer parity (so a step reads one and writes
    the other, and replaying it is idempotent), and the original row index of each packed row. Graphs are
    captured lazily, keyed by (layer, capacity) for steps and (capacity, new capacity, parity) for
    compactions, and share one memory pool (their intermediates die inside each replay).
    """

    def __init__(self, net, exit_layer, n, device):
        self.net, self.exit_layer, self.n, self.device = net, exit_layer, n, torch.device(device)
        self.pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.graphs, self.buffers = {}, {}
        self.out = torch.zeros(n, net.classes, device=device, dtype=net.w1[0].dtype)
        self.index = torch.zeros(n, dtype=torch.int64, device=device)
        self.count = torch.zeros(1, dtype=torch.int64, device=device)

    def _buffers(self, c):
        if c not in self.buffers:
            dtype, d = self.net.w1[0].dtype, self.net.d
            self.buffers[c] = dict(
                h=[torch.zeros(c, d, device=self.device, dtype=dtype) for _ in range(2)],
                alive=[torch.zeros(c, dtype=torch.bool, device=self.device) for _ in range(2)],
                rows=torch.zeros(c, dtype=torch.int64, device=self.device),
            )
        return self.buffers[c]

    def _step(self, i, c):
        net, buf = self.net, self._buffers(c)
        h_in, h_out = buf["h"][i % 2], buf["h"][(i + 1) % 2]
        alive_in, alive_out, rows = buf["alive"][i % 2], buf["alive"][(i + 1) % 2], buf["rows"]

        def step():
            h = net.block(h_in, i)
            logits, _score, _rule_holds = linear_exit(h, net.head_w[i], net.head_b[i], rule="confidence", threshold=0.9)
            out, index = exit_merge(self.out, self.index, logits, rows, alive_in, i)
            self.out.copy_(out)
            self.index.copy_(index)
            alive_out.copy_(alive_in & (self.exit_layer.index_select(0, rows) > i))
            h_out.copy_(h)
            self.count.copy_(alive_out.sum(dtype=torch.int64).reshape(1))

        return step

    def _compaction(self, c, c_new, parity):
        old, new = self._buffers(c), self._buffers(c_new)

        def compaction():
            perm, count = compact(old["alive"][parity])
            new["h"][parity].copy_(gather_rows(old["h"][parity], perm, count, c_new))
            new["rows"].copy_(old["rows"].index_select(0, perm[:c_new]))
            torch.lt(torch.arange(c_new, device=self.device), count, out=new["alive"][parity])

        return compaction

    def _run(self, key, make):
        if key not in self.graphs:
            self.graphs[key] = _Graph(make(), self.device, self.pool)
        self.graphs[key]()

    def __call__(self, x):
        n, depth = self.n, self.net.depth
        start = self._buffers(n)
        start["h"][0].copy_(x)
        start["rows"].copy_(torch.arange(n, device=self.device))
        start["alive"][0].fill_(True)
        self.out.zero_()
        capacity, live = n, _LaggedCount(n, self.device)
        for i in range(depth):
            self._run(("step", i, capacity), lambda: self._step(i, capacity))
            if i == depth - 1:
                break
            live.push(self.count)
            bound = live.get()
            new_capacity = bucket_capacity(bound, n, steps_per_octave=STEPS_PER_OCTAVE)
            if new_capacity < capacity and should_compact(bound, self.net.d, self.device):
                parity = (i + 1) % 2
                self._run(("compact", capacity, new_capacity, parity), lambda: self._compaction(capacity, new_capacity, parity))
                capacity = new_capacity
        return self.out.clone()


def _checked_graphs(net, x, exit_layer, device):
    """The graphed forward, captured by one call here and checked against eager compaction; any failure
    (capture, numerics) is reported by the runner as "unavailable" instead of breaking a later case."""
    graphed = _GraphedRoutecExit(net, exit_layer, x.shape[0], device)
    got, want = graphed(x).float(), _eager_compaction(net, x, exit_layer).float()
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    if not err <= 2e-2:  # bf16 products of different row counts may round differently, nothing more
        raise RuntimeError(f"graphed routec differs from eager compaction: relative error {err:.2e}")
    return lambda: graphed(x)


def _sizes(small):
    if small:
        return dict(batch=512, d=128, hidden=512, classes=16, depth=12)
    return dict(batch=8192, d=1024, hidden=4096, classes=100, depth=12)


def _end_to_end(device, small):
    s = _sizes(small)
    dtype = torch.float32 if small or device == "cpu" else torch.bfloat16
    net = _Net(s["depth"], s["d"], s["hidden"], s["classes"], device, dtype)
    x = torch.randn(s["batch"], s["d"], generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    exit_layer = _exit_profile(s["batch"], s["depth"], device)
    live = [int((exit_layer >= i).sum()) for i in range(s["depth"])]  # rows entering block i
    useful = sum(net.block_flops(r) + net.head_flops(r) for r in live)
    ideal = sum(live) / (s["batch"] * s["depth"])
    # Every block after a boolean index resumes a new graph whose guards see a new row count and layer:
    # dynamic shapes and a recompile limit above the 12 layers keep it compiling instead of falling back.
    compiled = torch._dynamo.config.patch(recompile_limit=64)(torch.compile(_eager_compaction, dynamic=True))
    impls = {
        "full depth": lambda: _full_depth(net, x),
        "eager compaction": lambda: _eager_compaction(net, x, exit_layer),
        "compile compaction": lambda: compiled(net, x, exit_layer),
        "routec": lambda: _routec_exit(net, x, exit_layer),
    }
    unavailable = {}
    optional_impl(impls, unavailable, "routec + CUDA graphs", lambda: _checked_graphs(net, x, exit_layer, device))
    optional_impl(impls, unavailable, "routec compiled", lambda: _compiled_exit(net, x, exit_layer))
    weight_bytes = sum(t.numel() * t.element_size() for t in net.w1 + net.w2 + net.head_w)
    return Case(
        name=f"early_exit_B{s['batch']}_d{s['d']}_x{s['depth']}",
        group="exit",
        impls=impls,
        unavailable=unavailable,
        baseline="full depth",
        ours="routec + CUDA graphs" if "routec + CUDA graphs" in impls and device == "cuda" else "routec",
        bytes=weight_bytes + 2 * x.numel() * x.element_size(),
        flops=useful,
        notes=(
            f"{dtype} on {device}; {EXIT_RATE:.0%} of live samples leave per block; mean live fraction "
            f"{ideal:.3f}, so the ideal time is {ideal:.3f} x full depth"
            + ("" if device == "cuda" else "; on CPU the graphed steps run without graphs")
        ),
    )


def _crossover(device, small):
    s = _sizes(small)
    dtype = torch.float32 if small or device == "cpu" else torch.bfloat16
    net = _Net(1, s["d"], s["hidden"], s["classes"], device, dtype)
    n = s["batch"]
    x = torch.randn(n, s["d"], generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    cases = []
    r = 32
    while r <= n:
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=torch.Generator().manual_seed(r))[:r]] = True
        keep = keep.to(device)
        capacity = bucket_capacity(r, n, steps_per_octave=STEPS_PER_OCTAVE)

        def masked(keep=keep):
            return torch.where(keep[:, None], net.block(x, 0), x)

        def compacted(keep=keep, capacity=capacity):
            perm, count = compact(keep)
            packed = gather_rows(x, perm, count, capacity)
            return scatter_rows(net.block(packed, 0), perm, count, x)

        packed_only = x[:capacity].contiguous()
        impls = {
            "masked": masked,
            "routec compact": compacted,
            "packed block only": lambda packed_only=packed_only: net.block(packed_only, 0),
        }
        unavailable = {}
        if device == "cuda":  # the same three without launch overheads
            for label, fn in list(impls.items()):
                optional_impl(impls, unavailable, f"{label} + CUDA graph", lambda fn=fn: _Graph(fn, device, None))
        graphs = "masked + CUDA graph" in impls and "routec compact + CUDA graph" in impls
        cases.append(
            Case(
                name=f"exit_crossover_live{r}_of_{n}",
                group="exit_crossover",
                impls=impls,
                unavailable=unavailable,
                baseline="masked + CUDA graph" if graphs else "masked",
                ours="routec compact + CUDA graph" if graphs else "routec compact",
                bytes=2 * n * s["d"] * x.element_size() + 2 * s["d"] * s["hidden"] * x.element_size(),
                flops=net.block_flops(r),
                notes=(
                    f"{r} of {n} rows live, capacity {capacity}, d{s['d']} h{s['hidden']} {dtype}; "
                    f"should_compact={bool(should_compact(r, s['d'], device))}"
                ),
            )
        )
        r *= 2
    return cases


def cases(device: str, small: bool) -> list[Case]:
    return [_end_to_end(device, small), *_crossover(device, small)]
